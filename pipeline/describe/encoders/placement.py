"""Where and how blocks of tiles meet a learned encoder: GPU workers, batch size, reading ahead of the model.

On a cluster whose GPU workers advertise ``GPU=1`` (``dask worker --resources GPU=1``, SLURM ``gpus_per_job``), block
tasks of a learned encoder ask for that resource, so they run there, one at a time per GPU, in batches of
``descriptor.gpu_batch_tiles``; the slide plans (tissue masks) stay on the CPU workers. On the GPU worker a reader
thread decodes the next batches while the model encodes the current one (``prefetched``), so neither waits for the
other. Each block writes its own Zarr chunk and marker, so a GPU worker that dies loses only its running block, which
Dask reruns on another worker. Without GPU workers (or with ``cluster.gpu_placement: client``) nothing changes: the
blocks run on the CPU workers.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

from ...core.config import ClusterConfig, DescriptorConfig
from ...core.parallel import GPU_RESOURCES, gpu_placement
from .base import Encoder

PREFETCH_BATCHES = 2  # batches decoded ahead of the model on an accelerator


def block_resources(encoder: Encoder, runner, cluster: ClusterConfig) -> dict | None:
    """``{"GPU": 1}`` for the block tasks of a learned encoder when the cluster has GPU workers, else None."""
    if not encoder.learned or not gpu_placement(runner, cluster):
        return None
    return dict(GPU_RESOURCES)


def block_batch_tiles(encoder: Encoder, config: DescriptorConfig) -> int:
    """Tiles per encoder call: large batches on an accelerator, ``batch_tiles`` on CPU."""
    return config.gpu_batch_tiles if encoder.on_accelerator else config.batch_tiles


def prefetched(batches: Iterable, depth: int = PREFETCH_BATCHES) -> Iterator:
    """Yield the items of ``batches``, produced by a reader thread up to ``depth`` items ahead of the consumer.

    Decoding (OpenSlide, libjpeg-turbo) releases the GIL, so it overlaps the model call. An exception in the reader is
    raised in the consumer; the reader stops when the consumer stops early.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in batches:
                if not put(("item", item)):
                    return
            put(("end", done))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(("error", err))

    reader = threading.Thread(target=read, name="tile-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        reader.join(timeout=5)
