"""Stage 8, cam: Grad-CAM of each slide's prediction, mapped back onto its tile grid, and the heatmap files.

``gradients`` (the model split at the CAM layer, backend gradients), ``views`` (the inputs made from a slide's map and
their CAMs laid back onto its cells), ``runner`` (``cam_slides``), ``heatmaps`` (overlay PNG, pyramidal TIFF, GeoJSON,
contact sheet; Keras-free, so workers rendering files never import it).

Import rule: ``pipeline.cam`` imports ``pipeline.model``, ``pipeline.slides`` (the tile grid) and ``pipeline.core``.
"""
