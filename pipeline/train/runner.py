"""Stage 6, train: InceptionV3 on the feature maps for slide-level classes, then evaluation on held-out slides.

``train(out_dir, labels_csv, config)``:

1. reads and checks the labels file against the slides in ``OUT`` (every problem is a ``LabelsError`` before any
   model is built), loads the ``feature_map`` of each labelled slide;
2. splits train/validation/test (stratified, grouped by patient, or the file's split column) or k folds;
3. per split: trains one model with the recipe's phases (``fitting``: ``scratch`` end to end without pretrained
   weights, ``head`` then ``finetune`` with them), keeping the best validation epoch, balanced class weights as
   sample weights; fits the map-statistics baseline (``pipeline.model.baseline``) on the same training slides;
4. writes ``OUT/model/``: ``model.keras`` (``fold_<k>.keras`` per fold in k-fold; ``predict`` averages them),
   ``labels.json`` (the label mapping), ``model_info.json`` (config and its hash, splits, history, versions),
   ``baseline.json`` and ``reducer/`` (a copy of ``OUT/reducer/``, so ``predict`` maps new slides the same way);
5. evaluates network and baseline on the test slides (out-of-fold in k-fold): ``OUT/metrics.json``,
   ``OUT/predictions.csv``, plots.

A rerun with the same labels, maps and train settings finds ``model_info.json`` current and skips training
(``force=True`` retrains). Training runs as one task, not spread over workers (one model at a time saturates a
device): in this process, or on a worker advertising a ``GPU`` resource when the cluster has one
(``cluster.gpu_placement``), so a mixed cluster trains on its GPU nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.artefacts import BASELINE_JSON, LABELS_JSON, METRICS_JSON, MODEL_DIR, MODEL_INFO, REDUCER_DIR
from ..core.config import PipelineConfig, TrainConfig
from ..core.maps import FEATURE_MAP, feature_map_stores, map_identity, read_feature_maps, select_channels
from ..core.outputs import Manifest, atomic_write_json, output_lock, replace_directory
from ..core.store import array_attrs, package_versions, read_attrs, store_ids, store_path
from ..evaluate.files import write_evaluation
from ..model.baseline import baseline_proba, fit_baseline, statistics_matrix
from ..model.labels import LabelTable, check_slides, read_labels
from .fitting import FoldResult, fit_model
from .splits import Split, fold_splits, holdout_split

log = logging.getLogger("pipeline")


CHECKPOINT_DIR = ".checkpoints"


def _describe_config(out_dir: Path, slide_ids: Sequence[str]) -> tuple[dict, list[str]]:
    """The describe settings of the training slides (predict describes new slides the same way)."""
    configs, hashes = {}, set()
    for slide_id in slide_ids:
        attrs = read_attrs(store_path(out_dir, slide_id)) or {}
        hashes.add(attrs.get("config_hash"))
        configs.setdefault(attrs.get("config_hash"), attrs.get("config") or {})
    notes = []
    if len(hashes) > 1:
        notes.append(f"training slides were described with {len(hashes)} different settings")
    return next(iter(configs.values())) if configs else {}, notes


def map_hashes_of(out_dir: Path, slide_ids: Sequence[str]) -> tuple[list[str], str]:
    """(the maps' reducer hashes, a digest of every slide's map identity: a map made again from a described-again
    store, or under another fill rule, makes the model stale)."""
    hashes, identities = set(), hashlib.sha256()
    for slide_id in slide_ids:
        attrs = array_attrs(store_path(out_dir, slide_id), FEATURE_MAP) or {}
        hashes.add(str(attrs.get("reducer_hash") or attrs.get("config_hash") or ""))
        identities.update(f"{slide_id}={map_identity(attrs)}\n".encode())
    return sorted(hashes), identities.hexdigest()[:16]


def model_hash(cfg: TrainConfig, table: LabelTable, map_hashes: Sequence[str], maps_digest: str = "") -> str:
    """What the trained model depends on: train settings, the labels file, the maps' reducer and the maps."""
    payload = {"train": cfg.model_dump(mode="json"), "labels": table.sha256, "maps": list(map_hashes),
               "map_identities": maps_digest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _current(model_dir: Path, digest: str) -> dict | None:
    path = model_dir / MODEL_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("model_hash") != digest or not all((model_dir / m).is_file() for m in info.get("models", [])):
        return None
    return info


def _backend_info() -> dict:
    import keras

    from ..model.backend import gpu_count

    return {"backend": keras.backend.backend(), "keras": keras.__version__, "gpus": gpu_count()}


@dataclass
class TrainPlan:
    """Everything checked and decided before a model is built (the maps themselves are read by the training)."""

    table: LabelTable
    splits: list
    map_hashes: list
    digest: str


def _plan(out_dir: Path, labels_csv: str | Path, config: PipelineConfig) -> TrainPlan:
    """Every problem with the inputs, before any model is built; the splits and the model hash."""
    cfg = config.train
    table = read_labels(labels_csv, cfg.label_kind)
    available = store_ids(out_dir)
    check_slides(table, available)
    unlabelled = sorted(available - set(table.slide_ids))
    if unlabelled:
        log.info("train: %d slide(s) in %s have no label and are not used: %s", len(unlabelled), out_dir,
                 ", ".join(unlabelled[:10]) + (" ..." if len(unlabelled) > 10 else ""))
    from ..core.store import read_array

    stores = feature_map_stores(out_dir, table.slide_ids)  # every labelled slide has a map
    select_channels(read_array(stores[0], FEATURE_MAP), cfg.adapter, cfg.component)  # the adapter fits them
    splits = (fold_splits(table, cfg.folds, cfg.val_fraction, cfg.seed) if cfg.folds
              else [holdout_split(table, cfg.val_fraction, cfg.test_fraction, cfg.seed)])
    map_hashes, maps_digest = map_hashes_of(out_dir, table.slide_ids)
    return TrainPlan(table, splits, map_hashes, model_hash(cfg, table, map_hashes, maps_digest))


def train(out_dir: str | Path, labels_csv: str | Path, config: PipelineConfig | None = None, *,
          folds: int | None = None, force: bool = False, verbose: int = 0, runner=None) -> dict:
    """Train (or k-fold cross-validate) and evaluate; returns a summary with the headline metrics.

    ``folds`` overrides ``config.train.folds``. ``verbose`` is Keras' fit verbosity (0 silent, 2 one line/epoch).
    With a Dask ``runner`` whose cluster has GPU workers (``cluster.gpu_placement``), the training runs as one task
    on a GPU worker (outputs go to ``out_dir`` on the shared file system); otherwise in this process.
    """
    from ..core.parallel import GPU_RESOURCES, gpu_placement

    config = config or PipelineConfig()
    if folds is not None:
        config = config.with_overrides(train__folds=folds)
    out_dir = Path(out_dir)
    t0 = time.monotonic()
    with output_lock(out_dir, command="train"):
        plan = _plan(out_dir, labels_csv, config)
        model_dir = out_dir / MODEL_DIR
        info = None if force else _current(model_dir, plan.digest)
        if info is not None and (out_dir / METRICS_JSON).is_file():
            log.info("train: model in %s is current (hash %s): skipped", model_dir, plan.digest)
            metrics = json.loads((out_dir / METRICS_JSON).read_text(encoding="utf-8"))
            return _summary(info, metrics, skipped=True, seconds=time.monotonic() - t0)
        if gpu_placement(runner, config.cluster):
            # The client keeps the output lock; the worker writes OUT/model and the metrics on the shared disk.
            log.info("train: submitted to a GPU worker")
            return runner.run_one(train_task, str(out_dir), str(labels_csv), config.model_dump(mode="json"),
                                  verbose, resources=GPU_RESOURCES)
        return _fit_and_evaluate(out_dir, labels_csv, config, plan, verbose, t0)


def train_task(out_dir: str, labels_csv: str, config_json: dict, verbose: int = 0) -> dict:
    """Dask task: training on the (GPU) worker it was placed on, logged to its own file in ``OUT/logs``."""
    from ..core.outputs import log_file

    config = PipelineConfig.model_validate(config_json)
    with log_file(out_dir, "train-worker"):
        t0 = time.monotonic()
        plan = _plan(Path(out_dir), labels_csv, config)
        return _fit_and_evaluate(Path(out_dir), labels_csv, config, plan, verbose, t0)


def _fit_and_evaluate(out_dir: Path, labels_csv: str | Path, config: PipelineConfig, plan: TrainPlan, verbose: int,
                      t0: float) -> dict:
    from ..core.parallel import where_am_i
    from ..model.network import resolve_weights

    cfg = config.train
    table, splits = plan.table, plan.splits
    maps = read_feature_maps(out_dir, table.slide_ids)
    if resolve_weights(cfg.weights) is None and cfg.recipe == "finetune":
        log.warning("train: train.weights is null with train.recipe 'finetune', so the head phase trains on the "
                    "features of a random base; train.recipe 'scratch' (the default without weights) trains the "
                    "network end to end")
    model_dir = out_dir / MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_INFO).unlink(missing_ok=True)  # the model dir is complete only once this is rewritten
    y = table.y
    k = table.mapping.num_classes
    results: list[FoldResult] = []
    for split in splits:
        log.info("train%s: %d train, %d validation, %d test slides", f" fold {split.fold}" if split.fold else "",
                 len(split.train), len(split.val), len(split.test))
        for note in split.notes:
            log.warning("train: %s", note)
        results.append(fit_model(maps, y, split, k, cfg, model_dir / CHECKPOINT_DIR, verbose=verbose))
    statistics = statistics_matrix(maps)  # each slide's map statistics once, for every split's baseline
    baselines = [fit_split_baseline(statistics, y, split, k, cfg.seed) for split in splits]
    atomic_write_json(model_dir / BASELINE_JSON, {"models": [params for params, _ in baselines]})
    model_names = _save_models(model_dir, results, bool(cfg.folds))
    shutil.rmtree(model_dir / CHECKPOINT_DIR, ignore_errors=True)  # the saved models hold the best weights
    reducer_copied = _copy_reducer(out_dir, model_dir)
    describe_cfg, notes = _describe_config(out_dir, table.slide_ids)
    if not reducer_copied:
        notes.append(f"no {REDUCER_DIR}/ in {out_dir}: `predict` on new slides will not work with this model")
    for split, result in zip(splits, results):
        notes.extend(split.notes + result.notes)
    atomic_write_json(model_dir / LABELS_JSON, table.mapping.to_dict())
    backend = _backend_info()
    info = {
        "format": 1,
        "models": model_names,
        "folds": cfg.folds,
        "model_hash": plan.digest,
        "config_hash": config.stage_hash("train"),
        "config": config.model_dump(mode="json", exclude={"cluster"}),
        "describe_config": describe_cfg,
        "map_hashes": plan.map_hashes,
        "labels": table.mapping.to_dict(),
        "labels_file": str(Path(labels_csv).resolve()),
        "labels_sha256": table.sha256,
        "truth": dict(zip(table.slide_ids, table.labels)),
        "splits": [{"fold": s.fold, **s.ids(table)} for s in splits],
        "history": [r.history for r in results],
        "input": {"adapter": cfg.adapter, "component": cfg.component, "size_strategy": cfg.size_strategy,
                  "input_px": None if cfg.size_strategy == "native" else cfg.input_px},
        "notes": notes,
        "seconds": [r.seconds for r in results],
        "trained_on": {**where_am_i(), **backend},
        "created": time.time(),
        "versions": {**package_versions(), **backend},
    }
    atomic_write_json(model_dir / MODEL_INFO, info)

    # --- evaluation on held-out slides ------------------------------------------------------------------------
    ids, y_test, proba, fold_col = [], [], [], []
    for split, result in zip(splits, results):
        ids.extend(table.slide_ids[i] for i in split.test)
        y_test.extend(y[split.test].tolist())
        proba.append(result.test_proba)
        fold_col.extend([split.fold] * len(split.test))
    proba_arr = np.concatenate(proba) if proba else np.zeros((0, k), np.float32)
    metrics = write_evaluation(out_dir, ids, np.asarray(y_test, dtype=np.int64), proba_arr, table.mapping,
                               folds=fold_col if cfg.folds else None, histories=info["history"],
                               extra_notes=notes, baseline=np.concatenate([b for _, b in baselines]))
    _record_manifest(out_dir, table, splits, plan.digest)
    summary = _summary(info, metrics, skipped=False, seconds=time.monotonic() - t0)
    Manifest(out_dir).record_run("train", summary)
    return summary


def fit_split_baseline(statistics: np.ndarray, y: np.ndarray, split: Split, num_classes: int,
                       seed: int) -> tuple[dict, np.ndarray]:
    """The map-statistics baseline fitted on the split's training and validation slides (rows of ``statistics``,
    ``pipeline.model.baseline.statistics_matrix`` of all maps), and its test probabilities."""
    fit_idx = np.concatenate([split.train, split.val]).astype(np.int64)
    params = fit_baseline(statistics[fit_idx], y[fit_idx], num_classes, seed)
    return params, baseline_proba(params, statistics[np.asarray(split.test, dtype=np.int64)])


def _save_models(model_dir: Path, results: Sequence[FoldResult], kfold: bool) -> list[str]:
    from ..model.network import save_model

    names = []
    for result in results:
        name = f"fold_{result.history['fold']}.keras" if kfold else "model.keras"
        save_model(result.model, model_dir / name)
        names.append(name)
    for stale in model_dir.glob("*.keras"):  # models of an earlier run with another fold count
        if stale.name not in names:
            stale.unlink()
    return names


def _copy_reducer(out_dir: Path, model_dir: Path) -> bool:
    source = out_dir / REDUCER_DIR
    target = model_dir / REDUCER_DIR
    if not source.is_dir():
        log.warning("train: no %s to copy into the model directory", source)
        return False
    tmp = model_dir / f".{REDUCER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    replace_directory(tmp, target)
    return True


def _record_manifest(out_dir: Path, table: LabelTable, splits: Sequence[Split], digest: str) -> None:
    """Each labelled slide's role: its set (train/val/test), or in k-fold the fold it was tested in."""
    records: dict[str, dict] = {}
    for split in splits:
        for name in ("train", "val", "test"):
            for i in getattr(split, name):
                record = records.setdefault(table.slide_ids[i], {"status": "done", "label": table.labels[i],
                                                                 "model_hash": digest})
                if split.fold is None:
                    record["split"] = name
                elif name == "test":
                    record["test_fold"] = split.fold
    manifest = Manifest(out_dir)
    for slide_id, record in records.items():
        manifest.set_stage(slide_id, "train", record)
    manifest.save()  # once, not per slide


def _summary(info: dict, metrics: dict, skipped: bool, seconds: float) -> dict:
    headline = {k: metrics.get(k) for k in ("accuracy", "f1_macro", "roc_auc", "mae", "quadratic_weighted_kappa")
                if metrics.get(k) is not None}
    versus = metrics.get("network_vs_baseline") or {}
    baseline = {}
    if versus.get("metric"):
        baseline = {f"baseline_{versus['metric']}": round(versus["baseline"], 4),
                    "below_baseline": versus["network_below_baseline"]}
    return {"slides": len(info.get("truth", {})), "folds": info.get("folds"), "test_slides": metrics.get("n_slides"),
            "skipped": skipped, **{k: round(v, 4) for k, v in headline.items()}, **baseline,
            "seconds": round(seconds, 2), "trained_on": info.get("trained_on")}
