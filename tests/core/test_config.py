from pathlib import Path

import pytest

from pipeline.core.config import PipelineConfig, config_from_dict, load_config
from pipeline.core.errors import ConfigError


def test_defaults_are_the_documented_ones():
    cfg = PipelineConfig()
    assert cfg.tiling.mpp == 0.5 and cfg.tiling.tile_px == 256 and cfg.tiling.step_px == 256
    assert cfg.descriptor.name == "stats"


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tiling:\n  mpp: 0.5\n  tile_size: 256\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "tiling.tile_size: unknown key" in str(err.value)
    assert err.value.code == "bad_config"


def test_bad_value_is_named():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"tiling": {"mpp": -1}})
    assert "tiling.mpp" in str(err.value)


def test_stride_larger_than_tile_rejected():
    with pytest.raises(ConfigError, match="stride_px"):
        config_from_dict({"tiling": {"tile_px": 128, "stride_px": 256}})


def test_unfreeze_from_must_not_lie_beyond_the_head_block():
    with pytest.raises(ConfigError, match="unfreeze_from mixed9 lies beyond head_block mixed2"):
        config_from_dict({"train": {"recipe": "finetune", "head_block": "mixed2"}})
    cfg = config_from_dict({"train": {"recipe": "finetune", "head_block": "mixed2", "unfreeze_from": "mixed1"}})
    assert cfg.train.head_block == "mixed2"
    assert config_from_dict({"train": {"recipe": "finetune"}}).train.head_block == "mixed10"


def test_recipe_follows_the_weights_and_fills_only_unset_keys(tmp_path):
    from pipeline.core.config import SCRATCH_DEFAULTS

    scratch = PipelineConfig().train  # no weights: trained end to end from random initialisation
    assert scratch.recipe == "scratch"
    assert {k: getattr(scratch, k) for k in SCRATCH_DEFAULTS} == SCRATCH_DEFAULTS
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"")
    for given in ("imagenet", str(weights)):
        tuned = config_from_dict({"train": {"weights": given}}).train
        assert (tuned.recipe, tuned.head_block, tuned.input_px, tuned.size_strategy) == (
            "finetune", "mixed10", 299, "resize")
    own = config_from_dict({"train": {"head_block": "mixed1", "input_px": 128}}).train
    assert (own.recipe, own.head_block, own.input_px, own.pooling) == ("scratch", "mixed1", 128, "avg")
    # an explicit recipe wins over the weights, and a dumped config validates to the same settings
    assert config_from_dict({"train": {"recipe": "finetune"}}).train.input_px == 299
    assert type(scratch).model_validate(scratch.model_dump()) == scratch


def test_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("tiling: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_stage_hash_ignores_cluster_but_not_tiling():
    base = PipelineConfig()
    assert base.stage_hash("describe") == base.with_overrides(cluster__workers=7).stage_hash("describe")
    assert base.stage_hash("describe") == base.with_overrides(tiling__chunk_tiles=4).stage_hash("describe")
    assert base.stage_hash("describe") != base.with_overrides(tiling__mpp=1.0).stage_hash("describe")
    # a later stage's settings make later outputs stale, not earlier ones
    changed = base.with_overrides(reduce__components=1)
    assert changed.stage_hash("describe") == base.stage_hash("describe")
    assert changed.stage_hash("reduce") != base.stage_hash("reduce")


def test_shipped_workflows_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[2] / "workflows").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.tiling.mpp > 0, path


def test_dumped_settings_are_the_pure_python_dumpers_text_and_load_back(tmp_path):
    import yaml

    from pipeline.core.config import dump_config

    configs = [PipelineConfig(), config_from_dict({"qc": [], "stain": {"method": "none"}, "tiling": {"mpp": 0.25}})]
    configs += [load_config(path) for path in sorted(Path(__file__).parents[2].glob("workflows/*.yaml"))]
    for cfg in configs:
        text = dump_config(cfg)
        assert text == yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        (tmp_path / "run.yaml").write_text(text)
        assert load_config(tmp_path / "run.yaml") == cfg
