"""Stage 2, describe: slides -> tissue mask -> tile grid -> one descriptor vector per tile, in a Zarr store per slide.

``runner`` (``describe_slides``, ``describe_slide``, ``retry_failed``: the tasks and the runner), ``descriptors``
(``stats`` or ``cnn`` descriptors of a batch of tiles), ``stats`` and ``stats_kernel`` (the ``stats`` descriptor).

Import rule: ``pipeline.describe`` imports ``pipeline.slides`` and ``pipeline.core``.
"""
