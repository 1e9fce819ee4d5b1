"""Stage 6, train: fit InceptionV3 on the feature maps for slide-level classes, save the model directory and evaluate
it on held-out slides.

``splits`` (train/validation/test splits, folds, class weights), ``fitting`` (one model on one split: the recipe's
phases), ``runner`` (``train``: checks, splits, fits, saves, evaluates).

Import rule: ``pipeline.train`` imports ``pipeline.evaluate`` (to write its test metrics), ``pipeline.model`` and
``pipeline.core``.
"""
