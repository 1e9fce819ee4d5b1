"""``predict``'s describe settings for new slides: the model's, not the caller's, for what changes the maps."""

from pipeline.core.config import PipelineConfig, config_from_dict
from pipeline.predict import describe_config_for


def _model_info(described: dict) -> dict:
    config = PipelineConfig()
    return {"describe_config": described,
            "config": {"reduce": config.reduce.model_dump(), "train": config.train.model_dump()}}


def test_new_slides_get_the_models_qc_not_the_callers():
    trained_with = config_from_dict({"qc": {"detectors": ["blur"], "blur_ratio": 0.2}}, source="test")
    described = trained_with.model_dump(mode="json", include={"tiling", "tissue", "descriptor", "stain", "qc"})
    caller = config_from_dict({"qc": ["pen", "blur", "debris"], "cluster": {"workers": 3}}, source="test")
    config = describe_config_for(_model_info(described), caller)
    assert config.qc.detectors == ["blur"] and config.qc.blur_ratio == 0.2
    assert config.stage_hash("describe") == trained_with.stage_hash("describe")  # the training stores' settings
    assert config.cluster.workers == 3  # where it runs stays the caller's


def test_a_model_from_before_qc_predicts_without_qc():
    described = PipelineConfig().model_dump(mode="json", include={"tiling", "tissue", "descriptor", "stain"})
    config = describe_config_for(_model_info(described), PipelineConfig())
    assert config.qc.detectors == []
