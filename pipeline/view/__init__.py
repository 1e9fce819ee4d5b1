"""Stage 10, view: ``wsi-pipeline view OUT``, a local read-only web app to zoom through a run's slides.

``catalog`` (what the run holds: slides of the manifest, their records, stores and files), ``layers`` (Deep Zoom
geometry and the overlay tiles rendered from a store: CAM, feature map, tissue/QC mask), ``server`` (the HTTP
server: JSON, Deep Zoom tiles of the slide through OpenSlide's ``DeepZoomGenerator``, the bundled page and
OpenSeadragon) and ``static/`` (the page itself).

Import rule: ``pipeline.view`` imports ``pipeline.core`` and earlier stages (``cam`` for the heatmap rendering).
"""
