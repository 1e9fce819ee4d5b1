"""Stage 4, model: InceptionV3 on feature maps, and the trained-model artefact.

``labels`` (the labels file and the label <-> class mapping), ``inputs`` (maps -> network inputs: scaling, sizes,
augmentation; numpy only), ``batches`` (Keras batches and predictions), ``backend`` (GPUs, mixed precision),
``network`` (building, training phases, save/load), ``baseline`` (the map-statistics baseline), ``trained`` (loading
a model directory written by ``train``).

Import rule: ``pipeline.model`` imports only ``pipeline.core``. Keras is imported by ``batches`` and inside the
functions of ``network``, ``backend`` and ``trained``, never when the package is imported.
"""
