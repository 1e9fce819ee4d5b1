"""Slide artefacts for testing QC and annotations: marker-pen strokes, out-of-focus regions, QuPath GeoJSON.

``ArtefactTissue`` wraps any generated tissue (``TexturedTissue``, ``SyntheticTissue``, or ``ImageTissue`` over real
pixels) and renders it with

* pen strokes: thick, curvy, semi-transparent marker (blue, green, black, red) laid on like ink, by multiplying the
  light through the slide (``rgb * (1 - a + a * ink)``), with streaks along the stroke and soft edges;
* out-of-focus regions: warped ellipses where the slide is Gaussian-blurred (sigma 2-4 px at level 0), feathered.

Ground truth comes with it: ``ink_fraction_at_tiles`` / ``blur_fraction_at_tiles`` (share of each tile covered) and
``annotations_geojson`` (a QuPath 0.4+ FeatureCollection in level-0 pixels: a ``Tumor`` outline around the planted
lesion and an ``Exclude`` region on tissue away from it).  Deterministic from ``seed``.  Rendered region by region
like the base (no whole-slide image in memory).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INKS = {  # transmittance of each marker colour (light that passes through the ink), per RGB channel
    "blue": (0.22, 0.38, 0.85),
    "green": (0.25, 0.68, 0.42),
    "black": (0.16, 0.16, 0.18),
    "red": (0.88, 0.18, 0.22),
}
LOW = 4  # artefact fields are drawn at 1/LOW of level 0 and interpolated up


@dataclass(frozen=True)
class PenStroke:
    colour: str
    centre: tuple[float, float]      # of the arc the stroke follows (level-0 px)
    radius_px: float                 # of that arc
    start_rad: float
    span_rad: float
    width_px: float                  # stroke width (level-0 px)
    opacity: float


@dataclass(frozen=True)
class BlurRegion:
    centre: tuple[float, float]
    radii_px: tuple[float, float]
    angle_rad: float
    sigma_px: float


class ImageTissue:
    """Real pixels (an RGB array, level 0) in the interface ``write_slide`` renders from."""

    def __init__(self, rgb: np.ndarray, seed: int = 0, background=(240, 238, 242)):
        self.rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
        self.height_px, self.width_px = self.rgb.shape[:2]
        self.seed, self.lesion, self.tissue_fraction, self.lesion_fraction = int(seed), False, 0.5, None
        self.background = background

    def render(self, x0: int, y0: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        return render_from_image(self.rgb, x0, y0, w, h, downsample, self.background)


def render_from_image(image: np.ndarray, x0: int, y0: int, w: int, h: int, downsample: float,
                      background=(240, 238, 242)) -> np.ndarray:
    """uint8 (h, w, 3) of ``image`` (level 0) at ``downsample``: each output pixel the mean of its level-0 box."""
    ds = float(downsample)
    ex = np.floor((int(x0) + np.arange(w + 1)) * ds).astype(np.int64)
    ey = np.floor((int(y0) + np.arange(h + 1)) * ds).astype(np.int64)
    cw, ch = int(ex[-1] - ex[0]), int(ey[-1] - ey[0])
    crop = np.empty((ch, cw, 3), np.uint8)
    crop[:] = background
    H, W = image.shape[:2]
    xa, ya, xb, yb = max(ex[0], 0), max(ey[0], 0), min(ex[-1], W), min(ey[-1], H)
    if xb > xa and yb > ya:
        crop[ya - ey[0]:yb - ey[0], xa - ex[0]:xb - ex[0]] = image[ya:yb, xa:xb]
    if ds == 1.0:
        return crop
    s = np.add.reduceat(np.add.reduceat(crop.astype(np.uint32), ey[:-1] - ey[0], 0), ex[:-1] - ex[0], 1)
    n = (np.diff(ey)[:, None] * np.diff(ex)[None, :])[..., None].astype(np.uint32)
    return ((s + n // 2) // n).astype(np.uint8)


def plan_artefacts(width_px: int, height_px: int, seed: int, pens: int = 1, blurs: int = 1,
                   colours: tuple[str, ...] = tuple(INKS)) -> tuple[list[PenStroke], list[BlurRegion]]:
    """Random strokes (arcs circling part of the slide, as a pathologist marks a region) and blur regions."""
    rng = np.random.default_rng([seed, 0xA27])
    s = float(min(width_px, height_px))
    strokes = []
    for _ in range(pens):
        strokes.append(PenStroke(
            colour=str(rng.choice(colours)),
            centre=(float(rng.uniform(0.3, 0.7) * width_px), float(rng.uniform(0.3, 0.7) * height_px)),
            radius_px=float(rng.uniform(0.22, 0.38) * s), start_rad=float(rng.uniform(0, 2 * math.pi)),
            span_rad=float(rng.uniform(0.6, 1.4) * math.pi), width_px=float(rng.uniform(0.04, 0.08) * s),
            opacity=float(rng.uniform(0.6, 0.85))))
    regions = []
    for _ in range(blurs):
        regions.append(BlurRegion(
            centre=(float(rng.uniform(0.3, 0.7) * width_px), float(rng.uniform(0.3, 0.7) * height_px)),
            radii_px=(float(rng.uniform(0.12, 0.2) * s), float(rng.uniform(0.1, 0.16) * s)),
            angle_rad=float(rng.uniform(0, math.pi)), sigma_px=float(rng.uniform(2.0, 4.0))))
    return strokes, regions


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return f / (f.std() + 1e-9)


def stroke_alpha(stroke: PenStroke, shape_low: tuple[int, int], seed: int) -> np.ndarray:
    """Ink opacity (0..1) of one stroke on the 1/LOW lattice: a wobbly arc, width varying along it, streaks."""
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng([seed, 0xB1])
    h, w = shape_low
    t = np.linspace(0.0, 1.0, 4000)
    wobble = 1.0 + 0.12 * np.sin(2 * math.pi * (rng.uniform(1, 3) * t + rng.uniform(0, 1)))
    ang = stroke.start_rad + stroke.span_rad * t
    x = (stroke.centre[0] + stroke.radius_px * wobble * np.cos(ang)) / LOW
    y = (stroke.centre[1] + stroke.radius_px * wobble * np.sin(ang)) / LOW
    half = stroke.width_px / 2 / LOW * (0.8 + 0.2 * np.sin(2 * math.pi * (2 * t + rng.uniform(0, 1))))
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    line = np.ones((h, w), bool)
    idx = np.full((h, w), -1, np.int64)
    xi, yi = x[inside].astype(int), y[inside].astype(int)
    line[yi, xi] = False
    idx[yi, xi] = np.flatnonzero(inside)
    if not inside.any():
        return np.zeros((h, w), np.float32)
    dist, (iy, ix) = distance_transform_edt(line, return_indices=True)
    r = half[idx[iy, ix]]
    edge = np.clip((r - dist) / 1.5 + 0.5, 0, 1)  # ~1.5 lattice px (6 level-0 px) of soft edge
    streak = np.clip(1.0 + 0.12 * _smooth_noise(rng, (h, w), 1.5), 0.6, 1.2)
    return (stroke.opacity * edge * streak).clip(0, 1).astype(np.float32)


def blur_weight(region: BlurRegion, shape_low: tuple[int, int], seed: int) -> np.ndarray:
    """Blur weight (0..1) of one region on the 1/LOW lattice: a warped ellipse with a feathered edge."""
    rng = np.random.default_rng([seed, 0xB2])
    h, w = shape_low
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) * LOW
    dx, dy = x - region.centre[0], y - region.centre[1]
    ca, sa = math.cos(region.angle_rad), math.sin(region.angle_rad)
    u, v = (dx * ca + dy * sa) / region.radii_px[0], (-dx * sa + dy * ca) / region.radii_px[1]
    rho = np.sqrt(u * u + v * v) + 0.1 * _smooth_noise(rng, (h, w), max(2.0, h / 40))
    return np.clip((1.0 - rho) / 0.08 + 0.5, 0, 1).astype(np.float32)


def _touches(low: np.ndarray, x0: int, y0: int, w: int, h: int, ds: float) -> bool:
    """Whether a field is non-zero anywhere near a region of the level ``ds`` (a cheap test on the lattice)."""
    i0, j0 = max(int((y0 * ds) // LOW) - 2, 0), max(int((x0 * ds) // LOW) - 2, 0)
    i1, j1 = int(((y0 + h) * ds) // LOW) + 3, int(((x0 + w) * ds) // LOW) + 3
    return bool((low[i0:i1, j0:j1] > 0).any())


def _sample(low: np.ndarray, x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
    """Bilinear interpolation of a 1/LOW lattice field at the pixel centres of a region of the level ``ds``."""
    ys = np.clip(((y0 + np.arange(h) + 0.5) * ds) / LOW - 0.5, 0, low.shape[0] - 1)
    xs = np.clip(((x0 + np.arange(w) + 0.5) * ds) / LOW - 0.5, 0, low.shape[1] - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, low.shape[0] - 1), np.minimum(x0 + 1, low.shape[1] - 1)
    fy, fx = (ys - y0)[:, None].astype(np.float32), (xs - x0)[None, :].astype(np.float32)
    top = low[y0][:, x0] * (1 - fx) + low[y0][:, x1] * fx
    bottom = low[y1][:, x0] * (1 - fx) + low[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


class ArtefactTissue:
    """``base`` with pen strokes and blur regions; the interface ``write_slide`` renders from, plus ground truth."""

    def __init__(self, base, seed: int = 0, pens: int = 1, blurs: int = 1, colours: tuple[str, ...] = tuple(INKS),
                 strokes: list[PenStroke] | None = None, regions: list[BlurRegion] | None = None):
        self.base = base
        self.width_px, self.height_px = base.width_px, base.height_px
        planned = plan_artefacts(self.width_px, self.height_px, seed, pens, blurs, colours)
        self.strokes = planned[0] if strokes is None else list(strokes)
        self.regions = planned[1] if regions is None else list(regions)
        self.artefact_seed = int(seed)
        self.seed = (int(base.seed) * 1_000_003 + int(seed) * 7919 + 31 * len(self.strokes) + len(self.regions)) % 2**53
        self.lesion, self.tissue_fraction = base.lesion, base.tissue_fraction
        self.lesion_fraction = getattr(base, "lesion_fraction", None)
        shape_low = (-(-self.height_px // LOW), -(-self.width_px // LOW))
        self.ink_alpha_low = np.zeros(shape_low, np.float32)
        self.ink_low = np.ones(shape_low + (3,), np.float32)  # transmittance where ink lies (last stroke on top)
        for i, stroke in enumerate(self.strokes):
            a = stroke_alpha(stroke, shape_low, self.artefact_seed * 101 + i)
            self.ink_low += a[..., None] * (np.array(INKS[stroke.colour], np.float32) - self.ink_low)
            self.ink_alpha_low = np.maximum(self.ink_alpha_low, a)
        self.blur_low = np.zeros(shape_low, np.float32)
        for i, region in enumerate(self.regions):
            self.blur_low = np.maximum(self.blur_low, blur_weight(region, shape_low, self.artefact_seed * 103 + i))

    def render(self, x0: int, y0: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """The base's pixels with the artefacts, region by region (no whole-slide image in memory). Level 0: the base
        region with a margin, blurred where the blur weight says, then inked. Coarser levels: the base's own pixels
        there, inked (blur of a few level-0 pixels does not survive a 4x area average)."""
        from scipy.ndimage import gaussian_filter

        ds = float(downsample)
        blur_here, ink_here = (_touches(f, x0, y0, w, h, ds) for f in (self.blur_low, self.ink_alpha_low))
        if ds != 1.0 or not self.regions or not blur_here:
            img = self.base.render(x0, y0, w, h, downsample=ds).astype(np.float32)
        else:
            sigma = max(region.sigma_px for region in self.regions)
            weight = _sample(self.blur_low, x0, y0, w, h, 1.0)[..., None]
            if weight.max() > 0:
                m = int(math.ceil(4 * sigma))
                wide = self.base.render(x0 - m, y0 - m, w + 2 * m, h + 2 * m).astype(np.float32)
                blurred = gaussian_filter(wide, sigma=(sigma, sigma, 0), mode="nearest")[m:m + h, m:m + w]
                img = wide[m:m + h, m:m + w]
                img += weight * (blurred - img)
            else:
                img = self.base.render(x0, y0, w, h).astype(np.float32)
        if self.strokes and ink_here:
            img *= np.stack([_sample(self.ink_low[..., c], x0, y0, w, h, ds) for c in range(3)], axis=-1)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    # ---------------------------------------------------------------- ground truth per tile
    def _fraction_at_tiles(self, field_low: np.ndarray, grid, threshold: float) -> np.ndarray:
        """Share of each tile's level-0 box where ``field > threshold`` (sampled on the 1/LOW lattice)."""
        on = field_low > threshold
        ii = np.pad(on.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        rows, cols = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
        x0 = np.round(cols * grid.stride_l0_px / LOW).astype(int)
        y0 = np.round(rows * grid.stride_l0_px / LOW).astype(int)
        n = max(1, int(round(grid.tile_l0_px / LOW)))
        x1, y1 = np.minimum(x0 + n, on.shape[1]), np.minimum(y0 + n, on.shape[0])
        count = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
        return count / np.maximum((x1 - x0) * (y1 - y0), 1)

    def ink_fraction_at_tiles(self, grid) -> np.ndarray:
        """(rows, cols): share of each tile under visible ink (opacity > 0.1)."""
        return self._fraction_at_tiles(self.ink_alpha_low, grid, 0.1)

    def blur_fraction_at_tiles(self, grid) -> np.ndarray:
        """(rows, cols): share of each tile that is more than half blurred."""
        return self._fraction_at_tiles(self.blur_low, grid, 0.5)

    def tile_truth(self, grid, inked_min: float) -> dict[str, np.ndarray]:
        """(rows, cols) bool ground truth on a tile grid: ``inked`` (>= ``inked_min`` of the tile under ink),
        ``blurred`` (more than half blurred, no ink), ``blurred_core`` (>= 90%, no ink), ``clean`` (tissue at the
        tile centre, no ink, no blur)."""
        from pipeline.slides.annotations import tile_centres

        ink, blur = self.ink_fraction_at_tiles(grid), self.blur_fraction_at_tiles(grid)
        centre = self.base.tissue_at(*tile_centres(grid))
        return {"inked": ink >= inked_min, "blurred": (blur > 0.5) & (ink == 0),
                "blurred_core": (blur >= 0.9) & (ink == 0), "clean": centre & (ink == 0) & (blur == 0)}

    # ---------------------------------------------------------------- annotations
    def annotations_geojson(self, exclude: bool = True, cell_px: int = 32, pen: bool = False) -> dict:
        """QuPath-style FeatureCollection: ``Tumor`` = the lesion outline (if any), ``Exclude`` = an ellipse on
        tissue away from the lesion, ``Pen`` (with ``pen``) = each stroke's outline, as a pathologist marks ink to
        leave out. Level-0 pixel coordinates."""
        import shapely
        import shapely.affinity

        features = []
        if pen and self.strokes:
            ys, xs = np.nonzero(self.ink_alpha_low > 0.1)
            cells = shapely.box(xs * LOW, ys * LOW, (xs + 1) * LOW, (ys + 1) * LOW)
            outline = shapely.union_all(cells).buffer(2 * LOW).simplify(LOW)
            features.append(_feature(outline, "Pen", (0, 0, 200)))
        if self.lesion and hasattr(self.base, "lesion_at"):
            ys, xs = np.mgrid[0:self.height_px // cell_px, 0:self.width_px // cell_px]
            inside = self.base.lesion_at((xs + 0.5) * cell_px, (ys + 0.5) * cell_px)
            cells = shapely.box(xs[inside] * cell_px, ys[inside] * cell_px, (xs[inside] + 1) * cell_px,
                                (ys[inside] + 1) * cell_px)
            tumour = shapely.union_all(cells).simplify(cell_px / 4)
            if not tumour.is_empty:
                features.append(_feature(tumour, "Tumor", (200, 0, 0)))
        if exclude and hasattr(self.base, "tissue_at"):
            rng = np.random.default_rng([self.artefact_seed, 0xE7])
            lesion = shapely.union_all([shapely.from_geojson(json.dumps(f["geometry"])) for f in features]) \
                if features else shapely.Polygon()
            s = min(self.width_px, self.height_px)
            for _ in range(200):
                cx, cy = rng.uniform(0.2, 0.8) * self.width_px, rng.uniform(0.2, 0.8) * self.height_px
                if not self.base.tissue_at(cx, cy):
                    continue
                ellipse = shapely.affinity.scale(shapely.Point(cx, cy).buffer(1.0, 32), 0.08 * s, 0.06 * s)
                if ellipse.intersects(lesion):
                    continue
                features.append(_feature(ellipse, "Exclude", (100, 100, 100)))
                break
        return {"type": "FeatureCollection", "features": features}


def _feature(geometry, name: str, colour: tuple[int, int, int]) -> dict:
    import shapely

    import hashlib

    return {"type": "Feature", "id": f"{name.lower()}-{hashlib.sha256(geometry.wkb).hexdigest()[:8]}",
            "geometry": json.loads(shapely.to_geojson(geometry)),
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": list(colour)}}}


def write_geojson(path: str | os.PathLike, collection: dict) -> Path:
    """Write a GeoJSON file atomically."""
    from sample_data.synthetic.writing import atomic_target

    path = Path(path)
    tmp = atomic_target(path)
    tmp.write_text(json.dumps(collection))
    os.replace(tmp, path)
    return path


def artefact_wrap(n_per_class: int, seed: int = 0, annotations_dir: str | os.PathLike | None = None, every: int = 3):
    """``wrap`` for ``sample_data.synthetic.make_cohort``: every ``every``-th slide gets a pen stroke, the next one a
    blurred region (both classes alike); with ``annotations_dir``, each slide with a lesion or an ``Exclude`` region
    (every fourth slide) gets ``<slide_id>.geojson`` there (written only when its content changes)."""
    out = Path(annotations_dir) if annotations_dir else None

    def wrap(slide_id: str, tissue):
        i = int(slide_id.rsplit("_", 1)[-1])
        pens, blurs = int(i % every == 0), int(i % every == 1)
        slide = ArtefactTissue(tissue, seed=seed * 100003 + i, pens=pens, blurs=blurs) if pens or blurs else tissue
        if out is not None:
            shaped = slide if isinstance(slide, ArtefactTissue) else ArtefactTissue(tissue, seed=seed * 100003 + i,
                                                                                    pens=0, blurs=0)
            collection = shaped.annotations_geojson(exclude=i % 4 == 2, pen=True)
            path = out / f"{slide_id}.geojson"
            if collection["features"] and not (path.is_file() and path.read_text() == json.dumps(collection)):
                out.mkdir(parents=True, exist_ok=True)
                write_geojson(path, collection)
        return slide

    return wrap


def compose_wraps(*wraps):
    """One ``wrap`` applying each given one (None skipped) in order."""
    active = [w for w in wraps if w is not None]

    def wrap(slide_id: str, tissue):
        for w in active:
            tissue = w(slide_id, tissue)
        return tissue

    return wrap if active else None
