"""The tile encoders: each kind gives what its model gives when called directly on the same tiles; typed errors for a
missing file, an output that is not (n, d) and an input size the model does not take; the old ``cnn`` keys."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import DescriptorConfig, config_from_dict
from pipeline.core.errors import (ConfigError, EncoderError, EncoderInputSizeError, EncoderOutputError,
                                  EncoderWeightsMissingError)
from pipeline.describe.encoders import get_encoder, validate_encoder
from pipeline.describe.encoders.base import NORMALISATIONS
from pipeline.describe.encoders.placement import prefetched
from tests.conftest import shared_file

IMAGENET_MEAN, IMAGENET_STD = (np.asarray(v, np.float32) for v in NORMALISATIONS["imagenet"])


@pytest.fixture(scope="module")
def he_tiles():
    """Four real H&E tiles (48-px crops of the histolab fixtures)."""
    names = ["high-nuclei-score-level0.png", "low-nuclei-score-level0.png",
             "tissue-level0-4302-10273-4814-10785.png", "no-tissue.png"]
    return np.stack([np.asarray(Image.open(shared_file("histolab", "tiles", n)).convert("RGB"))[100:148, 100:148]
                     for n in names])


def tiny_onnx_model(path, input_px: int | None = 32, pool: bool = True, seed: int = 0, batch: int | str = "n"):
    """A 3x3 convolution (3 -> 4 channels), ReLU, global average pool and flatten: (n, 3, px, px) -> (n, 4).

    ``input_px`` None: a symbolic input size; ``pool`` False: the (n, 4, h, w) feature map comes out instead;
    ``batch``: the batch axis (a name: any size).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b")
    size = input_px or "px"
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"])]
    if pool:
        nodes += [helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    else:
        nodes += [helper.make_node("Identity", ["r"], ["y"])]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, size, size])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [batch, 3, size, size])], [out],
                              initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    return tiny_onnx_model(tmp_path / "tiny.onnx")


# --- each kind equals its model called directly -------------------------------------------------------------------


def test_onnx_encoder_equals_the_model_called_directly(he_tiles, onnx_file):
    import onnxruntime as ort

    encoder = get_encoder(DescriptorConfig(name="onnx", model=str(onnx_file)))
    got = encoder.encode(he_tiles)
    resized = np.stack([np.asarray(Image.fromarray(t).resize((32, 32), Image.BILINEAR)) for t in he_tiles])
    x = ((resized / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).astype(np.float32)
    direct = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == (4, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], got[3])  # nuclei-rich tissue and glass differ
    spec = encoder.spec
    assert (spec.kind, spec.input_px, spec.dims, spec.normalize, spec.device) == ("onnx", 32, 4, "imagenet", "cpu")
    assert spec.file_sha256["model"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert encoder.feature_names() == ["tiny_0", "tiny_1", "tiny_2", "tiny_3"]


def test_keras_encoder_equals_the_model_called_directly(he_tiles, tmp_path):
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(5, 3, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "tiny.keras"
    model.save(path)
    encoder = get_encoder(DescriptorConfig(name="keras", model=str(path)))
    tiles = he_tiles[:, :32, :32]
    direct = keras.ops.convert_to_numpy(model(tiles.astype(np.float32)))
    np.testing.assert_allclose(encoder.encode(tiles), direct, rtol=1e-5, atol=1e-6)
    assert (encoder.spec.input_px, encoder.spec.dims, encoder.spec.normalize) == (32, 5, "none")
    with pytest.raises(EncoderInputSizeError, match="takes 32-px input"):
        get_encoder(DescriptorConfig(name="keras", model=str(path), input_px=64))


def test_timm_encoder_equals_the_model_called_directly(he_tiles, tmp_path):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    checkpoint = tmp_path / "resnet10t.pth"
    torch.save(model.state_dict(), checkpoint)
    encoder = get_encoder(DescriptorConfig(name="timm", model="resnet10t", weights=str(checkpoint), input_px=64))
    x = torch.from_numpy(he_tiles).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.pretrained_cfg["mean"], model.pretrained_cfg["std"]))
    with torch.inference_mode():
        direct = model((x - mean) / std).numpy()
    np.testing.assert_allclose(encoder.encode(he_tiles), direct, rtol=1e-4, atol=1e-5)
    assert encoder.spec.dims == 512 and encoder.spec.file_sha256["weights"]


def test_timm_without_local_weights_names_the_file_to_provide(monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderWeightsMissingError, match="not in the local cache") as err:
        get_encoder(DescriptorConfig(name="timm", model="hf-hub:wsi-pipeline-tests/no-such-model"))
    assert "descriptor.weights" in err.value.fix


def test_stats_is_an_encoder_too(he_tiles):
    from pipeline.describe.descriptors import stats_descriptors

    encoder = get_encoder(DescriptorConfig())
    assert not encoder.learned and encoder.spec.dims == 25
    np.testing.assert_array_equal(encoder.encode(he_tiles), stats_descriptors(he_tiles))


# --- typed errors before any slide ------------------------------------------------------------------------------


def test_missing_files_name_the_file(tmp_path):
    pytest.importorskip("onnxruntime")
    missing = tmp_path / "models" / "uni.onnx"
    with pytest.raises(EncoderWeightsMissingError, match="ONNX model file does not exist") as err:
        get_encoder(DescriptorConfig(name="onnx", model=str(missing)))
    assert err.value.path == str(missing) and str(missing) in err.value.fix
    with pytest.raises(EncoderWeightsMissingError, match="Keras weights"):
        get_encoder(DescriptorConfig(name="keras", model="MobileNetV2", weights=str(tmp_path / "w.weights.h5")))
    with pytest.raises(EncoderError, match="needs descriptor.model"):
        get_encoder(DescriptorConfig(name="onnx"))
    with pytest.raises(EncoderError, match="no backbone 'NoSuchNet'"):
        get_encoder(DescriptorConfig(name="keras", model="NoSuchNet"))


def test_output_that_is_not_one_vector_per_tile(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tiny_onnx_model(tmp_path / "grid.onnx", pool=False)
    config = config_from_dict({"tiling": {"tile_px": 32}, "descriptor": {"name": "onnx", "model": str(path)}})
    with pytest.raises(EncoderOutputError, match=r"shape \(2, 4, 32, 32\) for 2 tiles"):
        validate_encoder(config)


def test_input_size_the_model_does_not_take(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tiny_onnx_model(tmp_path / "fixed.onnx", input_px=32)
    with pytest.raises(EncoderInputSizeError, match="takes 32-px input but descriptor.input_px is 64"):
        get_encoder(DescriptorConfig(name="onnx", model=str(path), input_px=64))
    single = tiny_onnx_model(tmp_path / "single.onnx", batch=1)
    with pytest.raises(EncoderInputSizeError, match="fixed batch size of 1") as err:
        get_encoder(DescriptorConfig(name="onnx", model=str(single)))
    assert "dynamic_axes" in err.value.fix
    free = tiny_onnx_model(tmp_path / "free.onnx", input_px=None)
    encoder = validate_encoder(config_from_dict({"tiling": {"tile_px": 64},
                                                 "descriptor": {"name": "onnx", "model": str(free), "input_px": 48}}))
    assert (encoder.spec.input_px, encoder.spec.dims) == (48, 4)


def test_declared_mpp_must_match_what_the_encoder_sees(onnx_file):
    # 32-px tiles at 1 µm/px into a 32-px input: 1 µm/px, but the encoder was trained at 0.5
    config = config_from_dict({"tiling": {"mpp": 1.0, "tile_px": 32},
                               "descriptor": {"name": "onnx", "model": str(onnx_file), "mpp": 0.5}})
    with pytest.raises(ConfigError, match="expects 0.5 µm/px") as err:
        validate_encoder(config)
    assert "tiling.tile_px to 16" in err.value.fix
    ok = config.with_overrides(tiling__tile_px=16)  # 16 px at 1 µm/px resized to 32 px: 0.5 µm/px
    assert validate_encoder(ok).spec.mpp == 0.5


# --- config: old keys, hashes -------------------------------------------------------------------------------------


def test_old_cnn_keys_read_as_keras_settings():
    old = config_from_dict({"descriptor": {"name": "cnn", "cnn_backbone": "ResNet50", "cnn_weights": "imagenet",
                                           "cnn_input_px": 128}})
    assert (old.descriptor.model, old.descriptor.weights, old.descriptor.input_px) == ("ResNet50", "pretrained", 128)
    stats = config_from_dict({"descriptor": {"name": "stats", "cnn_backbone": "MobileNetV2", "cnn_weights": "imagenet",
                                             "cnn_input_px": 224, "batch_tiles": 64}})  # an OUT/config.yaml of before
    assert stats.descriptor == DescriptorConfig()


def test_stats_hash_payload_is_the_one_from_before_encoders():
    assert DescriptorConfig().hash_payload() == {"name": "stats", "batch_tiles": 64, "cnn_backbone": "MobileNetV2",
                                                 "cnn_weights": "imagenet", "cnn_input_px": 224}


def test_model_file_content_is_in_the_describe_hash(tmp_path):
    pytest.importorskip("onnx")
    path = tiny_onnx_model(tmp_path / "enc.onnx", seed=0)
    config = config_from_dict({"descriptor": {"name": "onnx", "model": str(path)}})
    before = config.stage_hash("describe")
    moved = tmp_path / "elsewhere" / "copy.onnx"
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    assert config.with_overrides(descriptor__model=str(moved)).stage_hash("describe") == before  # content, not path
    tiny_onnx_model(path, seed=1)  # same path, other weights
    assert config.stage_hash("describe") != before
    assert config.with_overrides(descriptor__gpu_batch_tiles=1024).stage_hash("describe") == config.stage_hash("describe")


# --- reading ahead of the model -----------------------------------------------------------------------------------


def test_prefetched_keeps_order_and_raises_the_readers_error():
    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise OSError("tile 2 does not decode")

    got = []
    with pytest.raises(OSError, match="does not decode"):
        for item in prefetched(broken()):
            got.append(item)
    assert got == [1]
    first = next(iter(prefetched(iter(range(1000)), depth=1)))  # the consumer stops early: the reader ends
    assert first == 0
