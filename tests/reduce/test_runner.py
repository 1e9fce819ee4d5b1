"""Reduce stage: cohort-fitted PCA / autoencoder reducers and the feature maps they write.

Descriptor stores come from the real describe stage run once (module fixture) on small generated slides; each test
that writes maps works on its own copy of that output directory.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.core.artefacts import EXPLAINED_VARIANCE_PNG, MAPS_DIR, REDUCER_DIR
from pipeline.core.config import PipelineConfig, ReduceConfig
from pipeline.core.errors import ReducerError, ReducerMismatchError
from pipeline.core.maps import EXCLUDED_FILL, FEATURE_MAP, FEATURE_MAP_FILL, FILLED_QC_CODES
from pipeline.core.parallel import LocalRunner
from pipeline.core.pictures import display_factor
from pipeline.core.store import array_attrs, list_stores, read_array, read_attrs, store_path, write_array
from pipeline.describe.runner import describe_slides
from pipeline.reduce.fitting import fit_on_sample, fit_reducer
from pipeline.reduce.maps import compute_feature_map, map_is_current, map_slide
from pipeline.reduce.reducers import AUTOENCODER_FILE, REDUCER_ARRAYS, REDUCER_JSON, descriptor_signature, load_reducer
from pipeline.reduce.runner import reduce_slides
from pipeline.reduce.sampling import collect_sample, reduce_settings_hash
from pipeline.slides.tiling import TileGrid
from sample_data.synthetic import SyntheticTissue, write_slide

# 0.25 µm/px slides, 64-px tiles at 0.5 µm/px: a 2048 x 1536 slide is a 12 x 16 grid.
SLIDES = {
    "lesion": dict(width_px=2048, height_px=1536, seed=1, lesion=True, lesion_fraction=0.3),
    "plain": dict(width_px=2048, height_px=1536, seed=2),
    "big": dict(width_px=5120, height_px=3840, seed=3),  # 30 x 40 grid, ~6x the tiles
    "sparse": dict(width_px=2048, height_px=1536, seed=4, tissue_fraction=0.02),  # a few tissue tiles
}
SAMPLE_PER_SLIDE = 150
# QC without pen: the ink model flags the synthetic slides' lesion and basophilic patches (docs/design/qc.md, "Limit")
CONFIG = PipelineConfig().with_overrides(
    tiling__tile_px=64, tissue__min_object_um2=2000.0, tissue__min_hole_um2=2000.0, qc__detectors=["blur", "debris"],
    reduce__sample_tiles_per_slide=SAMPLE_PER_SLIDE, cluster__workers=2, cluster__dashboard=False)


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """OUT directory with the four slides described (stores only, no maps), and their SyntheticTissue."""
    root = tmp_path_factory.mktemp("reduce_cohort")
    tissues = {name: SyntheticTissue(**kw) for name, kw in SLIDES.items()}
    for name, tissue in tissues.items():
        write_slide(root / "slides" / f"{name}.svs", tissue)
    out = root / "out"
    summary = describe_slides([root / "slides"], out, CONFIG, runner=LocalRunner(), progress=False)
    assert summary["done"] == len(SLIDES), summary
    return out, tissues


def fresh_copy(described, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(described[0], out)
    return out


def tissue_count(out, slide_id) -> int:
    return int(read_array(store_path(out, slide_id), "tissue_mask").sum())


@pytest.fixture(scope="module")
def reduced(described, tmp_path_factory):
    """The described cohort mapped once with PCA, K = 3 (read-only for the tests that use it)."""
    out = fresh_copy(described, tmp_path_factory.mktemp("reduced"))
    summary = reduce_slides(out, CONFIG, runner=LocalRunner(), progress=False)
    return out, summary


# --- fitting -------------------------------------------------------------------------------------------------------


def test_fit_sample_is_bounded_per_slide_and_pca_matches_sklearn(described):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    out, _ = described
    stores = list_stores(out)
    sample, descriptor, info = collect_sample(stores, CONFIG)
    assert tissue_count(out, "big") > 3 * SAMPLE_PER_SLIDE
    assert info["sample_tiles"]["big"] == SAMPLE_PER_SLIDE  # the big slide does not dominate
    assert info["sample_tiles"]["sparse"] == tissue_count(out, "sparse") < 20
    assert descriptor == descriptor_signature(read_attrs(stores[0]))

    reducer = fit_reducer(stores, CONFIG)
    assert reducer.fit_info["sample_rows"] == len(sample)
    z = StandardScaler().fit_transform(sample.astype(np.float64))
    sk = PCA(n_components=3).fit(z)
    ours, theirs = reducer.project(sample), sk.transform(z)
    signs = np.sign((ours * theirs).sum(axis=0))
    np.testing.assert_allclose(ours, theirs * signs, atol=1e-6)
    np.testing.assert_allclose(reducer.explained_variance_ratio[:3], sk.explained_variance_ratio_, rtol=1e-6)

    # scaling: the cohort's 1st / 99th percentiles go to 0 / 1, values are clipped into [0, 1]
    scaled = reducer.transform(sample)
    assert scaled.dtype == np.float32 and scaled.min() == 0 and scaled.max() == 1
    for k in range(3):
        assert 0.003 < np.mean(scaled[:, k] == 0) < 0.03 and 0.003 < np.mean(scaled[:, k] == 1) < 0.03
    np.testing.assert_allclose(np.median(scaled, axis=0),
                               (np.median(ours, axis=0) - reducer.low) / (reducer.high - reducer.low), atol=1e-6)


# --- the stage -----------------------------------------------------------------------------------------------------


def test_reduce_writes_contract_maps_for_all_sizes(reduced):
    out, summary = reduced
    assert summary["done"] == len(SLIDES) and summary["failed"] == 0 and summary["reducer"] == "fitted"
    reducer = load_reducer(out / REDUCER_DIR)
    manifest = json.loads((out / "manifest.json").read_text())
    for slide_id in SLIDES:
        store = store_path(out, slide_id)
        grid = read_attrs(store)["tile_grid"]
        fmap = read_array(store, FEATURE_MAP)
        mask = read_array(store, "tissue_mask")
        filled = np.isin(read_array(store, "qc_code"), FILLED_QC_CODES)
        assert fmap.shape == (grid["rows"], grid["cols"], 3) and fmap.dtype == np.float32
        assert (fmap[~mask & ~filled] == FEATURE_MAP_FILL).all()
        assert ((fmap[mask | filled] >= 0) & (fmap[mask | filled] <= 1)).all()
        attrs = array_attrs(store, FEATURE_MAP)
        assert attrs["excluded_fill"] == EXCLUDED_FILL and attrs["filled_cells"] == int((filled & ~mask).sum())
        assert {k: attrs[k] for k in ("method", "components", "reducer_hash", "fill_value")} == {
            "method": "pca", "components": 3, "reducer_hash": reducer.hash, "fill_value": -1.0}
        assert attrs["config_hash"] == reduce_settings_hash(CONFIG.reduce)
        picture = Image.open(out / MAPS_DIR / f"{slide_id}.png")
        f = display_factor(grid["rows"], grid["cols"])
        assert picture.size == (grid["cols"] * f, grid["rows"] * f)
        record = manifest["slides"][slide_id]["stages"]["reduce"]
        assert record["status"] == "done" and record["tissue_cells"] == int(mask.sum())
    assert read_array(store_path(out, "big"), FEATURE_MAP).shape[:2] == (30, 40)
    assert 0 < tissue_count(out, "sparse") < 20
    assert (out / MAPS_DIR / EXPLAINED_VARIANCE_PNG).is_file()


def test_qc_holes_take_their_nearest_described_cell_and_maps_of_another_fill_rule_are_stale(reduced, tmp_path):
    """Tiles QC excluded inside tissue are not glass in the map (a hole read as glass is a cue a network learns):
    each takes the values of its nearest described tile; cells outside the included regions stay background."""
    out = tmp_path / "out"
    shutil.copytree(reduced[0], out)
    store = store_path(out, "big")
    mask = read_array(store, "tissue_mask")
    qc = read_array(store, "qc_code")
    rows, cols = np.nonzero(mask)
    inked = (rows[::7], cols[::7])  # scattered tissue tiles, as pen strokes and blur leave them out
    outside = (rows[3::11], cols[3::11])
    for cells, code in ((inked, 1), (outside, 5)):
        mask[cells] = False
        qc[cells] = code
    descriptors = read_array(store, "descriptors")
    descriptors[~mask] = np.nan
    write_array(store, "tissue_mask", mask)
    write_array(store, "qc_code", qc)
    write_array(store, "descriptors", descriptors)
    fmap = map_slide(store, load_reducer(out / REDUCER_DIR))
    holes = np.isin(qc, FILLED_QC_CODES) & ~mask
    assert array_attrs(store, FEATURE_MAP)["filled_cells"] == int(holes.sum()) > 0
    assert (fmap[qc == 5] == FEATURE_MAP_FILL).all()
    described = np.argwhere(mask)
    for r, c in np.argwhere(holes):
        nearest = described[np.argmin(((described - (r, c)) ** 2).sum(axis=1))]
        d_min = ((nearest - (r, c)) ** 2).sum()
        ties = described[((described - (r, c)) ** 2).sum(axis=1) == d_min]
        assert any((fmap[r, c] == fmap[tr, tc]).all() for tr, tc in ties)
    assert map_is_current(store, array_attrs(store, FEATURE_MAP)["reducer_hash"])
    import zarr

    zarr.open_array(str(store / FEATURE_MAP), mode="r+").attrs["excluded_fill"] = "glass"  # a map of an older rule
    assert not map_is_current(store, array_attrs(store, FEATURE_MAP)["reducer_hash"])


def test_planted_lesion_separates_in_the_map(reduced, described):
    from sklearn.metrics import roc_auc_score

    out, _ = reduced
    tissue = described[1]["lesion"]
    store = store_path(out, "lesion")
    fmap = read_array(store, FEATURE_MAP)
    boxes = TileGrid.from_dict(read_attrs(store)["tile_grid"]).tile_boxes_l0()
    offsets = (np.arange(8) + 0.5) / 8  # 8 x 8 points per tile
    xs = boxes[..., 0, None, None] + offsets[None, :] * boxes[..., 2, None, None]
    ys = boxes[..., 1, None, None] + offsets[:, None] * boxes[..., 3, None, None]
    lesion_fraction = tissue.lesion_at(*np.broadcast_arrays(xs, ys)).mean(axis=(-2, -1))
    mask = read_array(store, "tissue_mask")
    inside, outside = mask & (lesion_fraction >= 0.75), mask & (lesion_fraction == 0)
    assert inside.sum() >= 8 and outside.sum() >= 30
    truth = np.r_[np.ones(inside.sum()), np.zeros(outside.sum())]
    aucs = [roc_auc_score(truth, np.r_[fmap[inside][:, k], fmap[outside][:, k]]) for k in range(3)]
    assert max(max(a, 1 - a) for a in aucs) > 0.9, aucs


def test_saved_reducer_gives_identical_maps_and_maps_new_output_without_refit(reduced, described, tmp_path):
    out, _ = reduced
    saved = out / REDUCER_DIR
    with np.load(saved / REDUCER_ARRAYS, allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
    loaded = load_reducer(saved)
    store = store_path(out, "lesion")
    stored = read_array(store, FEATURE_MAP)
    assert loaded.hash == array_attrs(store, FEATURE_MAP)["reducer_hash"]
    np.testing.assert_array_equal(compute_feature_map(store, loaded)[0], stored)

    # a new output directory mapped with --reducer: no fit, the reducer's K wins over the config's
    new_out = fresh_copy(described, tmp_path)
    summary = reduce_slides(new_out, CONFIG.with_overrides(reduce__components=1), reducer_path=saved,
                              runner=LocalRunner(), progress=False)
    assert summary["reducer"] == "loaded" and summary["reducer_hash"] == loaded.hash and summary["done"] == 4
    copied = json.loads((new_out / REDUCER_DIR / REDUCER_JSON).read_text())
    assert copied["fit"] == json.loads((saved / REDUCER_JSON).read_text())["fit"]
    for slide_id in SLIDES:
        np.testing.assert_array_equal(read_array(store_path(new_out, slide_id), FEATURE_MAP),
                                      read_array(store_path(out, slide_id), FEATURE_MAP))
    # the Python API: map_slide with a directory path (as predict does)
    again = map_slide(store_path(new_out, "big"), new_out)  # an output directory holding reducer/
    np.testing.assert_array_equal(again, read_array(store_path(out, "big"), FEATURE_MAP))


def test_damaged_or_mismatched_reducers_are_typed_errors(reduced, tmp_path):
    out, _ = reduced
    bad = tmp_path / "bad"
    shutil.copytree(out / REDUCER_DIR, bad)
    with np.load(bad / REDUCER_ARRAYS, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["low"] = arrays["low"] + 1.0
    np.savez(bad / REDUCER_ARRAYS, **arrays)
    with pytest.raises(ReducerError, match="content hash"):
        load_reducer(bad)
    with pytest.raises(ReducerError, match="no reducer.json"):
        load_reducer(tmp_path / "nowhere")

    renamed = {"name": "stats", "dims": 25, "feature_names": [f"f{i}" for i in range(25)]}
    other = fit_on_sample(np.random.default_rng(0).normal(size=(60, 25)), ReduceConfig(), renamed)
    with pytest.raises(ReducerMismatchError, match="other feature names") as err:
        map_slide(store_path(out, "plain"), other)
    assert err.value.code == "reducer_mismatch" and "plain.zarr" in str(err.value)
    narrow = fit_on_sample(np.random.default_rng(0).normal(size=(60, 5)), ReduceConfig())
    with pytest.raises(ReducerMismatchError, match="5 'array' descriptors"):
        map_slide(store_path(out, "plain"), narrow)


def test_rerun_skips_unchanged_slides_and_redoes_stale_ones(described, tmp_path):
    out = fresh_copy(described, tmp_path)

    def run(config=CONFIG):
        return reduce_slides(out, config, runner=LocalRunner(), progress=False)

    def map_stamps():
        return {s: (store_path(out, s) / FEATURE_MAP / "zarr.json").stat().st_mtime_ns for s in SLIDES}

    first = run()
    stamps = map_stamps()
    second = run()
    assert (second["reducer"], second["done"], second["skipped"]) == ("reused", 0, 4)
    assert map_stamps() == stamps and second["reducer_hash"] == first["reducer_hash"]

    # one slide described again (new fingerprint), one picture deleted: only those two are redone; the refit on
    # the same descriptors gives the same reducer, so the other maps stay
    import zarr

    zarr.open_group(str(store_path(out, "plain")), mode="r+").attrs["fingerprint"] = "re-described"
    (out / MAPS_DIR / "big.png").unlink()
    third = run()
    assert third["reducer"] == "fitted" and third["reducer_hash"] == first["reducer_hash"]
    assert (third["done"], third["skipped"]) == (2, 2)
    now = map_stamps()
    assert now["lesion"] == stamps["lesion"] and now["plain"] != stamps["plain"]

    fourth = run(CONFIG.with_overrides(reduce__components=2))  # other settings: new reducer, every map redone
    assert fourth["reducer"] == "fitted" and fourth["done"] == 4
    assert read_array(store_path(out, "sparse"), FEATURE_MAP).shape[-1] == 2


def test_autoencoder_stage_saves_and_reloads_identical_maps(described, tmp_path):
    out = fresh_copy(described, tmp_path)
    cfg = CONFIG.with_overrides(reduce__method="autoencoder", reduce__components=2, reduce__ae_epochs=5,
                                reduce__ae_hidden_units=16)
    summary = reduce_slides(out, cfg, runner=LocalRunner(), progress=False)
    assert summary["done"] == 4 and summary["method"] == "autoencoder"
    assert (out / REDUCER_DIR / AUTOENCODER_FILE).is_file()
    assert not (out / MAPS_DIR / EXPLAINED_VARIANCE_PNG).exists()
    loaded = load_reducer(out / REDUCER_DIR)
    for slide_id in ("lesion", "sparse"):
        store = store_path(out, slide_id)
        fmap = read_array(store, FEATURE_MAP)
        mask = read_array(store, "tissue_mask")
        filled = np.isin(read_array(store, "qc_code"), FILLED_QC_CODES)
        assert fmap.shape[-1] == 2 and (fmap[~mask & ~filled] == -1).all()
        assert ((fmap[mask] >= 0) & (fmap[mask] <= 1)).all()
        np.testing.assert_array_equal(compute_feature_map(store, loaded)[0], fmap)


def test_cli_reduce_on_a_dask_cluster(described, tmp_path, capsys):
    out = fresh_copy(described, tmp_path)
    # no --config: the settings describe saved in OUT/config.yaml (2 workers), K from the command line
    assert main(["reduce", "--out", str(out), "--components", "1", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "reduce: slides 4, done 4, skipped 0, failed 0, method pca, components 1, reducer fitted" in printed
    loaded = load_reducer(out / REDUCER_DIR)
    assert loaded.components == 1 and loaded.fit_info["sample_tiles"]["big"] == SAMPLE_PER_SLIDE
    for slide_id in SLIDES:  # computed on the workers, identical to an in-process transform
        store = store_path(out, slide_id)
        np.testing.assert_array_equal(read_array(store, FEATURE_MAP), compute_feature_map(store, loaded)[0])

    assert main(["reduce", "--out", str(out), "--reducer", str(out / "reducer"), "--method", "autoencoder"]) == 2
    assert "--method autoencoder (the reducer has pca) conflicts" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["reduce", "--out", str(empty)]) == 1
    assert "no described slides" in capsys.readouterr().err
