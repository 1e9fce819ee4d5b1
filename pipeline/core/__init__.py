"""The shared core every stage builds on: the typed config, typed errors, the slide-store and output-directory
contracts (``store``, ``outputs``, ``artefacts``, ``maps``), where tasks run (``parallel``), progress bars, compiled
kernels and picture helpers.

Import rule: ``pipeline.core`` imports no stage; every stage may import it.
"""
