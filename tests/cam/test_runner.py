"""What makes a stored CAM stale (``cam.runner.cam_hash``) and what names a model in it (``model_identity``)."""

from pipeline.cam.runner import cam_hash
from pipeline.core.artefacts import model_identity
from pipeline.core.config import CamConfig
from pipeline.core.maps import EXCLUDED_FILL

MAP = {"reducer_hash": "r1", "config_hash": "c1", "excluded_fill": EXCLUDED_FILL, "store_fingerprint": "f1",
       "store_config_hash": "d1"}
MODEL = {"model_hash": "m1", "created": 100.0}


def test_a_cam_is_stale_when_its_map_or_model_is_made_again():
    base = cam_hash(MODEL, CamConfig(), "mixed7", MAP)
    assert cam_hash(MODEL, CamConfig(), "mixed7", dict(MAP)) == base
    for key, value in (("excluded_fill", "glass"), ("store_fingerprint", "f2"), ("store_config_hash", "d2"),
                       ("reducer_hash", "r2")):
        assert cam_hash(MODEL, CamConfig(), "mixed7", {**MAP, key: value}) != base, key
    assert cam_hash({**MODEL, "created": 101.0}, CamConfig(), "mixed7", MAP) != base  # trained again (--force)
    assert cam_hash(MODEL, CamConfig(), "mixed6", MAP) != base


def test_model_identity_names_the_hash_and_the_training():
    assert model_identity(MODEL) == "m1@100.0"
    assert model_identity({"model_hash": "m1"}) == "m1"
