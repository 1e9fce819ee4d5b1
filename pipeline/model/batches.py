"""Batches of maps for Keras: ``MapBatches`` (a ``keras.utils.PyDataset``, the same on TensorFlow and JAX) and
``predict_proba``. Importing this module imports Keras.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.config import TrainConfig
from ..core.maps import select_channels
from .inputs import INPUT_BACKGROUND, bucket_shape, dihedral, pad_to, prepare


def _py_dataset_base():
    import keras

    return keras.utils.PyDataset


class MapBatches(_py_dataset_base()):
    """Batches of maps for ``model.fit`` / prediction: ``(x, y, sample_weight)``, or ``x`` alone without labels.

    Fixed-size strategies batch in (shuffled) order with per-map augmentation. ``native`` groups maps by their
    size bucket so each batch has one shape; the flip/rotation is drawn per batch (a rotation swaps height and
    width for the whole batch). Augmentation randomness comes from (seed, epoch, batch), so it is reproducible and
    safe with worker threads.
    """

    def __init__(self, maps: Sequence[np.ndarray], cfg: TrainConfig, y: np.ndarray | None = None,
                 sample_weight: np.ndarray | None = None, *, batch_size: int | None = None, augment: bool = False,
                 shuffle: bool = False, seed: int = 0, dihedral_k: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.maps = [select_channels(m, cfg.adapter, cfg.component) for m in maps]
        self.cfg = cfg
        self.y = None if y is None else np.asarray(y, dtype=np.int32)
        self.sample_weight = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
        self.batch_size = batch_size or cfg.batch_size
        self.augment, self.shuffle, self.seed = augment, shuffle, seed
        self.dihedral_k = dihedral_k  # fixed transform for test-time averaging (0 = identity)
        self.epoch = 0
        self.batches = self._plan(0)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, 7])
        n = len(self.maps)
        if self.cfg.size_strategy != "native":
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, m in enumerate(self.maps):
            groups.setdefault(bucket_shape(*m.shape[:2], self.cfg), []).append(i)
        batches, shapes = [], []
        for shape in sorted(groups):
            members = np.asarray(groups[shape])
            if self.shuffle:
                members = rng.permutation(members)
            for i in range(0, len(members), self.batch_size):
                batches.append(members[i:i + self.batch_size])
                shapes.append(shape)
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches, shapes = [batches[i] for i in order], [shapes[i] for i in order]
        # Keras (TensorFlow backend) infers the input signature from the first two batches: when sizes differ,
        # put two different sizes first so height and width come out as None instead of one fixed size.
        if len(set(shapes)) > 1 and shapes[0] == shapes[1]:
            j = next(i for i, s in enumerate(shapes) if s != shapes[0])
            batches[1], batches[j] = batches[j], batches[1]
        return batches

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def batch_x(self, i: int) -> np.ndarray:
        idx = self.batches[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.cfg.size_strategy != "native":
            xs = [prepare(self.maps[j], self.cfg, rng, self.augment) for j in idx]
            x = np.stack(xs)
        else:
            shape = bucket_shape(*self.maps[idx[0]].shape[:2], self.cfg)
            xs = [prepare(self.maps[j], self.cfg, rng, self.augment, flip=False) for j in idx]
            # a random crop makes a map smaller than its bucket; pad every map to the bucket size
            x = np.stack([pad_to(v, *shape, fill=INPUT_BACKGROUND) for v in xs])
            if self.augment:
                x = dihedral(x, int(rng.integers(0, 8)), axes=(1, 2))
        if self.dihedral_k:
            x = dihedral(x, self.dihedral_k, axes=(1, 2))
        return x

    def __getitem__(self, i: int):
        x = self.batch_x(i)
        if self.y is None:
            return x
        idx = self.batches[i]
        if self.sample_weight is None:
            return x, self.y[idx]
        return x, self.y[idx], self.sample_weight[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        if self.shuffle:
            self.batches = self._plan(self.epoch)


def predict_proba(model, maps: Sequence[np.ndarray], cfg: TrainConfig, tta: bool | None = None,
                  batch_size: int | None = None) -> np.ndarray:
    """Class probabilities (n, K) for maps in order; ``tta`` averages over the eight flips/rotations."""
    tta = cfg.tta if tta is None else tta
    n = len(maps)
    if n == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    total = None
    transforms = range(8) if tta else (0,)
    for k in transforms:
        data = MapBatches(maps, cfg, batch_size=batch_size, dihedral_k=k)
        out = np.zeros((n, int(model.output_shape[-1])), dtype=np.float64)
        for i in range(len(data)):
            probs = np.asarray(model.predict_on_batch(data.batch_x(i)), dtype=np.float64)
            out[data.batches[i]] = probs
        total = out if total is None else total + out
    return (total / len(transforms)).astype(np.float32)
