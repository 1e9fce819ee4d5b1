"""The ``cluster`` section of the run configuration (``pipeline/core/config.py``), kept here so that module stays
short: where tasks run (``pipeline/core/parallel.py``) and how local workers start (``local_workers.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .config_section import Section


class ClusterConfig(Section):
    kind: Literal["local", "address", "slurm"] = Field("local", description="local = a LocalCluster here; address = an existing scheduler; slurm = dask-jobqueue")
    workers: int | None = Field(None, ge=1, description="local worker processes; None = one per CPU core")
    threads_per_worker: int = Field(1, ge=1, description="threads of each local worker process")
    memory_limit: str = Field("auto", description="memory limit of each local worker ('auto' = share of this machine)")
    address: str | None = Field(None, description="scheduler address for kind=address, e.g. tcp://10.0.0.5:8786")
    max_tasks_in_flight: int | None = Field(None, ge=1, description="bound on submitted, unfinished tasks; None = 4 per worker thread")
    retries: int = Field(2, ge=0, le=10, description="times a task is retried when its worker dies")
    slurm: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of dask_jobqueue.SLURMCluster")
    slurm_jobs: int = Field(2, ge=1, description="slurm: jobs to start (each runs slurm.processes workers)")
    dashboard: bool = Field(True, description="start the Dask dashboard and print its address")
    one_block_in_process: bool = Field(
        True, description="describe: a run of one slide whose tile grid fits one block (chunk_tiles x chunk_tiles) runs "
                          "in this process, without starting the local cluster, which would have nothing to run in "
                          "parallel; false: always start it (a reader crash then stays in a worker)")
    plan_while_starting: bool = Field(
        True, description="describe, local cluster: while Dask is imported and the cluster starts (~0.3 s), a forked "
                          "copy of this process plans the run's largest slide without a store (with a stain pass: "
                          "surveys it), so its blocks start with the workers, then fingerprints and surveys the next "
                          "new slides for their tasks; false: every slide is planned and surveyed on a worker")
    worker_start: Literal["auto", "fork", "spawn"] = Field(
        "auto", description="how local worker processes start: 'fork' = copies of this process (ready in ~0.1 s "
                            "with the pipeline already imported), 'spawn' = fresh interpreters that import it again "
                            "(~2 s); 'auto' = fork on Linux unless TensorFlow, JAX or torch is loaded here (not fork-safe)")
    gpu_placement: Literal["auto", "client", "gpu_worker"] = Field(
        "auto", description="where the model stages (train, Grad-CAM) run: 'auto' = as one task on a worker that "
                            "advertises a GPU resource when the cluster has one, else in this process; 'client' = "
                            "always in this process; 'gpu_worker' = on a GPU worker or fail")
    gpu_wait_s: float = Field(300.0, ge=0, description="how long to wait for a GPU worker to join when one is "
                                                       "expected (gpu_placement 'gpu_worker', SLURM gpus_per_job)")

    @model_validator(mode="after")
    def _address_given(self):
        if self.kind == "address" and not self.address:
            raise ValueError("cluster.kind 'address' needs cluster.address")
        if self.kind == "local" and self.gpu_placement == "gpu_worker":
            raise ValueError("cluster.gpu_placement 'gpu_worker' needs a cluster with GPU workers (kind 'address' or "
                             "'slurm' with slurm.gpus_per_job); a local cluster's workers advertise no GPU")
        return self
