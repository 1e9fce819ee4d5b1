"""Stage 2, describe: slides -> tissue mask -> tile grid -> one descriptor vector per tile, in a Zarr store per slide.

``runner`` (``describe_slides``, ``describe_slide``: the tasks and the runner), ``retry`` (``retry_failed``),
``descriptors`` (descriptors of a batch of tiles by the chosen encoder of ``encoders/``), ``stats`` and
``stats_kernel`` (the ``stats`` descriptor), ``stain_cohort`` (the cohort's stain pass and target), ``bookkeeping``
(manifest records, kernels).

Import rule: ``pipeline.describe`` imports ``pipeline.slides`` and ``pipeline.core``.
"""
