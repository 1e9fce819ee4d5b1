"""Stage 1, slides: open whole-slide images, read their metadata and pixels, lay the tile grid at the target
resolution and find the tissue.

``open`` (ids, metadata, handles), ``pixels`` (regions, resampling, thumbnails), ``readers`` and ``reader_choice``
(OpenSlide or direct TIFF decoding), ``tiling`` (the tile grid and tile batches), ``tissue`` (the tissue mask).

Import rule: ``pipeline.slides`` imports only ``pipeline.core``.
"""
