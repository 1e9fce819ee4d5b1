"""Stain normalisation end to end: one cohort of real H&E texture described twice over (as scanned, and in a second
lab's stain) plus an IHC-like slide; maps of the two copies agree after normalisation, the lesion still separates,
the IHC slide is left as it is with a warning, and the target travels with the reducer to predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pipeline.core.config import config_from_dict
from pipeline.core.outputs import Manifest
from pipeline.core.parallel import LocalRunner
from pipeline.core.store import list_stores, read_array, read_attrs, store_path
from pipeline.describe.runner import describe_slides
from pipeline.describe import stain_cohort
from pipeline.describe.stain_cohort import KEPT_THUMBNAILS, STAIN_JSON, estimate_slide_stain, estimation_hash
from pipeline.predict import describe_config_for, with_reducer_stain
from pipeline.reduce.reducers import load_reducer
from pipeline.reduce.runner import reduce_slides
from pipeline.slides.tiling import TileGrid
from sample_data.stain_batch import Lab, StainBatch

IHC_LAB = Lab(name="ihc", e_vector=(0.62, 0.59, 0.53), e_amount=1.0, h_amount=1.0)  # a real IHC tile's estimate


@pytest.fixture(scope="module")
def two_lab_cohort(tmp_path_factory):
    """a_slide_i (as generated) and b_slide_i (second lab) for 2 benign + 2 lesion slides, and one IHC-like slide."""
    from sample_data.synthetic.writing import write_slide
    from sample_data.textured import LEVELS, MPP, OBJECTIVE, QUALITY, TILE_PX, textured_cohort_plan

    root = tmp_path_factory.mktemp("two_labs")
    plan = textured_cohort_plan(2, seed=3, width_px=1280, height_px=1280, lesion_fraction=(0.25, 0.35))
    write = dict(mpp=MPP, levels=LEVELS, tile_px=TILE_PX, quality=QUALITY, style="aperio", objective_power=OBJECTIVE)
    truth = {}
    for sid, _, tissue in plan:
        write_slide(root / f"a_{sid}.svs", tissue, **write)
        write_slide(root / f"b_{sid}.svs", StainBatch(tissue), **write)
        truth[f"a_{sid}"] = truth[f"b_{sid}"] = tissue
    write_slide(root / "ihc.svs", StainBatch(plan[0][2], IHC_LAB), **write)
    return root, truth


def _run(slides, out, method):
    config = config_from_dict({"tiling": {"tile_px": 64, "chunk_tiles": 8}, "stain": {"method": method},
                               "reduce": {"components": 3}})
    summary = describe_slides([slides], out, config, runner=LocalRunner(), progress=False)
    reduce_slides(out, config, runner=LocalRunner(), progress=False)
    return summary, config


def _copy_difference(out, truth) -> float:
    """Mean |map(a copy) - map(b copy)| over the tissue cells both copies have (map values in [0, 1])."""
    diffs = []
    for sid in sorted(s for s in truth if s.startswith("a_")):
        a = read_array(store_path(out, sid), "feature_map")
        b = read_array(store_path(out, "b" + sid[1:]), "feature_map")
        both = (a[..., 0] >= 0) & (b[..., 0] >= 0)
        diffs.append(np.abs(a[both] - b[both]))
    return float(np.concatenate(diffs).mean())


def _lesion_auc(out, truth) -> float:
    from sklearn.metrics import roc_auc_score

    values, lesion = [], []
    for sid, tissue in truth.items():
        store = store_path(out, sid)
        fmap = read_array(store, "feature_map")
        cells = fmap[..., 0] >= 0
        values.append(fmap[cells])
        lesion.append(tissue.lesion_at_tiles(TileGrid.from_dict(read_attrs(store)["tile_grid"]))[cells])
    values, lesion = np.concatenate(values), np.concatenate(lesion)
    aucs = [roc_auc_score(lesion, values[:, k]) for k in range(values.shape[1])]
    return max(max(a, 1 - a) for a in aucs)


@pytest.mark.slow
def test_two_labs_agree_after_normalisation(two_lab_cohort, tmp_path):
    slides, truth = two_lab_cohort
    plain_out, macenko_out = tmp_path / "none", tmp_path / "macenko"
    _run(slides, plain_out, "none")
    plain_auc = _lesion_auc(plain_out, truth)
    summary, config = _run(slides, macenko_out, "macenko")
    assert summary["failed"] == 0
    plain, normalised = _copy_difference(plain_out, truth), _copy_difference(macenko_out, truth)
    lesion_auc = _lesion_auc(macenko_out, truth)
    print(f"copy difference {plain:.3f} -> {normalised:.3f} ({plain / normalised:.2f}x), lesion AUC "
          f"{plain_auc:.3f} -> {lesion_auc:.3f}")
    assert plain / normalised >= 1.6, (plain, normalised)  # measured 2.0-3.9x (0.14-0.22 -> 0.055-0.07)
    # 32-µm tiles of tiny slides: ~0.73-0.85 either way (measured -0.06 to +0.10); the planted lesion still separates.
    # On 128-µm tiles of a larger cohort normalisation raises it (benchmarks/stain_batches.py)
    assert lesion_auc >= 0.7 and lesion_auc >= plain_auc - 0.08, (plain_auc, lesion_auc)

    # the IHC-like slide: described as scanned, with the reason in its store and in the manifest
    ihc = read_attrs(store_path(macenko_out, "ihc"))["stain"]
    assert ihc["normalised"] is False and "no eosin" in ihc["warning"]
    assert Manifest(macenko_out).slides["ihc"]["stain"]["warning"] == ihc["warning"]
    normalised_ids = {s.name[:-5] for s in list_stores(macenko_out) if read_attrs(s)["stain"]["normalised"]}
    assert normalised_ids == set(truth)

    # one target for the run: in OUT/config.yaml, every store's describe settings and the reducer; estimates cached
    target = yaml.safe_load((macenko_out / "config.yaml").read_text())["stain"]["target"]
    assert set(target) == {"stain_vectors", "max_concentrations", "background"}
    assert read_attrs(store_path(macenko_out, "a_slide_000"))["config"]["stain"]["target"] == target
    reducer = load_reducer(macenko_out / "reducer")
    assert reducer.fit_info["stain"]["target"] == target
    cache = json.loads((macenko_out / STAIN_JSON).read_text())
    assert set(cache["slides"]) == set(truth) | {"ihc"}
    assert not (macenko_out / "slides" / KEPT_THUMBNAILS).exists()

    # a rerun is current (same target from the cache); predict's describe settings carry the target
    again = describe_slides([slides], macenko_out, config, runner=LocalRunner(), progress=False)
    assert again["skipped"] == len(truth) + 1
    info = {"describe_config": read_attrs(store_path(macenko_out, "a_slide_000"))["config"],
            "config": {"reduce": config.reduce.model_dump(), "train": config.train.model_dump()}}
    assert describe_config_for(info, None).stain.target == target
    before = {**info, "describe_config": {k: v for k, v in info["describe_config"].items() if k != "stain"}}
    assert describe_config_for(before, None).stain.method == "none"  # a model from before stain normalisation
    assert with_reducer_stain(config_from_dict({}), reducer.fit_info["stain"]).stain.target == target


def test_unreadable_and_unestimable_slides_do_not_stop_the_batch(tmp_path):
    """A broken file fails with its own error; a slide with too little tissue for an estimate is described as it is."""
    from tests.conftest import write_test_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    write_test_slide(slides / "fine.svs", seed=1)
    write_test_slide(slides / "small.svs", seed=2, width=768, height=640)  # 77 stained pixels at 8 µm/px (455)
    (slides / "broken.svs").write_bytes(b"not a slide")
    config = config_from_dict({"tiling": {"tile_px": 64, "chunk_tiles": 8},
                               "stain": {"method": "reinhard", "min_tissue_pixels": 300}})
    errors: dict = {}
    summary = describe_slides([slides], tmp_path / "out", config, runner=LocalRunner(), progress=False, errors=errors)
    assert set(errors) == {"broken"}, errors
    assert summary["done"] == 2
    stains = {s: read_attrs(store_path(tmp_path / "out", s))["stain"] for s in ("fine", "small")}
    assert stains["fine"]["normalised"] is True
    assert stains["small"]["normalised"] is False and "too little" in stains["small"]["warning"]


def test_reference_slide_and_given_target(tmp_path):
    """The target is the reference slide's estimate; a given target is used as it is; a missing reference is a
    config error before any slide is described."""
    from pipeline.core.errors import ConfigError
    from tests.conftest import write_test_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    write_test_slide(slides / "one.svs", seed=1)
    reference = write_test_slide(tmp_path / "reference.svs", seed=5, lesion=True)
    base = {"tiling": {"tile_px": 64, "chunk_tiles": 8}, "stain": {"min_tissue_pixels": 300}}
    config = config_from_dict({**base, "stain": {**base["stain"], "reference_slide": str(reference)}})
    describe_slides([slides], tmp_path / "ref", config, runner=LocalRunner(), progress=False)
    stain = read_attrs(store_path(tmp_path / "ref", "one"))["stain"]
    assert stain["normalised"] and stain["target_source"] == "reference_slide"
    target = yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["stain"]["target"]
    assert target == estimate_slide_stain(str(reference), config)["estimate"]

    given = config_from_dict({**base, "stain": {**base["stain"], "target": target}})
    describe_slides([slides], tmp_path / "given", given, runner=LocalRunner(), progress=False)
    assert read_attrs(store_path(tmp_path / "given", "one"))["stain"]["target_source"] == "given"
    assert np.array_equal(read_array(store_path(tmp_path / "given", "one"), "descriptors"),
                          read_array(store_path(tmp_path / "ref", "one"), "descriptors"), equal_nan=True)

    missing = config_from_dict({**base, "stain": {"reference_slide": str(tmp_path / "nowhere.svs")}})
    with pytest.raises(ConfigError, match="reference_slide"):
        describe_slides([slides], tmp_path / "missing", missing, runner=LocalRunner(), progress=False)


def test_a_new_estimate_revision_redoes_cached_estimates(monkeypatch):
    """Estimates cached by an older fit (another stained-pixel rule) are not reused: the revision is in their key."""
    config = config_from_dict({})
    before = estimation_hash(config)
    assert estimation_hash(config) == before
    monkeypatch.setattr(stain_cohort, "ESTIMATE_REVISION", stain_cohort.ESTIMATE_REVISION + 1)
    assert estimation_hash(config) != before
