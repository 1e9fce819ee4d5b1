"""The train runner end to end on synthetic feature maps with a planted signal (one real training run for the
module, through the CLI), plus k-fold bookkeeping with a stand-in model (no InceptionV3 needed for that)."""

import csv
import json
import time

import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.core.config import config_from_dict
from pipeline.core.errors import MissingInputError
from pipeline.train.fitting import FoldResult
from pipeline.train.runner import train

from ..conftest import make_map_cohort, planted_map, write_map_store

SMALL_TRAIN = """
train:                        # no weights: the default scratch recipe
  input_px: 80
  batch_size: 8
  epochs: 12
  val_fraction: 0.25
  test_fraction: 0.25
  seed: 0
"""


def read_csv(path):
    return list(csv.DictReader(path.read_text().splitlines()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_out")
    labels = make_map_cohort(out, n_per_class=20, seed=0, size_range=(16, 32))
    (out / "reducer").mkdir()
    (out / "reducer" / "reducer.json").write_text('{"method": "stand-in"}')
    config = out / "train.yaml"
    config.write_text(SMALL_TRAIN)
    t0 = time.monotonic()
    code = main(["train", "--out", str(out), "--labels", str(labels), "--config", str(config)])
    assert code == 0
    return {"out": out, "labels": labels, "config": config, "seconds": time.monotonic() - t0,
            "predictions": (out / "predictions.csv").read_text()}


@pytest.mark.slow
def test_planted_signal_is_learned(trained):
    out = trained["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_slides"] == 10 and metrics["split"] == "test"
    assert metrics["roc_auc"] >= 0.9
    info = json.loads((out / "model" / "model_info.json").read_text())
    assert set(info["history"][0]["phase"]) == {"scratch"}  # one end-to-end phase
    assert info["config"]["train"]["recipe"] == "scratch"
    assert metrics["baseline"]["roc_auc"] >= 0.9 and "network_vs_baseline" in metrics
    test_ids = set(info["splits"][0]["test"])
    assert not test_ids & set(info["splits"][0]["train"]) and len(test_ids) == 10
    rows = read_csv(out / "predictions.csv")
    assert {r["slide_id"] for r in rows} == test_ids
    assert all(r["true_label"] == r["slide_id"][1] for r in rows)  # ids are s<label>_<n>
    assert set(rows[0]) == {"slide_id", "true_label", "predicted_label", "prob_0", "prob_1"}
    for name in ("roc.png", "confusion_matrix.png", "training_curves.png"):
        assert (out / "plots" / name).stat().st_size > 1000


@pytest.mark.slow
def test_gradcam_peaks_on_the_planted_disc_of_positive_test_maps(trained):
    """Issue 5's localisation check at the feature-map level: the trained model's Grad-CAM, mapped back onto each
    positive test slide's (variable-size) map, has its maximum inside the planted disc (~15-25% of the tissue, so
    chance would give about one in five).

    The default settings (``mixed0`` for a random-init base, Augmented Grad-CAM with a one-tile smoothing,
    ``cam.augment``, ``cam.smooth_cells: 1``) must hit on >= 80%: with the scratch recipe they hit 5/5. One plain pass
    of the same model hits 1/5 on these small maps (a 7 x 7 activation grid at 80 px): the eight turned-back views
    and the smoothing are what localise here, so they must never do worse than one pass."""
    from pipeline.cam.gradients import default_cam_layer, split_model
    from pipeline.cam.views import slide_cam_with_models
    from pipeline.core.config import CamConfig
    from pipeline.core.maps import read_feature_maps
    from pipeline.model.trained import TrainedModel

    out = trained["out"]
    info = json.loads((out / "model" / "model_info.json").read_text())
    positives = sorted(s for s in info["splits"][0]["test"] if s.startswith("s1_"))
    model = TrainedModel(out / "model")
    cam_models = [split_model(m, default_cam_layer(m, model.train_config)) for m in model.models]
    hits = {"default": [], "one pass": []}
    for slide_id, fmap in zip(positives, read_feature_maps(out, positives)):
        disc = fmap.mean(axis=2) > 0.7  # planted cells ~0.95, the rest of the tissue ~0.3
        for name, cam_cfg in (("default", CamConfig()), ("one pass", CamConfig(augment=False, smooth_cells=0))):
            cam, _, _ = slide_cam_with_models(cam_models, fmap, model.train_config, cam_cfg)
            assert cam.shape == fmap.shape[:2] and np.isnan(cam[fmap[..., 0] < 0]).all()
            row, col = np.unravel_index(int(np.nanargmax(cam)), cam.shape)
            hits[name].append(bool(disc[row, col]))
    assert len(positives) >= 4
    assert sum(hits["default"]) >= 0.8 * len(positives), hits
    assert sum(hits["default"]) >= sum(hits["one pass"]), hits


@pytest.mark.slow
def test_model_directory(trained):
    model_dir = trained["out"] / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["baseline.json", "labels.json", "model.keras",
                                                            "model_info.json", "reducer"]
    assert json.loads((model_dir / "labels.json").read_text())["values"] == [0, 1]
    info = json.loads((model_dir / "model_info.json").read_text())
    assert info["config_hash"] and info["model_hash"] and info["config"]["train"]["input_px"] == 80
    assert (model_dir / "reducer" / "reducer.json").exists()
    manifest = json.loads((trained["out"] / "manifest.json").read_text())
    splits = {r["stages"]["train"]["split"] for r in manifest["slides"].values()}
    assert splits == {"train", "val", "test"}


@pytest.mark.slow
def test_evaluate_reloads_the_saved_model(trained, capsys):
    out = trained["out"]
    assert main(["evaluate", "--out", str(out)]) == 0
    before = {r["slide_id"]: r for r in read_csv_text(trained["predictions"])}
    after = {r["slide_id"]: r for r in read_csv(out / "predictions.csv")}
    assert before.keys() == after.keys()
    for slide_id, row in after.items():
        assert float(row["prob_1"]) == pytest.approx(float(before[slide_id]["prob_1"]), abs=1e-4)
    assert "roc_auc" in capsys.readouterr().out


def read_csv_text(text):
    return list(csv.DictReader(text.splitlines()))


@pytest.mark.slow
def test_rerun_with_same_inputs_is_skipped(trained):
    out = trained["out"]
    stamp = (out / "model" / "model.keras").stat().st_mtime_ns
    config = config_from_dict(yaml.safe_load(SMALL_TRAIN))  # the fixture's settings, from Python
    summary = train(out, trained["labels"], config)
    assert summary["skipped"] and (out / "model" / "model.keras").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_bad_labels_stop_before_training(trained, tmp_path, capsys):
    out = trained["out"]
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,label\ns0_000,0\nnot_a_slide,1\n")
    stamp = (out / "model" / "model.keras").stat().st_mtime_ns
    assert main(["train", "--out", str(out), "--labels", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not_a_slide" in err and "line 3" in err
    assert (out / "model" / "model.keras").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_warm_up_epochs_do_not_count_for_early_stopping(tmp_path):
    """patience 1 would stop after two epochs; min_epochs 4 keeps the head phase going and picks its best epoch
    only from the epochs after the warm-up."""
    labels = make_map_cohort(tmp_path, n_per_class=5, seed=2, size_range=(12, 14))
    config = config_from_dict({"train": {"recipe": "finetune", "input_px": 75, "head_epochs": 5, "finetune_epochs": 0,
                                         "patience": 1, "min_epochs": 4, "val_fraction": 0.3, "test_fraction": 0.2}})
    summary = train(tmp_path, labels, config)
    info = json.loads((tmp_path / "model" / "model_info.json").read_text())
    assert info["history"][0]["phase"] == ["head"] * 5 and not summary["skipped"]


def test_slide_without_feature_map(tmp_path):
    write_map_store(tmp_path, "a", planted_map(np.random.default_rng(0), False, 10, 10))
    write_map_store(tmp_path, "b", planted_map(np.random.default_rng(1), True, 10, 10))
    import shutil

    shutil.rmtree(tmp_path / "slides" / "b.zarr" / "feature_map")
    labels = tmp_path / "l.csv"
    labels.write_text("slide_id,label\na,0\nb,1\n")
    with pytest.raises(MissingInputError, match="'b' has no feature map"):
        train(tmp_path, labels)


# --- k-fold bookkeeping with a stand-in for the model -------------------------------------------------------------


def _stand_in_fit(maps, y, split, num_classes, cfg, checkpoint_dir, verbose=0):
    """Predicts the truth from the planted disc (max tissue value), with a tiny Keras model to save."""
    import keras

    score = np.array([float(np.max(maps[i])) for i in split.test])
    proba = np.zeros((len(split.test), num_classes), np.float32)
    proba[:, -1] = (score > 0.8).astype(np.float32) * 0.8 + 0.1
    proba[:, 0] = 1 - proba[:, -1]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(num_classes)])
    history = {"fold": split.fold, "loss": [1.0, 0.5], "phase": ["head", "finetune"]}
    return FoldResult(model, history, proba)


def test_kfold_pools_out_of_fold_predictions_with_offset_labels(tmp_path, monkeypatch):
    import pipeline.train.runner as T

    monkeypatch.setattr(T, "fit_model", _stand_in_fit)
    labels = make_map_cohort(tmp_path, n_per_class=6, seed=1, size_range=(10, 14), labels=(3, 4, 5), patients=True)
    summary = train(tmp_path, labels, folds=3)
    assert summary["folds"] == 3 and summary["test_slides"] == 18
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [f["fold"] for f in metrics["folds"]] == [1, 2, 3]
    assert sum(f["n_slides"] for f in metrics["folds"]) == 18
    assert metrics["confusion_matrix"]["labels"] == [3, 4, 5]
    assert "mae" in metrics and "quadratic_weighted_kappa" in metrics and "mean" in metrics["fold_summary"]
    rows = read_csv(tmp_path / "predictions.csv")
    assert sorted(r["slide_id"] for r in rows) == sorted(f"s{g}_{i:03d}" for g in (3, 4, 5) for i in range(6))
    assert {r["predicted_label"] for r in rows} <= {"3", "5"}  # the stand-in knows only "disc" vs "no disc"
    assert all(r["predicted_label"] == "5" for r in rows if r["true_label"] == "5")  # offset mapped back
    mapping = json.loads((tmp_path / "model" / "labels.json").read_text())
    assert mapping["offset"] == 3 and mapping["values"] == [3, 4, 5]
    names = json.loads((tmp_path / "model" / "model_info.json").read_text())["models"]
    assert names == ["fold_1.keras", "fold_2.keras", "fold_3.keras"]
    assert all((tmp_path / "model" / n).exists() for n in names)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {r["stages"]["train"]["test_fold"] for r in manifest["slides"].values()} == {1, 2, 3}


# --- predict on new slides: describe -> map with the model's reducer -> predict -------------------------------------


@pytest.mark.slow
def test_predict_new_slides_end_to_end(trained, small_slides, small_config, tmp_path):
    import shutil

    import pipeline
    from pipeline.core.parallel import LocalRunner
    from pipeline.core.store import read_attrs, store_path
    from pipeline.describe.runner import describe_slides
    from pipeline.reduce.runner import reduce_slides

    # a cohort described and reduced for real gives the reducer that ships with the model
    cohort = tmp_path / "cohort"
    describe_slides([small_slides], cohort, small_config, runner=LocalRunner(), progress=False)
    reduce_slides(cohort, small_config, runner=LocalRunner(), progress=False)
    model_dir = tmp_path / "model"
    shutil.copytree(trained["out"] / "model", model_dir, ignore=shutil.ignore_patterns("reducer"))
    shutil.copytree(cohort / "reducer", model_dir / "reducer")
    info = json.loads((model_dir / "model_info.json").read_text())
    info["describe_config"] = read_attrs(store_path(cohort, "slide-a"))["config"]
    (model_dir / "model_info.json").write_text(json.dumps(info))

    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(small_slides / "slide-b.svs", new / "slide-b.svs")
    (new / "broken.svs").write_bytes(b"this is not a slide")
    out = tmp_path / "predict_out"
    assert main(["predict", "--model", str(model_dir), "--slides", str(new), "--out", str(out),
                 "--workers", "1"]) == 0
    rows = read_csv(out / "predict" / "predictions.csv")
    assert [r["slide_id"] for r in rows] == ["slide-b"]
    probs = [float(rows[0]["prob_0"]), float(rows[0]["prob_1"])]
    assert sum(probs) == pytest.approx(1, abs=1e-5)
    assert rows[0]["predicted_label"] == ("1" if probs[1] > probs[0] else "0")
    summary = json.loads((out / "predict" / "summary.json").read_text())
    assert list(summary["failed"]) == ["broken"]
    # the new slide was described with the training slides' settings and mapped with the model's reducer
    attrs = read_attrs(store_path(out, "slide-b"))
    assert attrs["config"]["tiling"]["tile_px"] == small_config.tiling.tile_px
    fmap_attrs = json.loads((store_path(out, "slide-b") / "feature_map" / "zarr.json").read_text())["attributes"]
    assert fmap_attrs["reducer_hash"] == json.loads((model_dir / "reducer" / "reducer.json").read_text())["hash"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slides"]["slide-b"]["stages"]["predict"]["status"] == "done"
    assert manifest["slides"]["broken"]["stages"]["predict"]["status"] == "failed"

    # the lab-script API gives the same answer, in a temporary directory
    one = pipeline.predict_slide(new / "slide-b.svs", model_dir)
    assert one["slide_id"] == "slide-b"
    assert one["probabilities"]["1"] == pytest.approx(probs[1], abs=1e-4)


def test_model_is_stale_when_a_map_is_made_again(tmp_path):
    """The model's hash covers every slide's map identity: a map made again (another fill rule, a store described
    again) changes it, though the reducer is the same; the same maps give the same hash."""
    import zarr

    from pipeline.core.config import TrainConfig
    from pipeline.core.maps import FEATURE_MAP
    from pipeline.core.store import store_path
    from pipeline.model.labels import read_labels
    from pipeline.train.runner import map_hashes_of, model_hash

    labels = make_map_cohort(tmp_path, n_per_class=3, seed=1, size_range=(8, 10))
    table = read_labels(labels)
    cfg = TrainConfig()
    first = map_hashes_of(tmp_path, table.slide_ids)
    assert map_hashes_of(tmp_path, table.slide_ids) == first
    store = store_path(tmp_path, table.slide_ids[2])
    zarr.open_array(str(store / FEATURE_MAP), mode="r+").attrs["excluded_fill"] = "another-rule"
    second = map_hashes_of(tmp_path, table.slide_ids)
    assert second[0] == first[0] and second[1] != first[1]
    assert model_hash(cfg, table, *second) != model_hash(cfg, table, *first)
