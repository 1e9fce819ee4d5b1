"""The ``wsi-pipeline`` console script: the garbage collector is paused and BLAS set to one thread before the command
line and its stage are imported (``core.startup``), then ``cli.entry``."""

from __future__ import annotations


def entry() -> None:
    from .core.startup import one_blas_thread_env, pause_gc

    pause_gc()
    one_blas_thread_env()
    from .cli import entry as run_command

    run_command()
