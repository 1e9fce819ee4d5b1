"""Peak memory and time of writing one slide's CAM outputs (overlay PNG, pyramidal heatmap TIFF, GeoJSON).

Builds (cached in ``--work-dir``, default ``/tmp/wsi-bench-cam``) a fake slide store for a 4-gigapixel slide without
any slide file: 80000 x 50000 level-0 px at 0.25 µm/px, a tile grid at 0.5 µm/px with 256-px tiles (512 level-0 px,
156 x 97 cells), a ``cam`` grid with a few smooth hot blobs on an elliptical "tissue" region and NaN elsewhere, and a
thumbnail at ``mask_downsample`` 32 (2500 x 1562 x 3). Then runs ``pipeline.heatmaps.render_slide_outputs`` on it, as the
``cam`` command's workers do, in a fresh child process (its own interpreter) and reports:

* ``peak_rss_mb``: the child's peak resident memory (``VmHWM``; it is reset before each of the three outputs, via
  ``/proc/self/clear_refs``, so that ``phases`` gives each output's own peak, and ``peak_rss_mb`` is the highest of
  them and of what came before). It includes the interpreter and every import of the task: ``import_rss_mb`` is
  the part taken before any output is written. The task lives in ``pipeline.cam.heatmaps`` and imports no
  Keras; ``--with-keras`` is the what-if of a process that also imported Keras/TensorFlow (~480 MB).
  ``sampled_rss_mb`` (psutil from the parent every 20 ms) is an independent cross-check;
* ``seconds`` (wall time of ``render_slide_outputs``), ``cpu_seconds``, and a per-output breakdown;
* ``tiff_mb``, ``png_kb``, ``geojson_kb``; the TIFF is opened with OpenSlide: ``dims_ok`` (level 0 is the slide's
  size), ``level_count``, and ``colour_ok`` (the pixel at the hottest cell's centre has that score's colormap colour,
  within JPEG error, and a background pixel is white).

Target (the issue): peak RSS under 1 GB (``target_rss_mb`` 1024) for a 4-gigapixel slide. ``ok`` is true when the
target is met and every check passed.

    python benchmarks/cam_outputs_memory.py                  # 80000 x 50000 (4.0 gigapixels)
    python benchmarks/cam_outputs_memory.py --quick          # 40000 x 25000 (1.0 gigapixel)
    python benchmarks/cam_outputs_memory.py --width 120000 --height 90000
    python benchmarks/cam_outputs_memory.py --with-keras     # what-if: Keras/TensorFlow imported too

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from _common import cpu_model  # benchmarks/ is on sys.path when a script here is run

FULL_SIZE = (80000, 50000)   # 4.0 gigapixels at level 0
QUICK_SIZE = (40000, 25000)  # 1.0 gigapixel
SLIDE_MPP = 0.25
TARGET_MPP = 0.5
TILE_PX = 256
MASK_DOWNSAMPLE = 32.0
TIFF_TILE_PX = 256           # the default cam.tiff_tile_px
THRESHOLD = 0.6              # the default cam.hot_threshold
TARGET_RSS_MB = 1024


# --- the fake slide store -------------------------------------------------------------------------------------------



def bench_grid(width: int, height: int):
    from pipeline.slides.tiling import TileGrid

    ds = TARGET_MPP / SLIDE_MPP
    tile_l0 = TILE_PX * ds
    return TileGrid(slide_width_px=width, slide_height_px=height, slide_mpp=SLIDE_MPP, target_mpp=TARGET_MPP,
                    tile_px=TILE_PX, stride_px=TILE_PX, rows=int(height // tile_l0), cols=int(width // tile_l0),
                    tile_l0_px=tile_l0, stride_l0_px=tile_l0, read_level=0, read_downsample=1.0)


def tissue_region(rows: int, cols: int) -> np.ndarray:
    """An ellipse covering ~60% of the grid, with a notch: where the fake slide has tissue."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    inside = ((yy - cy) / (0.46 * rows)) ** 2 + ((xx - cx) / (0.46 * cols)) ** 2 <= 1.0
    notch = ((yy - 0.15 * rows) / (0.12 * rows)) ** 2 + ((xx - 0.5 * cols) / (0.12 * cols)) ** 2 <= 1.0
    return inside & ~notch


def fake_cam(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A CAM in [0, 1]: a low smooth background plus a few Gaussian hot blobs, NaN off the tissue."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cam = 0.08 + 0.05 * np.sin(xx / max(cols, 1) * 7.0) * np.cos(yy / max(rows, 1) * 5.0)
    blobs = [(0.35, 0.30, 0.07, 1.0), (0.62, 0.68, 0.10, 0.85), (0.70, 0.25, 0.05, 0.7), (0.45, 0.80, 0.04, 0.65)]
    for fy, fx, fs, amp in blobs:
        sigma = fs * min(rows, cols)
        cam += amp * np.exp(-(((yy - fy * rows) ** 2 + (xx - fx * cols) ** 2) / (2 * sigma ** 2)))
    cam += rng.normal(0, 0.01, cam.shape)
    cam = np.clip(cam / cam.max(), 0, 1).astype(np.float32)
    cam[~tissue_region(rows, cols)] = np.nan
    return cam


def fake_thumbnail(width: int, height: int) -> np.ndarray:
    """A pinkish 'tissue' thumbnail on a near-white background, built in row strips."""
    tw, th = int(np.ceil(width / MASK_DOWNSAMPLE)), int(np.ceil(height / MASK_DOWNSAMPLE))
    thumb = np.empty((th, tw, 3), dtype=np.uint8)
    thumb[...] = (242, 240, 244)
    yy, xx = np.mgrid[0:th, 0:tw]
    cy, cx = (th - 1) / 2, (tw - 1) / 2
    inside = ((yy - cy) / (0.46 * th)) ** 2 + ((xx - cx) / (0.46 * tw)) ** 2 <= 1.0
    shade = (20 * np.sin(xx / 17.0) * np.cos(yy / 13.0)).astype(np.int16)
    for c, base in enumerate((214, 150, 190)):
        thumb[..., c] = np.where(inside, np.clip(base + shade, 0, 255), thumb[..., c])
    return thumb


def build_store(work_dir: Path, width: int, height: int) -> tuple[Path, str]:
    """The fake store ``<work_dir>/slides/<id>.zarr`` (rebuilt when missing or incomplete)."""
    import zarr

    from pipeline.core.store import read_attrs, store_path, write_array

    slide_id = f"bench-{width}x{height}"
    path = store_path(work_dir, slide_id)
    attrs = read_attrs(path)
    if attrs and attrs.get("complete") and (path / "cam" / "zarr.json").exists():
        return path, slide_id
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = bench_grid(width, height)
    thumb = fake_thumbnail(width, height)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("thumbnail", data=thumb, chunks=(min(1024, thumb.shape[0]), min(1024, thumb.shape[1]), 3))
    group.attrs.update({
        "slide_id": slide_id, "slide_path": f"(none: fake {width}x{height} slide for the benchmark)",
        "tile_grid": grid.to_dict(), "grid_shape": [grid.rows, grid.cols], "mask_downsample": MASK_DOWNSAMPLE,
        "complete": False,
    })
    cam = fake_cam(grid.rows, grid.cols)
    write_array(path, "cam", cam, attrs={"cam_hash": "benchmark", "layer": "mixed7", "class_index": 1,
                                         "class_label": "tumor", "probabilities": [0.1, 0.9],
                                         "fill_value": "NaN where no tissue"})
    group.attrs.update({"complete": True})
    return path, slide_id


# --- the child: render the outputs and report its own memory --------------------------------------------------------


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), to measure one phase's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(store: str, out_dir: str, slide_id: str, with_keras: bool = False) -> None:
    """Run ``render_slide_outputs`` once in this (fresh) process; print one JSON line about it."""
    if with_keras:
        # what-if: a process that also ran Grad-CAM holds: Keras/TensorFlow imported (workers of `cam` do not import it:
        # the render task lives in pipeline.cam.heatmaps)
        import pipeline.model.batches  # noqa: F401  (imports Keras, as the Grad-CAM model code does when it runs)
    # everything the task imports, before it runs: the interpreter's baseline for this work
    import matplotlib  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import skimage.measure  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    import pipeline.cam.heatmaps as heatmaps

    import_rss_kb = _vm_kb("VmRSS")
    peak = {"kb": _vm_kb("VmHWM")}
    phases: dict[str, dict] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            peak["kb"] = max(peak["kb"], _vm_kb("VmHWM"))
            before = _vm_kb("VmRSS")
            reset = _reset_peak()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                hwm = _vm_kb("VmHWM")
                peak["kb"] = max(peak["kb"], hwm)
                phases[name] = {"seconds": round(time.perf_counter() - t0, 2), "rss_before_mb": round(before / 1024, 1),
                                "peak_rss_mb": round(hwm / 1024, 1) if reset else None}
        return wrapper

    # render_slide_outputs imports these from pipeline.cam.heatmaps when it runs: time each one, and its own peak
    heatmaps.save_overlay_png = timed("overlay_png", heatmaps.save_overlay_png)
    heatmaps.write_heatmap_tiff = timed("heatmap_tiff", heatmaps.write_heatmap_tiff)
    heatmaps.write_hot_regions_geojson = timed("geojson", heatmaps.write_hot_regions_geojson)

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    targets = {ext: Path(out_dir) / "cam" / f"{slide_id}.{ext}" for ext in ("png", "tiff", "geojson")}
    paths = heatmaps.render_slide_outputs(store, targets, THRESHOLD, TIFF_TILE_PX,
                                          f"{slide_id}: true tumor / predicted tumor (p=0.90)")
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak["kb"] = max(peak["kb"], _vm_kb("VmHWM"))
    print(json.dumps({
        "paths": paths, "seconds": seconds,
        "cpu_seconds": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        # VmHWM is reset per phase; the peak is the highest of the phases' and what came before them
        "peak_rss_kb": peak["kb"], "import_rss_kb": import_rss_kb,
        "keras_imported": "keras" in sys.modules, "phases": phases,
    }), flush=True)


class RssSampler(threading.Thread):
    """The child's RSS every ``interval`` seconds (psutil), as a cross-check of its own peak."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - the child exiting
                return
            self.stop.wait(self.interval)


def run_child(store: Path, out_dir: Path, slide_id: str, with_keras: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(store), str(out_dir), slide_id]
    if with_keras:
        cmd.append("--with-keras")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampler = None
    try:
        sampler = RssSampler(proc.pid)
        sampler.start()
    except Exception:  # noqa: BLE001 - psutil missing: rely on the child's own figures
        sampler = None
    out, _ = proc.communicate()
    if sampler is not None:
        sampler.stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"the child failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["sampled_rss_kb"] = sampler.peak // 1024 if sampler is not None else None
    return result


# --- checks ---------------------------------------------------------------------------------------------------------


def check_tiff(path: Path, store: Path, width: int, height: int) -> dict:
    import openslide

    from pipeline.cam.heatmaps import CMAP_NAME
    from pipeline.core.pictures import colormap_lut
    from pipeline.core.store import read_array

    grid = bench_grid(width, height)
    cam = read_array(store, "cam")
    lut = colormap_lut(CMAP_NAME)
    r, c = np.unravel_index(np.nanargmax(cam), cam.shape)
    hot_xy = (int(c * grid.stride_l0_px + grid.tile_l0_px / 2), int(r * grid.stride_l0_px + grid.tile_l0_px / 2))
    expected = lut[int(np.clip(cam[r, c] * 255 + 0.5, 0, 255))]
    bg_xy = (int(grid.tile_l0_px / 2), int(grid.tile_l0_px / 2))  # the top-left cell: off the tissue ellipse
    assert not np.isfinite(cam[0, 0])
    with openslide.OpenSlide(str(path)) as slide:
        dims = slide.dimensions
        levels = slide.level_count
        level_dims = [list(d) for d in slide.level_dimensions]
        mpp = float(slide.properties.get("openslide.mpp-x", "nan"))
        hot = np.asarray(slide.read_region(hot_xy, 0, (1, 1)))[0, 0, :3].astype(int)
        bg = np.asarray(slide.read_region(bg_xy, 0, (1, 1)))[0, 0, :3].astype(int)
        # the coarsest level shows the blob too (pyramid levels are rendered from the grid, not from level 0)
        ds = slide.level_downsamples[-1]
        low = np.asarray(slide.read_region(hot_xy, levels - 1, (1, 1)))[0, 0, :3].astype(int)
    hot_err = int(np.abs(hot - expected.astype(int)).max())
    low_err = int(np.abs(low - expected.astype(int)).max())
    return {
        "dims": list(dims), "dims_ok": tuple(dims) == (width, height), "level_count": levels,
        "level_dimensions": level_dims, "mpp_ok": abs(mpp - SLIDE_MPP) < 1e-3 * SLIDE_MPP,
        "hot_pixel": {"xy": list(hot_xy), "score": round(float(cam[r, c]), 3), "expected_rgb": expected.tolist(),
                      "rgb": hot.tolist(), "max_err": hot_err, "coarsest_level_rgb": low.tolist(),
                      "coarsest_level_downsample": ds},
        "background_rgb": bg.tolist(),
        "colour_ok": hot_err < 12 and low_err < 24 and int(np.abs(bg - 255).max()) < 12,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=None, help=f"level-0 width (default {FULL_SIZE[0]})")
    parser.add_argument("--height", type=int, default=None, help=f"level-0 height (default {FULL_SIZE[1]})")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_SIZE[0]}x{QUICK_SIZE[1]} (1-gigapixel) slide")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/wsi-bench-cam"),
                        help="where the fake store is cached and the outputs are written")
    parser.add_argument("--with-keras", action="store_true",
                        help="what-if: the child also imports Keras/TensorFlow, as a process that "
                             "ran Grad-CAM itself would")
    args = parser.parse_args(argv)
    width, height = QUICK_SIZE if args.quick else FULL_SIZE
    width, height = args.width or width, args.height or height

    args.work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store, slide_id = build_store(args.work_dir, width, height)
    build_s = time.perf_counter() - t0
    out_dir = args.work_dir / f"out-{width}x{height}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)

    res = run_child(store, out_dir, slide_id, args.with_keras)
    paths = {k: Path(v) for k, v in res["paths"].items()}
    checks = check_tiff(paths["tiff"], store, width, height)
    geo = json.loads(paths["geojson"].read_text())
    grid = bench_grid(width, height)
    peak_mb = res["peak_rss_kb"] / 1024
    result = {
        "slide_px": [width, height], "gigapixels": round(width * height / 1e9, 2),
        "grid_cells": [grid.rows, grid.cols], "tiff_tile_px": TIFF_TILE_PX,
        "peak_rss_mb": round(peak_mb, 1),
        "import_rss_mb": round(res["import_rss_kb"] / 1024, 1), "keras_imported": res["keras_imported"],
        "sampled_rss_mb": round(res["sampled_rss_kb"] / 1024, 1) if res["sampled_rss_kb"] is not None else None,
        "seconds": round(res["seconds"], 2), "cpu_seconds": round(res["cpu_seconds"], 2),
        "phases": res["phases"],
        "tiff_mb": round(paths["tiff"].stat().st_size / 2**20, 1),
        "png_kb": round(paths["png"].stat().st_size / 1024, 1),
        "geojson_kb": round(paths["geojson"].stat().st_size / 1024, 1),
        "hot_regions": len(geo["features"]),
        **checks,
        "target_rss_mb": TARGET_RSS_MB,
        "store_build_s": round(build_s, 2),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg": [round(x, 2) for x in os.getloadavg()]},
    }
    result["ok"] = bool(peak_mb < TARGET_RSS_MB and checks["dims_ok"] and checks["colour_ok"]
                        and checks["mpp_ok"] and result["hot_regions"] >= 1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:5], with_keras="--with-keras" in sys.argv[5:])
    else:
        sys.exit(0 if main()["ok"] else 1)
