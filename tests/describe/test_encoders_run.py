"""Learned encoders in the describe runner: stores made with an ONNX encoder, typed errors before any slide is read,
block tasks on the GPU worker of a mixed cluster, and the whole ``run`` on a generated cohort."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.config import config_from_dict
from pipeline.core.errors import EncoderInputSizeError, EncoderOutputError, EncoderWeightsMissingError
from pipeline.core.parallel import LocalRunner
from pipeline.core.store import read_array, read_attrs, store_path
from pipeline.describe.encoders import get_encoder
from pipeline.describe.runner import describe_slides
from pipeline.slides.reader_choice import open_reader
from pipeline.slides.tiling import TileGrid, iter_tile_batches

from .test_encoders import tiny_onnx_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two small generated slides (Aperio-style, 0.25 µm/px) and their labels."""
    from sample_data.synthetic import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort"), n_per_class=1, width_px=1600, height_px=1200)


def onnx_config(model, **descriptor):
    # stain none: the stored vectors are compared with the encoder on the tiles as OpenSlide reads them
    return config_from_dict({"tiling": {"mpp": 1.0, "tile_px": 32, "chunk_tiles": 4}, "stain": {"method": "none"},
                             "descriptor": {"name": "onnx", "model": str(model), **descriptor}})


def test_describe_with_an_onnx_encoder(cohort, tmp_path):
    model = tiny_onnx_model(tmp_path / "enc.onnx", input_px=16)
    config = onnx_config(model)
    out = tmp_path / "out"
    slide = cohort / "slide_000.svs"
    summary = describe_slides([slide], out, config, runner=LocalRunner(), progress=False)
    assert (summary["done"], summary["failed"]) == (1, 0)
    store = store_path(out, "slide_000")
    attrs = read_attrs(store)
    encoder = attrs["descriptor"]["encoder"]
    assert attrs["descriptor"]["dims"] == 4 and attrs["descriptor"]["feature_names"][0] == "enc_0"
    assert (encoder["kind"], encoder["input_px"], encoder["normalize"]) == ("onnx", 16, "imagenet")
    assert encoder["file_sha256"]["model"] == get_encoder(config.descriptor).spec.file_sha256["model"]
    assert attrs["encoded_on"] == ["client (cpu, float32)"]
    # the stored vectors are the encoder's on the tiles read from the slide
    values = read_array(store, "descriptors")
    tissue = read_array(store, "tissue_mask") & np.isfinite(values[..., 0])  # tissue tiles QC kept
    grid = TileGrid.from_dict(attrs["tile_grid"])
    assert np.isfinite(values[tissue]).all() and np.isnan(values[~tissue]).all()
    with open_reader(str(slide), None) as handle:  # OpenSlide: the same pixels as either reader
        positions, tiles = next(iter_tile_batches(handle, grid, tissue, (0, grid.rows, 0, grid.cols), 10, ""))
    direct = get_encoder(config.descriptor).encode(tiles)
    np.testing.assert_allclose(values[positions[:, 0], positions[:, 1]], direct, rtol=1e-5, atol=1e-6)
    # a rerun with the same model redoes nothing; new weights in the same file make every store stale
    assert describe_slides([slide], out, config, runner=LocalRunner(), progress=False)["skipped"] == 1
    tiny_onnx_model(model, input_px=16, seed=5)
    assert describe_slides([slide], out, config, runner=LocalRunner(), progress=False)["done"] == 1


@pytest.mark.parametrize("case, error, match", [
    ("missing", EncoderWeightsMissingError, "ONNX model file does not exist"),
    ("grid", EncoderOutputError, "one vector per tile"),
    ("size", EncoderInputSizeError, "takes 16-px input but descriptor.input_px is 64"),
])
def test_bad_encoders_stop_before_any_slide_is_read(cohort, tmp_path, case, error, match):
    model = {"missing": lambda: tmp_path / "nowhere" / "enc.onnx",
             "grid": lambda: tiny_onnx_model(tmp_path / "grid.onnx", input_px=16, pool=False),
             "size": lambda: tiny_onnx_model(tmp_path / "fixed.onnx", input_px=16)}[case]()
    config = onnx_config(model, input_px=64) if case == "size" else onnx_config(model)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        describe_slides([cohort], out, config, runner=LocalRunner(), progress=False)
    assert not out.exists()  # no manifest, no store, no lock: nothing was started


def test_cli_names_the_missing_model_file_and_exits_2(cohort, tmp_path, capsys):
    from pipeline.cli import main

    missing = tmp_path / "models" / "uni.onnx"
    code = main(["describe", "--slides", str(cohort), "--out", str(tmp_path / "out"), "--descriptor", "onnx",
                 "--encoder-model", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "does not exist" in err


@pytest.mark.slow
def test_learned_encoder_blocks_run_on_the_gpu_worker(cohort, tmp_path):
    """A CPU worker and a worker advertising GPU=1: every block of the ONNX encoder is encoded on the GPU worker (the
    slide plans may run on either); the descriptors equal the in-process run's."""
    from distributed import Client

    from ..core.test_parallel import loopback_cluster

    model = tiny_onnx_model(tmp_path / "enc.onnx", input_px=16)
    local = tmp_path / "local"
    describe_slides([cohort], local, onnx_config(model), runner=LocalRunner(), progress=False)
    with loopback_cluster(tmp_path, [[], ["--resources", "GPU=1"]]) as (address, resources):
        gpu_name = next(name for name, res in resources.items() if res.get("GPU"))
        config = config_from_dict({**onnx_config(model).model_dump(mode="json"),
                                   "cluster": {"kind": "address", "address": address}})
        summary = describe_slides([cohort], tmp_path / "cluster", config, progress=False)
        with Client(address, timeout=30) as client:
            names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
    assert summary["done"] == 2
    for slide_id in ("slide_000", "slide_001"):
        attrs = read_attrs(store_path(tmp_path / "cluster", slide_id))
        workers = {entry.split(" ")[0] for entry in attrs["encoded_on"]}
        assert {names[w] for w in workers} == {gpu_name}
        np.testing.assert_allclose(read_array(store_path(tmp_path / "cluster", slide_id), "descriptors"),
                                   read_array(store_path(local, slide_id), "descriptors"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_whole_run_with_an_onnx_encoder(tmp_path):
    """describe -> reduce -> train -> evaluate -> CAM -> report on a six-slide generated cohort, ONNX descriptors."""
    from pipeline.run import run_all
    from sample_data.synthetic import make_cohort

    cohort = make_cohort(tmp_path / "cohort", n_per_class=3, width_px=2400, height_px=1800)
    model = tiny_onnx_model(tmp_path / "enc.onnx", input_px=16)
    config = config_from_dict({
        "tiling": {"mpp": 1.0, "tile_px": 32, "chunk_tiles": 8},
        "descriptor": {"name": "onnx", "model": str(model)},
        "train": {"input_px": 75, "epochs": 2, "batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.3},
        "cluster": {"workers": 1, "dashboard": False}})
    summary = run_all([cohort], cohort / "labels.csv", tmp_path / "out", config, progress=False)
    assert summary["describe"]["done"] == 6 and summary["cam"]["done"] == 6
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert all(rec["status"] == "done" for rec in manifest["slides"].values())
    attrs = read_attrs(store_path(tmp_path / "out", "slide_000"))
    assert attrs["descriptor"]["encoder"]["kind"] == "onnx"
    assert (tmp_path / "out" / "report.html").exists()
