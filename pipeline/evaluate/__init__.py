"""Stage 5, evaluate: metrics, plots and files of a model's slide-level predictions.

``metrics`` (pure metric functions), ``plots`` (ROC, confusion matrix, training curves), ``files`` (``metrics.json``,
``predictions.csv``, ``plots/``, written by ``train`` for its test slides too), ``runner`` (the ``evaluate`` command).

Import rule: ``pipeline.evaluate`` imports ``pipeline.model`` and ``pipeline.core``.
"""
