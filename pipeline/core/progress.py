"""Progress bars for batch runs: slides and tiles done, with throughput. Quiet when output is not a terminal."""

from __future__ import annotations

import sys


class _NoBar:
    """What a disabled bar does (nothing), without importing tqdm (~10 ms of every batch command's start)."""

    total = 0

    def update(self, n: int = 1) -> None:
        pass

    refresh = close = update

    def set_postfix(self, **kwargs) -> None:
        pass


class Progress:
    def __init__(self, total_slides: int, done_slides: int = 0, enabled: bool | None = None):
        # enabled=None: tqdm's own rule, on only when stderr is a terminal, so logs and CI output stay clean.
        disable = (not sys.stderr.isatty()) if enabled is None else not enabled
        self.failed = 0
        if disable:
            self.slides, self.tiles = _NoBar(), _NoBar()
            return
        from tqdm import tqdm

        self.slides = tqdm(total=total_slides, initial=done_slides, desc="slides", unit="slide", position=0,
                           dynamic_ncols=True)
        self.tiles = tqdm(total=0, desc="tiles", unit="tile", unit_scale=True, position=1, dynamic_ncols=True)

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
