#!/usr/bin/env python
"""Generate the synthetic demo cohort: Aperio-style pyramidal TIFF slides + labels.csv.

    python sample_data/make_cohort.py [--out sample_data/cohort] [--n-per-class 6] [--width 6000 --height 4500]
                                      [--stain-batch] [--artefacts]

Class 0 = tissue only, class 1 = tissue with a planted lesion; ``--stain-batch`` writes every other slide (both classes)
in a second lab's stain; ``--artefacts`` adds pen strokes, blurred regions and QuPath annotations
(``annotations/<slide_id>.geojson``).  Slides already written from the same plan and settings
are kept, so reruns are quick; a cohort of another size or seed rewrites the slides that changed.
See sample_data/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from sample_data.artefacts import artefact_wrap, compose_wraps  # noqa: E402
from sample_data.stain_batch import stain_batch_wrap  # noqa: E402
from sample_data.synthetic import make_cohort  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "sample_data" / "cohort", help="output folder")
    ap.add_argument("--n-per-class", type=int, default=6, help="slides per class (default 6)")
    ap.add_argument("--width", type=int, default=6000, help="level-0 width in px (default 6000)")
    ap.add_argument("--height", type=int, default=4500, help="level-0 height in px (default 4500)")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 microns per pixel (default 0.25)")
    ap.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    ap.add_argument("--stain-batch", action="store_true",
                    help="write every other slide in a second lab's stain (sample_data/stain_batch.py)")
    ap.add_argument("--artefacts", action="store_true",
                    help="marker-pen strokes on every third slide, a blurred region on the next, and QuPath GeoJSON "
                         "annotations (Tumor outlines, some Exclude regions) in OUT/annotations/ (sample_data/artefacts.py)")
    args = ap.parse_args(argv)
    if args.n_per_class < 1 or args.width < 256 or args.height < 256:
        ap.error("need --n-per-class >= 1 and --width/--height >= 256")
    t0 = time.perf_counter()
    out = make_cohort(args.out, n_per_class=args.n_per_class, width_px=args.width, height_px=args.height,
                      mpp=args.mpp, seed=args.seed, verbose=True, wrap=compose_wraps(
                          stain_batch_wrap(args.n_per_class, args.seed) if args.stain_batch else None,
                          artefact_wrap(args.n_per_class, args.seed, args.out / "annotations") if args.artefacts
                          else None))
    n = len(list(out.glob("*.svs")))
    print(f"cohort ready in {time.perf_counter() - t0:.1f} s: {out} ({n} slides, labels.csv)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
