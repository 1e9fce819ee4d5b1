"""The plain lab script describe is compared with (issue 18): what a lab writes in an afternoon with openslide-python.

Otsu on a thumbnail for tissue, a 256-px tile grid at 0.5 µm/px, each tissue tile read with ``read_region`` at 512
level-0 px and shrunk 2x, per-tile RGB mean and standard deviation, ``multiprocessing.Pool(2)``; one ``.npy`` of
features per slide. Deliberately not tuned: it is the baseline a user would otherwise have.

    python benchmarks/plain_openslide_script.py SLIDE_OR_DIR OUT_DIR [--processes 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import openslide
from skimage.filters import threshold_otsu

TILE_PX = 256
TARGET_MPP = 0.5
THUMB_DOWNSAMPLE = 32

_slide = None


def _open(path: str) -> None:
    global _slide
    _slide = openslide.OpenSlide(path)


def _tile_features(args) -> np.ndarray:
    path, x, y, size = args
    if _slide is None or _slide._filename != path:
        _open(path)
    region = _slide.read_region((x, y), 0, (size, size)).convert("RGB")
    tile = np.asarray(region.reduce(size // TILE_PX) if size // TILE_PX > 1 else region, dtype=np.float32)
    return np.concatenate([tile.mean(axis=(0, 1)), tile.std(axis=(0, 1))])


def tissue_tiles(path: str) -> tuple[list[tuple[int, int]], int]:
    """Level-0 top-left corners of the tiles that are at least half tissue (Otsu on the thumbnail's saturation)."""
    slide = openslide.OpenSlide(path)
    mpp = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, 0.25))
    size = int(round(TILE_PX * TARGET_MPP / mpp))
    width, height = slide.dimensions
    thumb = np.asarray(slide.get_thumbnail((width // THUMB_DOWNSAMPLE, height // THUMB_DOWNSAMPLE)).convert("HSV"))
    slide.close()
    saturation = thumb[..., 1]
    mask = saturation > threshold_otsu(saturation)
    sx, sy = mask.shape[1] / width, mask.shape[0] / height
    corners = []
    for y in range(0, height - size + 1, size):
        for x in range(0, width - size + 1, size):
            cell = mask[int(y * sy):int((y + size) * sy) + 1, int(x * sx):int((x + size) * sx) + 1]
            if cell.size and cell.mean() >= 0.5:
                corners.append((x, y))
    return corners, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slides", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    paths = sorted(args.slides.glob("*.svs")) if args.slides.is_dir() else [args.slides]
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    with multiprocessing.Pool(args.processes) as pool:
        for path in paths:
            corners, size = tissue_tiles(str(path))
            features = pool.map(_tile_features, [(str(path), x, y, size) for x, y in corners], chunksize=16)
            np.save(args.out / f"{path.stem}.npy", np.array(features, dtype=np.float32).reshape(-1, 6))
            total += len(corners)
    print(f"{len(paths)} slides, {total} tiles", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
