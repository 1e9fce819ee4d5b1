"""The ``wsi-pipeline`` console script: the garbage collector is paused before the command line and its stage are
imported (``core.startup``), then ``cli.entry``."""

from __future__ import annotations


def entry() -> None:
    from .core.startup import pause_gc

    pause_gc()
    from .cli import entry as run_command

    run_command()
