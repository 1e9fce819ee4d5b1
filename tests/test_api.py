"""The lab-script API end to end: a small generated cohort is described, reduced and a model trained on it once
(tiny InceptionV3 settings); then workflows/lab_script.py runs a new slide through describe_slide, map_slide,
predict_slide and cam_slide, and the cohort CAM runner agrees with what cam_slide wrote."""

import importlib.util
import json

import numpy as np
import pytest

import pipeline
from pipeline.core.config import config_from_dict
from pipeline.core.parallel import LocalRunner
from pipeline.core.store import array_attrs, read_array, read_attrs
from pipeline.describe.runner import describe_slides
from pipeline.reduce.runner import reduce_slides
from pipeline.slides.tiling import TileGrid
from sample_data.synthetic import make_cohort
from tests.conftest import REPO, write_test_slide

TINY = config_from_dict({
    "tiling": {"mpp": 0.5, "tile_px": 32, "chunk_tiles": 8},
    "train": {"recipe": "finetune", "input_px": 75, "batch_size": 4, "head_epochs": 1, "finetune_epochs": 0, "augment": False,
              "val_fraction": 0.2, "test_fraction": 0.2},
})


def load_lab_script():
    spec = importlib.util.spec_from_file_location("lab_script", REPO / "workflows" / "lab_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """OUT/model of a real describe -> reduce -> train run on six generated slides (one model build for the module)."""
    from pipeline.train.runner import train

    root = tmp_path_factory.mktemp("api")
    cohort = make_cohort(root / "cohort", n_per_class=3, width_px=1200, height_px=900, seed=0)
    out = root / "out"
    assert describe_slides([cohort], out, TINY, runner=LocalRunner(), progress=False)["done"] == 6
    reduce_slides(out, TINY, runner=LocalRunner(), progress=False)
    train(out, cohort / "labels.csv", TINY)
    return out / "model"


@pytest.mark.slow
def test_lab_script_runs_one_slide_end_to_end(model_dir, tmp_path, capsys):
    slide = write_test_slide(tmp_path / "new slide.svs", width=1300, height=1000, seed=11, lesion=True)
    out = tmp_path / "lab"
    lab = load_lab_script()
    assert lab.main([str(slide), str(model_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    store = out / "slides" / "new_slide.zarr"
    attrs = read_attrs(store)
    # described with the training slides' settings, mapped with the model's reducer
    assert attrs["config"]["tiling"]["tile_px"] == 32 and attrs["complete"]
    reducer_hash = json.loads((model_dir / "reducer" / "reducer.json").read_text())["hash"]
    assert array_attrs(store, "feature_map")["reducer_hash"] == reducer_hash
    grid = TileGrid.from_dict(attrs["tile_grid"])
    tissue = read_array(store, "tissue_mask")
    cam = read_array(store, "cam")
    assert cam.shape == (grid.rows, grid.cols) == tissue.shape
    assert np.isnan(cam[~tissue]).all() and np.isfinite(cam[tissue]).all()
    assert cam[tissue].min() >= 0 and cam[tissue].max() == pytest.approx(1.0)
    for suffix in ("png", "tiff", "geojson"):
        path = out / "cam" / f"new_slide.{suffix}"
        assert path.stat().st_size > 100 and str(path) in printed
    geojson = json.loads((out / "cam" / "new_slide.geojson").read_text())
    assert geojson["type"] == "FeatureCollection"
    # the prediction printed by the script (predict_slide) is the model output cam_slide explained
    result = pipeline.cam_slide(store, model_dir)  # current: nothing is recomputed
    assert result["skipped"] and result["slide_id"] == "new_slide"
    np.testing.assert_array_equal(result["cam"], cam)
    shown = ", ".join(f"{label}: {p:.3f}" for label, p in result["probabilities"].items())
    assert f"prediction: {result['predicted_label']} ({shown})" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slides"]["new_slide"]["stages"]["cam"]["status"] == "done"

    # the cohort runner finds the slide current: same CAM hash, layer and files as cam_slides would write
    from pipeline.cam.runner import cam_slides

    summary = cam_slides(out, model_dir=model_dir, runner=LocalRunner(), progress=False)
    assert (summary["skipped"], summary["done"], summary["layer"]) == (1, 0, result["layer"])
