"""Reading a saved model's settings (``model_info.json``), including models saved before ``train.recipe`` existed."""

from pipeline.core.config import TrainConfig
from pipeline.model.trained import saved_train_settings


def test_a_model_saved_before_recipes_reads_as_fine_tuned():
    old = TrainConfig(recipe="finetune", input_px=96).model_dump(mode="json")
    for key in ("recipe", "pooling", "epochs", "learning_rate"):  # keys added with the scratch recipe
        old.pop(key)
    settings = TrainConfig.model_validate(saved_train_settings({"config": {"train": old}}))
    assert (settings.recipe, settings.input_px, settings.pooling, settings.size_strategy) == (
        "finetune", 96, "avg", "resize")


def test_a_scratch_model_keeps_its_recipe():
    saved = TrainConfig().model_dump(mode="json")
    settings = TrainConfig.model_validate(saved_train_settings({"config": {"train": saved}}))
    assert settings == TrainConfig() and settings.recipe == "scratch"
