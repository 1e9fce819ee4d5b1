"""Stage 3, reduce: per-tile descriptors -> a compact K-channel feature map per slide (Neural Image Compression idea).

A reducer is fitted once on a bounded sample of the cohort's tissue tiles (``sampling``, ``fitting``) and applied
to every slide (``maps``), so every slide's map lives on one scale; ``reducers`` holds the reducers themselves and
their files, ``runner`` the ``reduce_slides`` stage. The maps follow the contract in ``pipeline.core.maps``.

Import rule: ``pipeline.reduce`` imports only ``pipeline.core`` (it reads the stores, not the describe code).
"""
