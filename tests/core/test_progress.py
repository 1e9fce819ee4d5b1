"""Progress bars: a disabled bar (output not a terminal) counts without importing tqdm."""

import subprocess
import sys

from pipeline.core.progress import Progress


def test_a_disabled_bar_counts_without_tqdm():
    code = ("import sys; from pipeline.core.progress import Progress; b = Progress(3, enabled=False); b.add_tiles(5); "
            "b.tiles_done(2); b.slide_done(failed=True); b.close(); print(b.failed, b.tiles.total, 'tqdm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "5", "False"]


def test_an_enabled_bar_counts_slides_and_tiles(capsys):
    bar = Progress(total_slides=2, enabled=True)
    bar.add_tiles(10)
    bar.tiles_done(4)
    bar.slide_done()
    bar.slide_done(failed=True)
    assert (bar.slides.n, bar.tiles.n, bar.tiles.total, bar.failed) == (2, 4, 10, 1)
    bar.close()
    assert "slides" in capsys.readouterr().err
