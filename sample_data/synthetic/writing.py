"""Writing synthetic slides: pyramidal tiled JPEG TIFFs (Aperio-style or generic), streamed tile by tile, and flat
images.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .noise import RENDER_VERSION
from .tissue import SyntheticTissue


def slide_levels(width_px: int, height_px: int, levels: Sequence[float] = (1, 4, 16),
                 tile_px: int = 256) -> list[tuple[float, int, int]]:
    """(downsample, width, height) of the pyramid levels :func:`write_slide` writes.

    Level k has size ``(W // ds, H // ds)``; a level (other than the first) whose width and height are both
    smaller than one tile is skipped.
    """
    out = []
    for i, ds in enumerate(levels):
        lw, lh = int(width_px // ds), int(height_px // ds)
        if i == 0:
            if ds != 1:
                raise ValueError("the first level must have downsample 1")
            out.append((1.0, width_px, height_px))
            continue
        if lw < 1 or lh < 1 or (lw < tile_px and lh < tile_px):
            continue
        out.append((float(ds), lw, lh))
    return out


def _tiles(tissue: SyntheticTissue, lw: int, lh: int, ds: float, tile: int) -> Iterator[np.ndarray]:
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            # full tiles (the renderer is defined beyond the edge; better JPEG edges than zero padding)
            yield tissue.render(tx, ty, tile, tile, downsample=ds)


def atomic_target(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.partial")


def write_slide(path: str | os.PathLike, tissue: SyntheticTissue, *, mpp: float | None = 0.25,
                levels: Sequence[float] = (1, 4, 16), tile_px: int = 256, quality: int = 85,
                style: str = "aperio", objective_power: float | None = 40, maxworkers: int = 1,
                bigtiff: bool | None = None) -> Path:
    """Write ``tissue`` as a pyramidal tiled JPEG TIFF (one tiled page per level), streaming tile by tile.

    style="aperio": Aperio-style ImageDescription on every level page (OpenSlide vendor "aperio",
    openslide.mpp-x = mpp, openslide.objective-power = objective_power).  style="generic": plain pyramidal
    TIFF with resolution tags in centimetres (OpenSlide vendor "generic-tiff", mpp from the tags).
    mpp=None: no MPP in the description and resolution unit NONE, so OpenSlide reports no mpp.
    The file is written to a temporary name in the same directory and renamed into place.
    ``maxworkers`` = JPEG encoding threads in tifffile (rendering stays in the calling thread).
    """
    import tifffile

    path = Path(path)
    if style not in ("aperio", "generic"):
        raise ValueError("style must be 'aperio' or 'generic'")
    if tile_px % 16:
        raise ValueError("tile_px must be a multiple of 16")
    lv = slide_levels(tissue.width_px, tissue.height_px, levels, tile_px)
    w0, h0 = tissue.width_px, tissue.height_px
    if bigtiff is None:
        bigtiff = w0 * h0 * 3 > 2**31  # classic TIFF is plenty for small slides
    tmp = atomic_target(path)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for i, (ds, lw, lh) in enumerate(lv):
                kw: dict = {}
                if style == "aperio":
                    desc = (f"Aperio Image Library v12.0.5\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile_px}x{tile_px})"
                            + (f" -> {lw}x{lh}" if i else "") + f" JPEG/RGB Q={quality}")
                    if i == 0:
                        if objective_power is not None:
                            desc += f"|AppMag = {objective_power:g}"
                        if mpp is not None:
                            desc += f"|MPP = {mpp:g}"
                        desc += f"|Filename = {path.stem}|Synthetic = 1|Seed = {tissue.seed}"
                        desc += f"|Spec = {slide_spec(tissue, mpp, levels, tile_px, quality)}"
                    kw["description"] = desc
                if mpp is not None and style == "generic":
                    m = mpp * ds
                    kw["resolution"] = (1e4 / m, 1e4 / m)
                    kw["resolutionunit"] = "CENTIMETER"
                else:
                    kw["resolution"] = (1, 1)
                    kw["resolutionunit"] = "NONE"
                tif.write(
                    _tiles(tissue, lw, lh, ds, tile_px),
                    shape=(lh, lw, 3),
                    dtype="uint8",
                    tile=(tile_px, tile_px),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": int(quality)},
                    subfiletype=1 if i else 0,
                    metadata=None,
                    maxworkers=maxworkers,
                    software=False,
                    **kw,
                )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_flat_image(path: str | os.PathLike, tissue: SyntheticTissue, *, fmt: str = "png",
                     downsample: float = 1.0, quality: int = 90) -> Path:
    """Write a small plain (non-pyramidal, untiled) image of the whole slide: PNG, JPEG or strip TIFF."""
    path = Path(path)
    fmt = fmt.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in ("png", "jpeg", "tiff", "tif"):
        raise ValueError("fmt must be 'png', 'jpeg' or 'tiff'")
    w = max(1, int(tissue.width_px // downsample))
    h = max(1, int(tissue.height_px // downsample))
    if w * h > 200_000_000:
        raise ValueError("write_flat_image is for small images (< 200 Mpx)")
    img = tissue.render(0, 0, w, h, downsample=downsample)
    buf = io.BytesIO()
    if fmt in ("tiff", "tif"):
        import tifffile

        tifffile.imwrite(buf, img, photometric="rgb", metadata=None)
    else:
        from PIL import Image

        if fmt == "png":
            Image.fromarray(img).save(buf, format="PNG")
        else:
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    tmp = atomic_target(path)
    try:
        with open(tmp, "xb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def slide_spec(tissue: SyntheticTissue, mpp: float | None, levels: Sequence[float], tile_px: int,
               quality: int) -> str:
    """Digest of everything that shapes a written Aperio-style slide (stored in its description as ``Spec``)."""
    payload = {"tissue": [tissue.width_px, tissue.height_px, tissue.seed, tissue.lesion, tissue.tissue_fraction,
                          tissue.lesion_fraction],
               "mpp": mpp, "levels": [float(x) for x in levels], "tile_px": tile_px, "quality": quality}
    if synthetic_base(tissue) is not None:  # slides of an earlier renderer are rewritten
        payload["render"] = RENDER_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def synthetic_base(tissue) -> SyntheticTissue | None:
    """The ``SyntheticTissue`` under wrappers (``StainBatch.tissue``, ``ArtefactTissue.base``), or None."""
    for _ in range(8):
        if isinstance(tissue, SyntheticTissue):
            return tissue
        tissue = getattr(tissue, "base", None) or getattr(tissue, "tissue", None)
        if tissue is None:
            return None
    return None


def written_spec(path: Path) -> str | None:
    """The ``Spec`` a slide was written with (None: not ours, unreadable, or written before specs were stored)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            fields = dict(part.split(" = ", 1) for part in (tf.pages[0].description or "").split("|")[1:]
                          if " = " in part)
        return fields.get("Spec")
    except Exception:
        return None
