"""The configuration reference in docs/ is generated from the typed config: it must be current."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("make_config_md", REPO / "docs" / "make_config_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == module.render(), (
        "docs/config.md is stale: run `python docs/make_config_md.py`")


def test_every_config_key_is_described():
    from pipeline.core.config import PipelineConfig

    missing = [f"{section}.{name}" for section, field in PipelineConfig.model_fields.items()
               for name, sub in field.annotation.model_fields.items() if not sub.description]
    assert not missing, f"config keys without a description (shown by --help and docs/config.md): {missing}"
