"""``slides.resample.resize``: PIL's BOX / BILINEAR resize, byte for byte, on random images, sizes and boxes."""

import hashlib

import numpy as np
import PIL
import pytest
from PIL import Image

from pipeline.slides import pixels
from pipeline.slides.open import open_slide
from pipeline.slides.resample import kernels, resize

pytestmark = pytest.mark.skipif(not kernels, reason="numba is missing: PIL itself resizes")
# Pillow 13 runs the vertical pass first when the height shrinks much more than the width; the kernel follows it.
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def _cases(seed: int, count: int):
    """(image, out_w, out_h, box) with whole-pixel, fractional and full-image boxes, shrinking and enlarging, factors
    near 1 (0.499 -> 0.5 µm/px), whole factors and large ones (thumbnails)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i % 3 == 0:  # smooth, like tissue: many sums land near a rounding edge
            image = np.clip(np.cumsum(rng.integers(-3, 4, (h, w, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
        x0 = float(rng.uniform(0, w - 0.01)) if rng.random() < 0.7 else 0.0
        y0 = float(rng.uniform(0, h - 0.01)) if rng.random() < 0.7 else 0.0
        x1 = float(w) if rng.random() < 0.2 else float(rng.uniform(x0 + 0.01, w))
        y1 = float(h) if rng.random() < 0.2 else float(rng.uniform(y0 + 0.01, h))
        factors = [1.0, 1.002, 0.9998, 1.98, 2.0, 2.5, 4.0, 16.0, 0.5]
        out_w = max(1, round((x1 - x0) / factors[int(rng.integers(len(factors)))]))
        out_h = max(1, round((y1 - y0) / factors[int(rng.integers(len(factors)))]))
        if rng.random() < 0.3:
            out_w, out_h = (int(v) for v in rng.integers(1, 80, 2))
        yield image, int(out_w), int(out_h), (x0, y0, x1, y1)


def _pil(image, out_w, out_h, box, bilinear):
    method = Image.Resampling.BILINEAR if bilinear else Image.Resampling.BOX
    return np.asarray(Image.fromarray(image).resize((out_w, out_h), method, box=box))


@pytest.mark.skipif(not PILLOW_13, reason="the pass order of Pillow 13 (older versions differ by 1 grey level)")
@pytest.mark.parametrize("bilinear", [False, True])
def test_resize_equals_pil_byte_for_byte(bilinear):
    for image, out_w, out_h, box in _cases(7, 1500):
        np.testing.assert_array_equal(resize(image, out_w, out_h, box, bilinear), _pil(image, out_w, out_h, box, bilinear),
                                      err_msg=f"{image.shape} -> {out_w}x{out_h}, box {box}")


@pytest.mark.parametrize("box", [(-0.5, 0.0, 10.0, 10.0), (0.0, 0.0, 12.5, 10.0), (0.0, 0.0, 10.0, 10.2),
                                 (5.0, 0.0, 4.0, 10.0)])
def test_a_box_outside_the_image_is_refused_as_pil_refuses_it(box):
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError):
        Image.fromarray(image).resize((4, 4), Image.Resampling.BOX, box=box)
    with pytest.raises(ValueError, match="not inside"):
        resize(image, 4, 4, box, bilinear=False)


def test_rows_split_over_threads_give_the_same_pixels():
    rng = np.random.default_rng(3)
    image = np.clip(np.cumsum(rng.integers(-3, 4, (400, 300, 3)), axis=1) + 128, 0, 255).astype(np.uint8)
    for out_w, out_h, box, bilinear in [(300, 400, (0.0, 0.0, 299.9, 399.8), True),  # a thumbnail's near-identity
                                        (150, 190, (1.5, 2.25, 299.0, 398.0), False),  # shrink, horizontal first
                                        (290, 130, (0.0, 0.5, 298.0, 400.0), False)]:  # shrink, vertical first
        whole = resize(image, out_w, out_h, box, bilinear)
        np.testing.assert_array_equal(resize(image, out_w, out_h, box, bilinear, threads=True), whole)
        into = np.zeros((out_h, out_w + 5, 3), np.uint8)[:, 2:2 + out_w]  # a view that is not contiguous
        resize(image, out_w, out_h, box, bilinear, out=into)
        np.testing.assert_array_equal(into, whole)


def test_resize_golden_digest():
    """The pixels do not depend on the installed Pillow: a digest of fixed cases, made with Pillow 13.0."""
    digest = hashlib.sha256()
    for image, out_w, out_h, box in _cases(11, 200):
        for bilinear in (False, True):
            digest.update(resize(image, out_w, out_h, box, bilinear).tobytes())
    assert digest.hexdigest()[:16] == GOLDEN


GOLDEN = "adeab931d278e6c5"


def test_tiles_and_thumbnails_keep_pils_pixels(monkeypatch, cmu_slide):
    """Tile boxes of a 0.499 µm/px read (-> 0.5) and the real Aperio slide's thumbnails at fractional downsamples, with
    the kernel and with PIL itself (the path where numba is missing)."""
    rng = np.random.default_rng(5)
    strip = rng.integers(0, 256, (260, 800, 3), dtype=np.uint8)
    boxes = [(c * 256.5 + 0.25, 0.3, c * 256.5 + 256.75, 256.8) for c in range(3)]
    with open_slide(cmu_slide) as handle:
        fast = pixels.resample_boxes(strip, 256, 256, boxes) + [pixels.read_thumbnail(handle, ds) for ds in (3.3, 7.5)]
        monkeypatch.setattr(pixels, "resize_kernels", False)
        slow = pixels.resample_boxes(strip, 256, 256, boxes) + [pixels.read_thumbnail(handle, ds) for ds in (3.3, 7.5)]
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)
