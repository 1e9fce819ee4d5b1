"""A trained model directory (written by ``train``): its model(s), one or one per fold (their probabilities are
averaged), the label mapping, the train settings and the map-statistics baselines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.artefacts import BASELINE_JSON, read_model_info
from ..core.config import TrainConfig
from .labels import LabelMapping


class TrainedModel:
    """The model(s) of a model directory: one, or one per fold (their probabilities are averaged)."""

    def __init__(self, model_dir: str | Path):
        from .network import load_model

        self.dir = Path(model_dir)
        self.info = read_model_info(self.dir)
        self.mapping = LabelMapping.from_dict(self.info["labels"])
        self.train_config = TrainConfig.model_validate(saved_train_settings(self.info))
        self.models = [load_model(self.dir / name) for name in self.info["models"]]
        baseline_file = self.dir / BASELINE_JSON
        self.baselines = (json.loads(baseline_file.read_text(encoding="utf-8"))["models"]
                          if baseline_file.is_file() else [])

    def baseline_predict(self, maps: Sequence[np.ndarray], model_index: int | None = None) -> np.ndarray | None:
        """The map-statistics baseline's probabilities (None for a model directory without one)."""
        from .baseline import baseline_proba, statistics_matrix

        if not self.baselines:
            return None
        chosen = self.baselines if model_index is None else [self.baselines[model_index]]
        features = statistics_matrix(maps)
        return np.mean([baseline_proba(params, features) for params in chosen], axis=0)

    def predict(self, maps: Sequence[np.ndarray], model_index: int | None = None) -> np.ndarray:
        from .batches import predict_proba

        chosen = self.models if model_index is None else [self.models[model_index]]
        return np.mean([predict_proba(m, maps, self.train_config) for m in chosen], axis=0)


def saved_train_settings(info: dict) -> dict:
    """The train section a model was trained with (``model_info.json``). Models saved before ``train.recipe`` existed
    were all fine-tuned, so a missing recipe reads as ``finetune`` (not the ``auto`` of a new config)."""
    return {"recipe": "finetune", **info["config"]["train"]}
