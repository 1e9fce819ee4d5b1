"""Describe throughput on a >= 1-gigapixel slide: the OpenSlide decode ceiling, the direct TIFF reader, and
``describe`` end to end with each reader, on the same Dask LocalCluster workers in one run.

Phases (each over the tissue tiles of the slide, grouped in the same blocks ``describe`` uses):

a. ``openslide_read``: workers read every tissue tile's pixels through OpenSlide (the windows ``read_tile_row``
   reads, ``read_region`` -> RGB array) and do nothing else: the ceiling of any OpenSlide-based describe.
b. ``tiff_read``: the same windows through the direct TIFF tile reader.
c. ``describe_openslide``: ``describe_slides`` end to end (tissue mask, tiles, descriptors, Zarr store), reader openslide.
d. ``describe_tiff``: the same with reader tiff.

End to end (issue 18), each as a whole process, timed from outside:

p. ``plain_script``: ``benchmarks/plain_openslide_script.py`` (openslide-python, Otsu on a thumbnail, ``read_region``
   512 px + 2x reduce, per-tile mean/std, ``multiprocessing.Pool(workers)``) on the slide;
w. ``command``: ``wsi-pipeline describe --workers N`` on the slide (default settings, fresh output directory);
P. / W. the same two on a directory of ``--dir-slides`` small slides (cached in the work dir);
o. / O. ``baseline_command`` / ``baseline_command_dir``: the command of an earlier checkout (``--baseline-tree``, with
   its own defaults) on the slide / the directory: issue 14's "within 15% of today's tiles/s" against the code of the
   day it was filed (7fc4360, before QC and stain normalisation);
s. ``command_one_small_slide``: the command on one of those (~40 tiles): its time less the floor is the fixed cost
   (imports, kernels, plan, shutdown: a slide of one block runs in the command's process, without a cluster);
S. ``command_one_small_slide_cluster``: the same with ``cluster.one_block_in_process: false``: the fixed cost of a
   command that starts its local cluster (as one large slide does);
f. ``floor``: the per-tile CPU cost of reading + describing (``describe_block``'s loop without the store write, one
   process, compiled kernels loaded, every tissue tile) x tissue tiles / workers: what no scheduler can beat on these
   cores. Measured before and after every w / W / s run, which is set against the mean of the two; the median run is
   reported, with every run's ratio (the machine's speed drifts by several percent within a minute).
Targets: command >= 2.5x faster than the plain script on the slide and on the directory, the command's own run
(``seconds`` in its summary) <= 1.25x the floor, the directory at >= 85% of the slide's tiles/s (reported for the whole
commands and for their runs alone: ``dir_tiles_per_s_over_slide``, ``dir_run_tiles_per_s_over_slide``, and round by
round, ``..._by_round``), peak RSS per worker < 1.5 GB (every process of the command's tree, sampled with psutil).

Megapixels are the read-level pixels of the tissue tiles (tiles x (tile edge at the read level)^2), the same number
for every phase, so throughput ratios are inverse time ratios. Targets: (c)/(a) throughput >= 0.7 (describe costs
little beyond reading) and (d) time <= 0.4 x (a) time (the direct reader makes describe 2.5x faster than OpenSlide can
even read), with peak RSS per worker under 1.5 GB (sampled with psutil on the worker processes). Worker CPU seconds
per phase are reported too: on a machine shared with other jobs they compare more steadily than wall time.

    python benchmarks/describe_throughput.py                    # builds /tmp/wsi-bench/synthetic-40000x25000-seed0.svs once
    python benchmarks/describe_throughput.py --phases fpwPW --repeat 3   # command vs plain script, slide + directory
    python benchmarks/describe_throughput.py --quick            # an 8000 x 6000 slide, for a quick look
    python benchmarks/describe_throughput.py --slide my.svs --workers 4
    python benchmarks/describe_throughput.py --repeat 2         # interleaved repeats; each phase's fastest run is kept

Run it as a script (its read-only task function travels to the workers by value). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from _common import cpu_model  # benchmarks/ is on sys.path when a script here is run

FULL_SIZE = (40000, 25000)   # 1.0 gigapixel at level 0
QUICK_SIZE = (8000, 6000)


# --- the slide ------------------------------------------------------------------------------------------------------



def bench_slide(work_dir: Path, quick: bool, seed: int = 0) -> Path:
    """The synthetic benchmark slide, written once (streamed tile by tile) and reused from ``work_dir``."""
    from sample_data.synthetic import SyntheticTissue, write_slide

    width, height = QUICK_SIZE if quick else FULL_SIZE
    path = work_dir / f"synthetic-{width}x{height}-seed{seed}.svs"
    if not path.exists():
        print(f"writing {path} ({width * height / 1e9:.2f} gigapixels, once) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        write_slide(path, SyntheticTissue(width, height, seed=seed, tissue_fraction=0.5), mpp=0.25,
                    maxworkers=os.cpu_count() or 1)
        print(f"  written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def _load_kernels() -> None:
    from pipeline.describe.descriptors import stats_descriptors
    from pipeline.slides.pixels import reduce_box

    stats_descriptors(np.zeros((1, 8, 8, 3), np.uint8))
    for factor in (2, 3):
        reduce_box(np.zeros((8, 8, 3), np.uint8), 0, 0, factor, 2, 2)


def warm_page_cache(path: Path) -> None:
    """Read the file once so every phase finds it in the page cache (the first phase is not penalised)."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


# --- worker task: read pixels and nothing else ---------------------------------------------------------------------


def read_block_pixels(path: str, grid_dict: dict, block: tuple[int, int, int, int], block_tiles: np.ndarray,
                      reader: dict) -> int:
    """Read the windows ``read_tile_row`` reads for the tissue tiles of one block; returns pixels read."""
    from pipeline.slides.reader_choice import open_reader
    from pipeline.slides.tiling import TileGrid, tile_row_window

    grid = TileGrid.from_dict(grid_dict)
    r0, r1, c0, _ = block
    pixels = 0
    with open_reader(path, reader) as handle:
        for r in range(r0, r1):
            cols = np.flatnonzero(block_tiles[r - r0]) + c0
            if len(cols) == 0:
                continue
            ix0, iy0, ix1, iy1 = tile_row_window(grid, r, cols)
            strip = handle.read_level(grid.read_level, ix0, iy0, ix1 - ix0, iy1 - iy0)
            pixels += strip.shape[0] * strip.shape[1]
    return pixels


# --- memory sampling -----------------------------------------------------------------------------------------------


class RssSampler:
    """Samples the resident memory of the worker processes every ``interval`` seconds; also their CPU seconds."""

    def __init__(self, pids: list[int], interval: float = 0.05):
        import psutil

        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.interval = interval
        self.peak: dict[int, int] = {pid: 0 for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, proc in self.procs.items():
                try:
                    self.peak[pid] = max(self.peak[pid], proc.memory_info().rss)
                except Exception:  # noqa: BLE001 - a worker restarting
                    pass
            self._stop.wait(self.interval)

    def _cpu(self) -> float:
        total = 0.0
        for proc in self.procs.values():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except Exception:  # noqa: BLE001
                pass
        return total

    def __enter__(self):
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_seconds = self._cpu() - self._cpu0

    def peaks_mb(self) -> list[float]:
        return [round(v / 2**20, 1) for v in self.peak.values()]


# --- phases --------------------------------------------------------------------------------------------------------


def run_read_phase(runner, path: str, plan: dict, blocks: list, reader: dict) -> float:
    tissue = plan["tissue_tiles"]
    t0 = time.perf_counter()
    for b in blocks:
        runner.submit(read_block_pixels, path, plan["grid"], b, tissue[b[0]:b[1], b[2]:b[3]].copy(), reader, tag=b)
    for _ in blocks:
        done = runner.next_done()
        if done.error is not None:
            raise done.error
    return time.perf_counter() - t0


def run_describe_phase(runner, path: Path, out_dir: Path, config) -> tuple[float, dict]:
    from pipeline.core.outputs import Manifest
    from pipeline.describe.runner import describe_slides

    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # describe prints the dashboard link; stdout is for the JSON
        summary = describe_slides([path], out_dir, config, runner=runner, progress=False)
    seconds = time.perf_counter() - t0
    if summary["done"] != 1:
        raise RuntimeError(f"describe failed: {Manifest(out_dir).slides}")
    record = next(iter(Manifest(out_dir).slides.values()))
    return seconds, record


# --- end to end: the whole command against the plain script --------------------------------------------------------

BIN = Path(sys.executable).parent
PLAIN_SCRIPT = Path(__file__).resolve().parent / "plain_openslide_script.py"
DIR_SLIDE_SIZE = (5120, 3840)


def small_slides_dir(work_dir: Path, count: int, seed: int = 100) -> Path:
    """``count`` small Aperio-style slides (5120 x 3840 px at 0.25 µm/px, ~40 tissue tiles each), written once."""
    from sample_data.synthetic import SyntheticTissue, write_slide

    folder = work_dir / f"small-{count}x{DIR_SLIDE_SIZE[0]}x{DIR_SLIDE_SIZE[1]}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"small-{i:03d}.svs"
        if not path.exists():
            write_slide(path, SyntheticTissue(*DIR_SLIDE_SIZE, seed=seed + i, tissue_fraction=0.5), mpp=0.25)
    return folder


class TreeRss:
    """Peak RSS of every process under ``root`` (the command, its forked or spawned workers), sampled every 50 ms."""

    def __init__(self, root: int):
        import psutil

        self.root = psutil.Process(root)
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except Exception:  # noqa: BLE001 - the command ended
                procs = []
            for proc in procs:
                try:
                    self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), proc.memory_info().rss)
                except Exception:  # noqa: BLE001
                    pass
            self._stop.wait(0.05)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return sorted((round(v / 2**20, 1) for v in self.peak.values()), reverse=True)


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_process(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, list[float]]:
    """(wall seconds, CPU seconds of the whole process tree, peak RSS MB of each process in it) of one process."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    rss = TreeRss(proc.pid)
    output, _ = proc.communicate()
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    peaks = rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {output[-2000:]}")
    return seconds, cpu, peaks


def run_plain(target: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    seconds, cpu, peaks = run_process([sys.executable, str(PLAIN_SCRIPT), str(target), str(out), "--processes",
                                       str(workers)])
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_mb": peaks[:workers + 1]}


def run_command(target: Path, out: Path, workers: int, extra: list[str], tree: Path | None = None) -> dict:
    """The ``describe`` command on ``target``; ``tree``: the package of another checkout (e.g. an earlier revision,
    ``--baseline-tree``) run as ``python -m pipeline`` with this environment's dependencies."""
    from pipeline.core.outputs import Manifest

    shutil.rmtree(out, ignore_errors=True)
    args = ["describe", "--slides", str(target), "--out", str(out), "--workers", str(workers), *extra]
    if tree is None:
        seconds, cpu, peaks = run_process([str(BIN / "wsi-pipeline"), *args])
    else:
        seconds, cpu, peaks = run_process([sys.executable, "-m", "pipeline", *args],
                                          {**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
    manifest = Manifest(out)
    run = manifest.data["runs"][-1]
    tiles = sum(r.get("tiles", 0) for r in manifest.slides.values())
    # the run's own tiles: a slide described whole before the run (``plan_ahead``) is not in its ``seconds``
    run_tiles = tiles - run.get("tiles_described_before_run", 0)
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "run_seconds": run["seconds"],
            "tiles": tiles, "run_tiles": run_tiles, "done": run["done"],
            "failed": run["failed"], "tiles_per_s": round(tiles / seconds, 1), "peak_rss_mb": peaks[:workers + 1]}


def measure_floor(path: Path, config, max_tiles: int | None = 600) -> dict:
    """CPU seconds per tissue tile of reading + describing, one process (with the workers' malloc settings), over
    whole blocks of the slide (the fullest first, until ``max_tiles``; None: every tissue tile)."""
    from pipeline.core.local_workers import use_worker_malloc
    from pipeline.describe.descriptors import compute_descriptors
    from pipeline.describe.runner import load_kernels, prepare_slide
    from pipeline.slides.reader_choice import open_reader
    from pipeline.slides.tiling import TileGrid, iter_tile_batches

    use_worker_malloc()
    load_kernels(config)
    plan = prepare_slide(str(path), config)
    grid = TileGrid.from_dict(plan["grid"])
    tissue = plan["tissue_tiles"]
    blocks = sorted((b for b in grid.chunks(config.tiling.chunk_tiles) if tissue[b[0]:b[1], b[2]:b[3]].any()),
                    key=lambda b: -int(tissue[b[0]:b[1], b[2]:b[3]].sum()))
    tiles, cpu0 = 0, time.process_time()
    for b in blocks:
        with open_reader(str(path), plan["reader"]) as handle:
            for _, batch in iter_tile_batches(handle, grid, tissue[b[0]:b[1], b[2]:b[3]], b,
                                              config.descriptor.batch_tiles, str(path)):
                compute_descriptors(batch, config.descriptor)
                tiles += len(batch)
        if max_tiles is not None and tiles >= max_tiles:
            break
    return {"cpu_ms_per_tile": round((time.process_time() - cpu0) / tiles * 1e3, 3), "tiles_measured": tiles,
            "reader": plan["reader"]["kind"], "pixel_decode": plan["reader"].get("jpeg_scale", 1)}


def run_end_to_end(args, path: Path, tiles: int, config, result: dict) -> None:
    """Phases f, p, w, P, W (see the module docstring), interleaved over ``--repeat`` rounds; fastest run kept."""
    workers = result["machine"]["workers"]
    import yaml

    from pipeline.core.config import load_config

    extra = [f"--reader={args.reader}"] if args.reader else []
    settings = yaml.safe_load(args.config.read_text()) if args.config else {}
    if args.scaled_decode:
        settings.setdefault("reader", {})["scaled_decode"] = True
    if settings:
        merged = args.work_dir / "bench-config.yaml"
        merged.write_text(yaml.safe_dump(settings))
        extra += ["--config", str(merged)]
        config = load_config(merged).with_overrides(tiling__mpp=args.mpp, tiling__tile_px=args.tile_px)
    e2e: dict = {"workers": workers, "command_options": extra, "settings": settings}
    forced = args.work_dir / "bench-config-cluster.yaml"  # phase S: the local cluster started for one small slide
    forced.write_text(yaml.safe_dump({**settings, "cluster": {**settings.get("cluster", {}),
                                                              "one_block_in_process": False}}))
    extra_cluster = ([f"--reader={args.reader}"] if args.reader else []) + ["--config", str(forced)]
    floor_config = config.with_overrides(reader__kind=args.reader)
    folder = (small_slides_dir(args.work_dir, args.dir_slides, args.dir_seed)
              if any(k in args.phases for k in "PWsSO") else None)
    # Each run writes into a folder of its own, and nothing is removed before the benchmark ends: ext4 does not reuse
    # an inode freed within the last minutes, and finds a free one by checking each such inode in turn, so files
    # created right after thousands were deleted cost several times the kernel time (benchmarks/README.md, fifteenth
    # session). Removing one run's outputs before the next made the directory's ~1,500 new files and folders per run
    # pay for it.
    def out(name: str, rep: int) -> Path:
        return args.out_root / f"{name}-{rep + 1}"

    runs = {"s": ("command_one_small_slide", lambda rep: run_command(folder / "small-000.svs", out("cmd-one", rep),
                                                                     workers, extra)),
            "S": ("command_one_small_slide_cluster", lambda rep: run_command(folder / "small-000.svs",
                                                                             out("cmd-one-cluster", rep), workers,
                                                                             extra_cluster)),
            "p": ("plain_script", lambda rep: run_plain(path, out("plain", rep), workers)),
            "w": ("command", lambda rep: run_command(path, out("cmd", rep), workers, extra)),
            "P": ("plain_script_dir", lambda rep: run_plain(folder, out("plain-dir", rep), workers)),
            "W": ("command_dir", lambda rep: run_command(folder, out("cmd-dir", rep), workers, extra)),
            "o": ("baseline_command", lambda rep: run_command(path, out("base", rep), workers, [],
                                                              args.baseline_tree)),
            "O": ("baseline_command_dir", lambda rep: run_command(folder, out("base-dir", rep), workers, [],
                                                                  args.baseline_tree))}
    # The floor is measured before and after every command run whose run is set against it (w, W, s, S), over every
    # tissue tile: the machine's speed drifts by several percent within a minute, so each run gets the mean of the two
    # floors around it (the one after a run is the one before the next).
    floors: list[float] = []  # ms per tile, in the order measured
    floor_around: dict[str, list[tuple[int, int]]] = {}  # command -> (floor before, floor after) indices per run

    def measure() -> None:
        floors.append(measure_floor(path, floor_config, max_tiles=None)["cpu_ms_per_tile"])
        print(f"floor: {floors[-1]} ms per tile", file=sys.stderr, flush=True)

    for rep in range(args.repeat):
        for key, (name, fn) in runs.items():
            if key not in args.phases:
                continue
            bracketed = "f" in args.phases and key in "wWsS"
            if bracketed and not floors:
                measure()
            print(f"phase {key}: {name} (run {rep + 1}) ...", file=sys.stderr, flush=True)
            entry = fn(rep)
            print(f"  {json.dumps(entry)}", file=sys.stderr, flush=True)
            if bracketed:
                measure()
                floor_around.setdefault(name, []).append((len(floors) - 2, len(floors) - 1))
            best = e2e.get(name)
            all_runs = (best or {}).get("all_seconds", []) + [entry["seconds"]]
            all_run_seconds = (best or {}).get("all_run_seconds", []) + [entry.get("run_seconds")]
            if best is None or entry["seconds"] < best["seconds"]:
                best = entry
            best["all_seconds"] = all_runs
            if "run_seconds" in entry:  # the command's own summary (the plain script has none)
                best["all_run_seconds"] = all_run_seconds
            e2e[name] = best
    r = {}
    if "plain_script" in e2e and "command" in e2e:
        r["command_speedup_over_plain_script"] = round(e2e["plain_script"]["seconds"] / e2e["command"]["seconds"], 2)
    if "plain_script_dir" in e2e and "command_dir" in e2e:
        r["command_speedup_over_plain_script_dir"] = round(
            e2e["plain_script_dir"]["seconds"] / e2e["command_dir"]["seconds"], 2)
    for plain, command in (("plain_script", "command"), ("plain_script_dir", "command_dir")):
        if plain in e2e and command in e2e:  # CPU seconds of the process trees: steadier on a shared machine
            r[f"{command}_cpu_over_plain_cpu"] = round(e2e[command]["cpu_seconds"] / e2e[plain]["cpu_seconds"], 3)
    for base, command in (("baseline_command", "command"), ("baseline_command_dir", "command_dir")):
        if base in e2e and command in e2e:  # issue 14: describe (this tree, these settings) against an earlier one
            r[f"{command}_tiles_per_s_over_baseline"] = round(e2e[command]["tiles_per_s"] / e2e[base]["tiles_per_s"], 3)
    if floors:
        e2e["floor_per_tile"] = {"cpu_ms_per_tile": round(float(np.median(floors)), 3), "all_ms_per_tile": floors,
                                 "tiles_measured": tiles, "measured": "before and after each command run"}
        for name, around in floor_around.items():
            per_tile_by_run = [(floors[a] + floors[b]) / 2e3 for a, b in around]
            run_tiles = e2e[name].get("run_tiles", e2e[name]["tiles"])
            by_run = [round(run / (per_tile * run_tiles / workers), 3)
                      for run, per_tile in zip(e2e[name]["all_run_seconds"], per_tile_by_run)]
            floor = float(np.median(per_tile_by_run)) * e2e[name]["tiles"] / workers
            e2e[name]["floor_seconds"] = round(floor, 2)
            r[f"{name}_run_over_floor"] = round(float(np.median(by_run)), 2)
            r[f"{name}_run_over_floor_by_run"] = by_run
            r[f"{name}_whole_over_floor"] = round(e2e[name]["seconds"] / floor, 2)
            r[f"{name}_fixed_seconds"] = round(e2e[name]["seconds"] - floor, 2)
    if "command" in e2e and "command_dir" in e2e:
        # whole commands (the fastest of the rounds, start-up included on both sides), and the runs alone (median of
        # the rounds' own ``seconds``): the second is how issue 18 compared them (tiles/s of the runs)
        r["dir_tiles_per_s_over_slide"] = round(e2e["command_dir"]["tiles_per_s"] / e2e["command"]["tiles_per_s"], 3)
        run_tiles = {n: e2e[n].get("run_tiles", e2e[n]["tiles"]) for n in ("command_dir", "command")}
        run_rates = [run_tiles[n] / float(np.median(e2e[n]["all_run_seconds"])) for n in ("command_dir", "command")]
        r["dir_run_tiles_per_s_over_slide"] = round(run_rates[0] / run_rates[1], 3)
        # each round's directory run against the slide run just before it: the machine's speed drifts less within a
        # round than across an invocation
        r["dir_run_tiles_per_s_over_slide_by_round"] = [
            round((run_tiles["command_dir"] / d) / (run_tiles["command"] / w), 3)
            for w, d in zip(e2e["command"]["all_run_seconds"], e2e["command_dir"]["all_run_seconds"])]
    peaks = [max(e2e[n]["peak_rss_mb"]) for n in ("command", "command_dir") if n in e2e]
    if peaks:
        r["max_peak_rss_mb_per_process"] = max(peaks)
    r["targets"] = {"command_speedup": ">= 2.5", "run_over_floor": "<= 1.25", "dir_over_slide": ">= 0.85",
                    "peak_rss_mb": "< 1536"}
    e2e["ratios"] = r
    result["end_to_end"] = e2e


def run_cluster_phases(args, path, plan: dict, blocks: list, readers: dict, config, environ: dict,
                       megapixels: float, tiles: int, result: dict) -> None:
    """Phases a-d on one Dask LocalCluster (see the module docstring)."""
    import dask

    from pipeline.core.parallel import task_runner

    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), task_runner(config.cluster) as runner:
        pids = list(runner.client.run(os.getpid).values())
        # workers import the pipeline (and its codecs) before the clock starts
        runner.client.run(lambda: __import__("pipeline.describe.runner") and None)
        # ... and load the compiled kernels (numba's disk cache; compiled once per machine, seconds)
        runner.client.run(_load_kernels)
        phases = [
            ("a", "openslide_read", lambda: (run_read_phase(runner, str(path), plan, blocks, readers["openslide"]), {})),
            ("b", "tiff_read", lambda: (run_read_phase(runner, str(path), plan, blocks, readers["tiff"]), {})),
            ("c", "describe_openslide", lambda: run_describe_phase(
                runner, Path(path), args.out_root / "out-openslide", config.with_overrides(reader__kind="openslide"))),
            ("d", "describe_tiff", lambda: run_describe_phase(
                runner, Path(path), args.out_root / "out-tiff", config.with_overrides(reader__kind="tiff"))),
        ]
        for rep in range(args.repeat):
            for key, name, fn in phases:
                if key not in args.phases:
                    continue
                print(f"phase {key}: {name} (run {rep + 1}) ...", file=sys.stderr, flush=True)
                with RssSampler(pids) as rss:
                    seconds, record = fn()
                entry = {"seconds": round(seconds, 2), "megapixels_per_s": round(megapixels / seconds, 1),
                         "tiles_per_s": round(tiles / seconds, 1),
                         "worker_cpu_seconds": round(rss.cpu_seconds, 1),
                         "megapixels_per_cpu_s": round(megapixels / max(rss.cpu_seconds, 1e-9), 1),
                         "peak_rss_mb_per_worker": rss.peaks_mb()}
                if record:
                    entry["reader"] = record.get("reader")
                    entry["tiles"] = record.get("tiles")
                print(f"  {json.dumps(entry)}", file=sys.stderr, flush=True)
                best = result["phases"].get(name)
                runs = (best or {}).get("all_seconds", []) + [entry["seconds"]]
                peak = max([(best or {}).get("max_peak_rss_mb", 0.0), *entry["peak_rss_mb_per_worker"]])
                if best is None or entry["seconds"] < best["seconds"]:
                    best = entry
                best["all_seconds"] = runs
                best["max_peak_rss_mb"] = peak
                result["phases"][name] = best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, help="slide to use instead of the generated one")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/wsi-bench"),
                        help="where the generated slides are cached")
    parser.add_argument("--out-root", type=Path, default=None,
                        help="where the commands write their outputs, a folder per run (default: a fresh folder "
                             "in the system's temp folder, removed at the end). Best a folder where nothing was "
                             "deleted in the last minutes: ext4 skips recently freed inodes one by one when it "
                             "creates a file or folder, which the directory's ~1,500 per run feel and the slide's "
                             "few do not")
    parser.add_argument("--quick", action="store_true", help=f"a small {QUICK_SIZE[0]}x{QUICK_SIZE[1]} slide")
    parser.add_argument("--workers", type=int, default=None, help="Dask worker processes (default: one per core)")
    parser.add_argument("--mpp", type=float, default=0.5, help="target resolution (default 0.5 µm/px)")
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--descriptor", default="stats", choices=["stats", "cnn"])
    parser.add_argument("--phases", default="abcdfpwPWs", help="subset of the phases to run, e.g. 'ab' or 'fpw'")
    parser.add_argument("--dir-slides", type=int, default=50, help="small slides in the directory phases P and W")
    parser.add_argument("--dir-seed", type=int, default=100,
                        help="the directory's first slide seed, one more per slide (default 100: the cohort earlier "
                             "sessions tuned on; pass another for a fresh cohort)")
    parser.add_argument("--reader", default=None, help="the command's --reader (default: its own default)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a pipeline config file for the command and the floor (e.g. one with `qc: []`)")
    parser.add_argument("--scaled-decode", action="store_true",
                        help="the command with reader.scaled_decode (DCT-domain JPEG scaling), and the floor too")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a checkout of an earlier revision: phases o / O run its describe (its own defaults) on "
                             "the slide / directory, e.g. `git worktree add /tmp/base 7fc4360` (before QC and stain)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the phase sequence this many times (interleaved) and report each phase's fastest")
    args = parser.parse_args(argv)
    # The package's bytecode up to date, as an installed package has it (``make install`` compiles it too): with
    # PYTHONDONTWRITEBYTECODE set (as on our machines) an edited module is compiled again by every command.
    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "pipeline"), quiet=1)

    from pipeline.core.config import PipelineConfig
    from pipeline.core.local_workers import default_worker_count
    from pipeline.describe.runner import prepare_slide
    from pipeline.slides.open import read_slide_info
    from pipeline.slides.reader_choice import ReaderChoice
    from pipeline.slides.tiling import TileGrid

    args.work_dir.mkdir(parents=True, exist_ok=True)
    fresh_out = args.out_root is None
    if fresh_out:
        import tempfile

        args.out_root = Path(tempfile.mkdtemp(prefix="wsi-bench-out-"))
    path = args.slide or bench_slide(args.work_dir, args.quick)
    workers = args.workers or default_worker_count()
    config = PipelineConfig().with_overrides(tiling__mpp=args.mpp, tiling__tile_px=args.tile_px,
                                             descriptor__name=args.descriptor, cluster__workers=workers,
                                             cluster__dashboard=False)
    info = read_slide_info(path)
    warm_page_cache(Path(path))
    plan = prepare_slide(str(path), config.with_overrides(reader__kind="openslide"))
    grid = TileGrid.from_dict(plan["grid"])
    tissue = plan["tissue_tiles"]
    blocks = [b for b in grid.chunks(config.tiling.chunk_tiles) if tissue[b[0]:b[1], b[2]:b[3]].any()]
    tiles = int(tissue.sum())
    tile_lvl = grid.tile_l0_px / grid.read_downsample
    megapixels = tiles * tile_lvl * tile_lvl / 1e6
    readers = {kind: ReaderChoice(kind, kind, "benchmark", info.level_dimensions, info.level_downsamples).to_dict()
               for kind in ("openslide", "tiff")}

    result: dict = {
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count(), "python": platform.python_version(), "workers": workers,
                    "threads_per_worker": 1},
        "slide": {"path": str(path), "width_px": info.width_px, "height_px": info.height_px,
                  "gigapixels": round(info.width_px * info.height_px / 1e9, 3), "vendor": info.vendor,
                  "mpp": info.mpp, "levels": [list(d) for d in info.level_dimensions],
                  "file_mb": round(Path(path).stat().st_size / 2**20, 1)},
        "grid": {"target_mpp": args.mpp, "tile_px": args.tile_px, "read_level": grid.read_level,
                 "tile_px_at_read_level": round(tile_lvl, 2), "rows": grid.rows, "cols": grid.cols,
                 "tissue_tiles": tiles, "blocks": len(blocks), "megapixels": round(megapixels, 1),
                 "descriptor": args.descriptor},
        "phases": {},
    }

    import dask
    import distributed

    from pipeline.core.local_workers import WORKER_ENV

    # what the workers get: Dask's defaults plus the pipeline's own (pipeline.core.local_workers.WORKER_ENV)
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.update(WORKER_ENV)
    result["machine"]["worker_environ"] = {k: v for k, v in environ.items() if k.startswith("MALLOC")}
    result["machine"]["load_average_before"] = [round(v, 2) for v in os.getloadavg()]

    run_end_to_end(args, Path(path), tiles, config, result)
    if any(key in args.phases for key in "abcd"):
        run_cluster_phases(args, path, plan, blocks, readers, config, environ, megapixels, tiles, result)
    result["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]

    ph = result["phases"]
    ratios = {}
    if "openslide_read" in ph and "describe_openslide" in ph:
        ratios["describe_openslide_over_openslide_read_throughput"] = round(
            ph["describe_openslide"]["megapixels_per_s"] / ph["openslide_read"]["megapixels_per_s"], 3)
        ratios["target_describe_openslide_over_read"] = ">= 0.7"
    if "openslide_read" in ph and "describe_tiff" in ph:
        ratios["describe_tiff_time_over_openslide_read_time"] = round(
            ph["describe_tiff"]["seconds"] / ph["openslide_read"]["seconds"], 3)
        ratios["target_describe_tiff_time_over_read"] = "<= 0.4"
    if "openslide_read" in ph and "tiff_read" in ph:
        ratios["tiff_read_speedup_over_openslide_read"] = round(
            ph["openslide_read"]["seconds"] / ph["tiff_read"]["seconds"], 2)
    if "describe_openslide" in ph and "describe_tiff" in ph:
        ratios["describe_speedup_tiff_over_openslide"] = round(
            ph["describe_openslide"]["seconds"] / ph["describe_tiff"]["seconds"], 2)
    if "openslide_read" in ph and "describe_tiff" in ph:
        # the same ratio in worker CPU seconds: robust to other processes competing for the cores
        ratios["describe_tiff_cpu_over_openslide_read_cpu"] = round(
            ph["describe_tiff"]["worker_cpu_seconds"] / ph["openslide_read"]["worker_cpu_seconds"], 3)
    if "openslide_read" in ph and "describe_openslide" in ph:
        ratios["openslide_read_cpu_over_describe_openslide_cpu"] = round(
            ph["openslide_read"]["worker_cpu_seconds"] / ph["describe_openslide"]["worker_cpu_seconds"], 3)
    peaks = [p["max_peak_rss_mb"] for p in ph.values()]
    ratios["max_peak_rss_mb_per_worker"] = max(peaks) if peaks else None
    result["ratios"] = ratios
    result["versions"] = {"distributed": distributed.__version__, "numpy": np.__version__}
    try:
        import openslide
        import tifffile

        result["versions"].update(openslide=openslide.__library_version__, tifffile=tifffile.__version__)
    except Exception:  # noqa: BLE001
        pass
    try:
        result["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent, check=False).stdout.strip() or None
    except OSError:
        pass
    result["machine"]["out_root"] = str(args.out_root)
    if fresh_out:
        shutil.rmtree(args.out_root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
