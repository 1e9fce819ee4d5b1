"""Progress bars for batch runs: slides and tiles done, with throughput. Quiet when output is not a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total_slides: int, done_slides: int = 0, enabled: bool | None = None):
        # enabled=None: tqdm's own rule, on only when stderr is a terminal, so logs and CI output stay clean.
        disable = (not sys.stderr.isatty()) if enabled is None else not enabled
        self.slides = tqdm(total=total_slides, initial=done_slides, desc="slides", unit="slide", position=0,
                           disable=disable, dynamic_ncols=True)
        self.tiles = tqdm(total=0, desc="tiles", unit="tile", unit_scale=True, position=1, disable=disable,
                          dynamic_ncols=True)
        self.failed = 0

    def add_tiles(self, n: int) -> None:
        self.tiles.total += n
        self.tiles.refresh()

    def tiles_done(self, n: int) -> None:
        self.tiles.update(n)

    def slide_done(self, failed: bool = False) -> None:
        self.failed += int(failed)
        if failed:
            self.slides.set_postfix(failed=self.failed)
        self.slides.update(1)

    def close(self) -> None:
        self.tiles.close()
        self.slides.close()
