"""Tile encoders on CPU: tiles/s and peak memory of ``describe`` with each encoder kind on the same slide.

Each encoder runs in its own process (so its peak RSS is its own): ``describe_slides`` in-process (LocalRunner, one
process; onnxruntime, PyTorch and TensorFlow use every core for their own threads, ``stats`` one), end to end
(tissue mask, reading, resizing, encoding, Zarr store), then the encoder alone on 128 tiles already in memory.
Models have random weights (nothing is downloaded); speed does not depend on the weights.

    python benchmarks/encode_throughput.py                  # a 16000 x 12000 slide (19 % of the 1-Gpx one)
    python benchmarks/encode_throughput.py --full           # the 40000 x 25000 benchmark slide (slow on CPU)
    python benchmarks/encode_throughput.py --encoders stats,onnx:resnet50
    python benchmarks/encode_throughput.py --gpu            # on a GPU machine: describe vs. a PyTorch DataLoader loop

Encoders: ``stats``, ``keras:<keras.applications name>``, ``onnx:resnet50`` (timm's ResNet-50 exported once with
``torch.onnx.export``; needs torch + timm, or pass ``--onnx-model``), ``timm:<timm name>`` (needs torch + timm).
``--gpu`` runs ResNet-50 and ViT-B/16 (timm) through ``describe`` on the GPU and through a plain PyTorch DataLoader
loop over the same tissue tiles (OpenSlide reads in DataLoader workers, fp16 autocast) in the same run.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from _common import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when a script here is run)
from describe_throughput import FULL_SIZE  # noqa: E402

DEFAULT_ENCODERS = "stats,keras:MobileNetV2,keras:ResNet50,onnx:resnet50,timm:resnet50,timm:vit_base_patch16_224"
ENCODE_ONLY_TILES = 128
DEFAULT_SIZE = (16000, 12000)  # 0.19 gigapixel: 19 % of the 1-gigapixel benchmark slide, ~350 tissue tiles


def bench_slide(work_dir: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A synthetic slide of ``size`` (the benchmark slide's generator and settings), written once into ``work_dir``."""
    from sample_data.synthetic import SyntheticTissue, write_slide

    width, height = size
    path = work_dir / f"synthetic-{width}x{height}-seed{seed}.svs"
    if not path.exists():
        write_slide(path, SyntheticTissue(width, height, seed=seed, tissue_fraction=0.5), mpp=0.25,
                    maxworkers=os.cpu_count() or 1)
    return path


def descriptor_settings(encoder: str, onnx_model: Path | None) -> dict:
    kind, _, name = encoder.partition(":")
    if kind == "stats":
        return {"name": "stats"}
    if kind == "onnx":
        return {"name": "onnx", "model": str(onnx_model)}
    return {"name": kind, "model": name, "weights": None, "input_px": 224}


def export_onnx(name: str, path: Path) -> Path:
    """timm model ``name`` (random weights) exported to ONNX with a dynamic batch axis, once."""
    if path.exists():
        return path
    import timm
    import torch

    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    return path


def tissue_tiles(slide: Path, config, count: int) -> np.ndarray:
    """The first ``count`` tissue tiles of the slide at the tiling resolution (OpenSlide pixels)."""
    from pipeline.describe.runner import prepare_slide
    from pipeline.slides.reader_choice import open_reader
    from pipeline.slides.tiling import TileGrid, iter_tile_batches

    plan = prepare_slide(str(slide), config.with_overrides(descriptor__name="stats", descriptor__model=None),
                         {"feature_names": [], "identity": {}})
    grid = TileGrid.from_dict(plan["grid"])
    with open_reader(str(slide), None) as handle:
        batches = iter_tile_batches(handle, grid, plan["tissue_tiles"], (0, grid.rows, 0, grid.cols), count)
        return next(iter(batches))[1]


def run_one(args) -> dict:
    """One encoder in this process: describe end to end, then the encoder alone on tiles in memory."""
    from pipeline.core.config import PipelineConfig, config_from_dict
    from pipeline.core.parallel import LocalRunner
    from pipeline.describe.encoders import validate_encoder
    from pipeline.describe.runner import describe_slides

    settings = json.loads(args.one)
    data = PipelineConfig().model_dump(mode="json")  # not with_overrides: it skips None (weights: null = random)
    data["tiling"].update(mpp=args.mpp, tile_px=args.tile_px)
    data["descriptor"].update(settings)
    config = config_from_dict(data, source="benchmark")
    t0 = time.perf_counter()
    encoder = validate_encoder(config)
    build_s = time.perf_counter() - t0
    out = args.work_dir / "encode-out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = describe_slides([args.slide], out, config, runner=LocalRunner(), progress=False)
    seconds = time.perf_counter() - t0
    from pipeline.core.outputs import Manifest

    record = next(iter(Manifest(out).slides.values()))
    if summary["done"] != 1:
        raise RuntimeError(f"describe failed: {record}")
    tiles = tissue_tiles(args.slide, config, ENCODE_ONLY_TILES)
    encoder.encode(tiles[:8])  # warm-up (graph tracing, thread pools)
    t0 = time.perf_counter()
    batch = config.descriptor.batch_tiles
    for i in range(0, len(tiles), batch):
        encoder.encode(tiles[i:i + batch])
    encode_s = time.perf_counter() - t0
    return {"encoder": settings, "spec": {k: v for k, v in encoder.spec.identity().items() if k != "file_sha256"},
            "build_s": round(build_s, 2), "tiles": int(record["tiles"]), "describe_s": round(seconds, 2),
            "describe_tiles_per_s": round(record["tiles"] / seconds, 1),
            "encode_only_tiles_per_s": round(len(tiles) / encode_s, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)}


def dataloader_loop(slide: Path, config, model_name: str, batch: int) -> dict:
    """The reference: a plain PyTorch DataLoader over the same tissue tiles (OpenSlide in the loader's workers),
    resize + normalise + fp16 autocast on the GPU, the pooled features copied back to the host."""
    import openslide
    import timm
    import torch

    from pipeline.describe.runner import prepare_slide
    from pipeline.slides.tiling import TileGrid

    plan = prepare_slide(str(slide), config, {"feature_names": [], "identity": {}})
    grid = TileGrid.from_dict(plan["grid"])
    boxes = grid.tile_boxes_l0()[plan["tissue_tiles"]]
    level, ds = grid.read_level, grid.read_downsample
    size = int(round(grid.tile_l0_px / ds))

    class Tiles(torch.utils.data.Dataset):
        def __len__(self):
            return len(boxes)

        def __getitem__(self, i):
            if not hasattr(self, "slide"):
                self.slide = openslide.OpenSlide(str(slide))
            x, y = int(boxes[i][0]), int(boxes[i][1])
            region = self.slide.read_region((x, y), level, (size, size)).convert("RGB")
            return torch.from_numpy(np.asarray(region.resize((config.tiling.tile_px,) * 2)))

    model = timm.create_model(model_name, pretrained=False, num_classes=0).eval().cuda()
    mean = torch.tensor((0.485, 0.456, 0.406), device="cuda").view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device="cuda").view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(Tiles(), batch_size=batch, num_workers=os.cpu_count(), pin_memory=True)
    t0 = time.perf_counter()
    count = 0
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        for tiles in loader:
            x = tiles.cuda(non_blocking=True).permute(0, 3, 1, 2).float() / 255
            x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
            model((x - mean) / std).float().cpu()
            count += len(tiles)
    seconds = time.perf_counter() - t0
    return {"tiles": count, "seconds": round(seconds, 2), "tiles_per_s": round(count / seconds, 1)}


def run_gpu(args, base) -> dict:
    """ResNet-50 and ViT-B/16: describe (timm encoder, this process, read-ahead thread) vs. the DataLoader loop."""
    import sys as _sys

    out = {}
    for model in ("resnet50", "vit_base_patch16_224"):
        settings = {"name": "timm", "model": model, "weights": None, "input_px": 224}
        one = subprocess.run([_sys.executable, __file__, "--one", json.dumps(settings), "--slide", str(args.slide),
                              "--mpp", str(args.mpp), "--tile-px", str(args.tile_px), "--work-dir",
                              str(args.work_dir)], capture_output=True, text=True)
        if one.returncode:
            out[model] = {"error": one.stderr[-2000:]}
            continue
        describe = json.loads(one.stdout)
        loop = dataloader_loop(args.slide, base, model, base.descriptor.gpu_batch_tiles)
        out[model] = {"describe": describe, "dataloader_loop": loop,
                      "ratio": round(describe["describe_tiles_per_s"] / loop["tiles_per_s"], 3)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, help="slide to use instead of the generated one")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/wsi-bench"))
    parser.add_argument("--full", action="store_true", help="the 40000 x 25000 (1-gigapixel) benchmark slide")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile-px", type=int, default=256)
    parser.add_argument("--encoders", default=DEFAULT_ENCODERS, help=f"comma-separated (default {DEFAULT_ENCODERS})")
    parser.add_argument("--onnx-model", type=Path, help="ONNX encoder for onnx:* (default: timm resnet50 exported)")
    parser.add_argument("--gpu", action="store_true", help="GPU comparison against a PyTorch DataLoader loop")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one encoder's settings as JSON
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.slide = args.slide or bench_slide(args.work_dir, FULL_SIZE if args.full else DEFAULT_SIZE)
    if args.one:
        result = run_one(args)
        print(json.dumps(result))
        return result

    from pipeline.core.config import PipelineConfig
    from pipeline.slides.open import read_slide_info

    info = read_slide_info(args.slide)
    result: dict = {
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "load_average_before": [round(v, 2) for v in os.getloadavg()]},
        "slide": {"path": str(args.slide), "width_px": info.width_px, "height_px": info.height_px,
                  "gigapixels": round(info.width_px * info.height_px / 1e9, 3),
                  "fraction_of_1_gigapixel_slide": round(info.width_px * info.height_px / (40000 * 25000), 3)},
        "tiling": {"mpp": args.mpp, "tile_px": args.tile_px},
        "encoders": {},
    }
    for encoder in args.encoders.split(","):
        onnx_model = args.onnx_model
        if encoder.startswith("onnx") and onnx_model is None:
            try:
                onnx_model = export_onnx(encoder.partition(":")[2] or "resnet50",
                                         args.work_dir / f"{encoder.partition(':')[2] or 'resnet50'}.onnx")
            except ImportError as err:
                result["encoders"][encoder] = {"skipped": f"no ONNX model to run ({err}); pass --onnx-model"}
                continue
        settings = descriptor_settings(encoder, onnx_model)
        one = subprocess.run([sys.executable, __file__, "--one", json.dumps(settings), "--slide", str(args.slide),
                              "--mpp", str(args.mpp), "--tile-px", str(args.tile_px), "--work-dir", str(args.work_dir)],
                             capture_output=True, text=True)
        result["encoders"][encoder] = (json.loads(one.stdout.strip().splitlines()[-1]) if one.returncode == 0
                                       else {"error": one.stderr.strip().splitlines()[-1:]})
        print(f"{encoder}: {result['encoders'][encoder]}", file=sys.stderr, flush=True)
    if args.gpu:
        base = PipelineConfig().with_overrides(tiling__mpp=args.mpp, tiling__tile_px=args.tile_px)
        result["gpu"] = run_gpu(args, base)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
