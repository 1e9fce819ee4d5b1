"""The package layout is a rule, not a habit: every module under ``pipeline/`` belongs to a stage by its path, and
imports go only from later stages to earlier ones and to the core (see ``pipeline/__init__.py``).

Checked on the source with ``ast`` (nothing is imported): no import points to a later stage, ``pipeline.core``
imports no stage, no private name (``_name``) is imported from another module, and every module stays short.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# The walk of the pipeline, in order; a module may import its own stage, earlier stages and the core.
STAGES = ("core", "slides", "describe", "reduce", "model", "evaluate", "train", "predict", "cam", "report", "view")
# The entry points (command line, the Python API, the whole run) sit above every stage and may import anything.
ENTRY = {"__init__", "__main__", "console", "cli", "cli_options", "run", "api"}
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage_of(module: str) -> str | None:
    """The stage of ``pipeline.<...>``; None for an entry point (and for the package itself)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ENTRY:
        return None
    if parts[1] not in STAGES:
        raise AssertionError(f"{module} is in no stage: put it under one of {STAGES} or make it an entry point")
    return parts[1]


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in a module, at any depth (lazy imports count)."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            if target == "pipeline" or (node.level and not node.module):
                # ``from . import x``: each name is a module of that package
                found.extend((node.lineno, f"{target}.{name}", []) for name in names)
            else:
                found.append((node.lineno, target, names))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_stage():
    assert MODULES, PACKAGE
    for path in MODULES:
        stage_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_to_earlier_stages(path):
    module = module_name(path)
    stage = stage_of(module)
    if stage is None:
        return  # an entry point
    rank = STAGES.index(stage)
    for line, target, _ in imports(path):
        if not target.startswith("pipeline.") and target != "pipeline":
            continue
        target_stage = stage_of(target)
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        assert target_stage is not None, f"{where}: a stage must not import an entry point"
        if stage == "core":
            assert target_stage == "core", f"{where}: pipeline.core imports no stage"
        assert STAGES.index(target_stage) <= rank, (
            f"{where}: stage '{stage}' must not import the later stage '{target_stage}' (order: {' -> '.join(STAGES)})")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_from_another_module(path):
    module = module_name(path)
    for line, target, names in imports(path):
        if not target.startswith("pipeline") or target == module:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, (f"{path.relative_to(PACKAGE.parent)}:{line} imports private {private} from {target}: "
                             "make the name public or move the code that needs it")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_short(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines < MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines: split it by job"


def test_rule_checker_catches_a_backward_import(tmp_path, monkeypatch):
    """The checks above see lazy and relative imports: a model module importing train inside a function fails."""
    fake = tmp_path / "pipeline" / "model" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..train.runner import train\n    from ..core.store import _private\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "pipeline")
    with pytest.raises(AssertionError, match="must not import the later stage 'train'"):
        test_imports_go_only_to_earlier_stages(fake)
    with pytest.raises(AssertionError, match="imports private"):
        test_no_private_name_is_imported_from_another_module(fake)


def test_importing_the_package_does_not_import_keras_or_tensorflow():
    code = ("import sys, pipeline, pipeline.cli, pipeline.cam.heatmaps, pipeline.predict; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]"
