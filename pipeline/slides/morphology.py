"""Otsu's threshold and binary morphology for the tissue and ink masks, on numpy and one compiled labelling kernel.

The same results as scikit-image's ``threshold_otsu`` (256-bin histogram of a float image), ``closing`` with a
``disk`` (dilation then erosion, borders reflected) and ``remove_small_objects`` / ``remove_small_holes``
(4-connected components, sizes up to ``max_size`` removed), and as ``scipy.ndimage.binary_opening`` with a 3 x 3
square; ``tests/slides/test_morphology.py`` checks them against scikit-image and scipy. Why not those libraries here:
importing ``skimage.morphology`` pulls in ``scipy.spatial``, and ``scipy.ndimage`` costs ~0.06 s CPU on top of the
``scipy.linalg`` numba itself imports, paid by every ``describe`` command before its first tile (its fixed cost, issue
18). ``scipy.ndimage`` stays the fallback without numba and the distance transforms of very large closings.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.jit import njit


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold maximising the between-class variance of a 256-bin histogram over [min, max] (a constant image:
    its value)."""
    flat = np.asarray(values).reshape(-1)
    if (flat == flat[0]).all():
        return flat[0]
    counts, edges = np.histogram(flat, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    counts = counts.astype(np.float32)
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centres) / weight1
    mean2 = (np.cumsum((counts * centres)[::-1]) / weight2[::-1])[::-1]
    between = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return centres[np.argmax(between)]


def disk(radius: int) -> np.ndarray:
    """Bool (2r + 1, 2r + 1): the pixels within ``radius`` of the centre."""
    steps = np.arange(-radius, radius + 1)
    return (steps[:, None] ** 2 + steps[None, :] ** 2) <= radius ** 2


# Up to this radius the closing is made of shifted copies (about 3r + 1 per pass): the default radius of 4 px closes a
# small slide's thumbnail 7x and the 1-gigapixel slide's 20x faster than two distance transforms, which win from
# r ~ 50 on (their cost does not grow with r).
SHIFT_RADIUS_MAX = 40


def close_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing of a bool mask with a ``disk(radius)`` (gaps narrower than the disk bridged).

    Dilation by a disk: each row offset ``dy`` of the disk adds the mask dilated along rows by the disk's half-width
    there (``dilate_disk``); erosion is the dilation of the complement. Beyond ``SHIFT_RADIUS_MAX``: thresholds of
    Euclidean distance transforms (a pixel is within the disk of a mask pixel exactly when its distance to the mask
    is at most ``radius``), linear in the pixels. Pixels outside the image count as background for the dilation and
    as mask for the erosion, which equals scikit-image's closing with reflected borders (tested)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.all() or not mask.any():
        return mask.copy()
    if radius <= SHIFT_RADIUS_MAX:
        dilated = dilate_disk(mask, radius)
        return dilated if dilated.all() else ~dilate_disk(~dilated, radius)
    from scipy import ndimage

    dilated = ndimage.distance_transform_edt(~mask) <= radius
    if dilated.all():
        return dilated
    return ndimage.distance_transform_edt(dilated) > radius


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Bool 2-D ``mask`` dilated by ``disk(radius)``, pixels outside the image being background: the union over the
    disk's row offsets ``dy`` of the mask dilated along rows by ``isqrt(r^2 - dy^2)`` and shifted by ``dy``."""
    height, width = mask.shape
    along_rows = [mask]  # along_rows[k]: dilated by k pixels to either side within each row
    for k in range(1, radius + 1):
        wider = along_rows[-1].copy()
        wider[:, k:] |= mask[:, :max(width - k, 0)]
        wider[:, :max(width - k, 0)] |= mask[:, k:]
        along_rows.append(wider)
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        rows = along_rows[math.isqrt(radius * radius - dy * dy)]
        if dy >= 0:
            out[dy:] |= rows[:max(height - dy, 0)]
        else:
            out[:max(height + dy, 0)] |= rows[-dy:]
    return out


@njit
def _label4_kernel(mask: np.ndarray) -> np.ndarray:
    """Int32 (h, w): each mask pixel's 4-connected component as the smallest provisional label in it (0 off the mask);
    one raster pass with union-find (path halving), one pass resolving labels to their roots."""
    height, width = mask.shape
    labels = np.zeros((height, width), np.int32)
    parent = np.zeros(height * width // 2 + 2, np.int32)  # provisional labels: at most every other pixel
    count = 0
    for y in range(height):
        for x in range(width):
            if not mask[y, x]:
                continue
            up = labels[y - 1, x] if y > 0 else 0
            left = labels[y, x - 1] if x > 0 else 0
            if up == 0 and left == 0:
                count += 1
                parent[count] = count
                labels[y, x] = count
                continue
            root = 0
            for start in (up, left):
                if start == 0:
                    continue
                node = start
                while parent[node] != node:
                    parent[node] = parent[parent[node]]
                    node = parent[node]
                if root == 0 or node == root:
                    root = node
                elif node < root:
                    parent[root] = node
                    root = node
                else:
                    parent[node] = root
            labels[y, x] = root
    for y in range(height):
        for x in range(width):
            node = labels[y, x]
            while parent[node] != node:
                node = parent[node]
            labels[y, x] = node
    return labels


def component_labels(mask: np.ndarray) -> np.ndarray:
    """Int (h, w): a label per 4-connected component of ``mask`` (not consecutive; 0 off the mask)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    if _label4_kernel is not None and mask.ndim == 2 and mask.size:
        return _label4_kernel(mask)
    from scipy import ndimage

    return ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, 1))[0]


def load_kernels() -> None:
    """Load the labelling kernel now (numba's disk cache), before worker processes are forked."""
    component_labels(np.ones((2, 2), bool))


def remove_small_objects(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` without its 4-connected components of at most ``max_size`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    if max_size <= 0:
        return mask.copy()
    labels = component_labels(mask)
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_size
    small[0] = False  # the background is not an object
    return mask & ~small[labels]


def open_square3(mask: np.ndarray) -> np.ndarray:
    """Binary opening with a 3 x 3 square, pixels outside the image background (``scipy.ndimage.binary_opening``'s
    result): pixels whose whole 3 x 3 neighbourhood is in the mask, dilated back by 3 x 3 (separable min / max)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    rows = padded[:, :-2] & padded[:, 1:-1] & padded[:, 2:]
    eroded = np.pad(rows[:-2] & rows[1:-1] & rows[2:], 1)
    rows = eroded[:, :-2] | eroded[:, 1:-1] | eroded[:, 2:]
    return rows[:-2] | rows[1:-1] | rows[2:]


def remove_small_holes(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` with its 4-connected holes (and background patches at the border) of at most ``max_size`` pixels
    filled."""
    return ~remove_small_objects(~np.asarray(mask, dtype=bool), max_size)
