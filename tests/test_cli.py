"""The command line, in process: what each sub-command parses, help taken from the typed config, exit codes."""

from __future__ import annotations

import argparse
import json
import typing
from pathlib import Path

import annotated_types
import pytest

from pipeline import cli
from pipeline.cli import _config_from_args, build_parser, main
from pipeline.core.config import PipelineConfig

# The config-backed options, written out here (not read from pipeline.cli_options): flag -> (section, key).
CONFIG_FLAGS = {
    "--mpp": ("tiling", "mpp"),
    "--tile-px": ("tiling", "tile_px"),
    "--stride-px": ("tiling", "stride_px"),
    "--mpp-override": ("tiling", "mpp_override"),
    "--descriptor": ("descriptor", "name"),
    "--encoder-model": ("descriptor", "model"),
    "--reader": ("reader", "kind"),
    "--workers": ("cluster", "workers"),
    "--method": ("reduce", "method"),
    "--components": ("reduce", "components"),
    "--folds": ("train", "folds"),
    "--layer": ("cam", "layer"),
}
COMMON = ["--config", "--workers", "--scheduler", "--verbose"]

# Every sub-command and the options it documents (README "Commands" and --help); positionals by name.
COMMAND_OPTIONS = {
    "inspect": ["slides", "--json", "--mpp-override"],
    "describe": ["--slides", "--out", "--mpp", "--tile-px", "--stride-px", "--mpp-override", "--descriptor",
                 "--encoder-model", "--reader", "--stain", "--annotations", *COMMON],
    "retry": ["out", "--mpp-override", *COMMON],
    "reduce": ["--out", "--method", "--components", "--reducer", *COMMON],
    "train": ["--out", "--labels", "--folds", "--force", "--config", "--scheduler", "--verbose"],
    "evaluate": ["--out", "--model", "--labels", "--config", "--verbose"],
    "predict": ["--model", "--slides", "--out", "--mpp-override", *COMMON],
    "cam": ["--out", "--model", "--layer", *COMMON],
    "report": ["--out"],
    "view": ["out", "--port", "--host", "--verbose"],
    "run": ["--slides", "--labels", "--out", "--mpp", "--tile-px", "--mpp-override", "--descriptor",
            "--encoder-model", "--stain", "--annotations", *COMMON],
}
REQUIRED = {
    "inspect": {"slides"}, "describe": {"--slides", "--out"}, "retry": {"out"}, "reduce": {"--out"},
    "train": {"--out", "--labels"}, "evaluate": {"--out"}, "predict": {"--model", "--slides", "--out"},
    "cam": {"--out"}, "report": {"--out"}, "view": {"out"}, "run": {"--slides", "--labels", "--out"},
}
COMMON_ARGV = ["--config", "c.yaml", "--workers", "3", "--scheduler", "tcp://h:1", "-v"]
COMMON_NS = {"config": Path("c.yaml"), "workers": 3, "scheduler": "tcp://h:1", "verbose": True}

# One command line per sub-command using every option it takes, and what the namespace must then hold.
FULL_ARGV = {
    "inspect": (["inspect", "a.svs", "dir", "--json", "--mpp-override", "0.25"],
                {"slides": ["a.svs", "dir"], "json": True, "mpp_override": 0.25}),
    "describe": (["describe", "--slides", "a.svs", "dir", "--out", "o", "--mpp", "0.25", "--tile-px", "128",
                  "--stride-px", "64", "--mpp-override", "0.3", "--descriptor", "onnx", "--encoder-model", "e.onnx",
                  "--reader", "tiff", *COMMON_ARGV],
                 {"slides": ["a.svs", "dir"], "out": Path("o"), "mpp": 0.25, "tile_px": 128, "stride_px": 64,
                  "mpp_override": 0.3, "descriptor": "onnx", "encoder_model": "e.onnx", "reader": "tiff",
                  **COMMON_NS}),
    "retry": (["retry", "o", "--mpp-override", "0.25", *COMMON_ARGV],
              {"out": Path("o"), "mpp_override": 0.25, **COMMON_NS}),
    "reduce": (["reduce", "--out", "o", "--method", "autoencoder", "--components", "1", "--reducer", "r",
                *COMMON_ARGV],
               {"out": Path("o"), "reduce_method": "autoencoder", "reduce_components": 1, "reducer": Path("r"),
                **COMMON_NS}),
    "train": (["train", "--out", "o", "--labels", "l.csv", "--folds", "5", "--force", "--config", "c.yaml",
               "--scheduler", "tcp://h:1", "--verbose"],
              {"out": Path("o"), "labels": Path("l.csv"), "folds": 5, "force": True, "config": Path("c.yaml"),
               "scheduler": "tcp://h:1", "verbose": True}),
    "evaluate": (["evaluate", "--out", "o", "--model", "m", "--labels", "l.csv", "--config", "c.yaml", "-v"],
                 {"out": Path("o"), "model": Path("m"), "labels": Path("l.csv"), "config": Path("c.yaml"),
                  "verbose": True}),
    "predict": (["predict", "--model", "m", "--slides", "new", "--out", "o", "--mpp-override", "0.25", *COMMON_ARGV],
                {"model": Path("m"), "slides": ["new"], "out": Path("o"), "mpp_override": 0.25, **COMMON_NS}),
    "cam": (["cam", "--out", "o", "--model", "m", "--layer", "mixed5", *COMMON_ARGV],
            {"out": Path("o"), "model": Path("m"), "layer": "mixed5", **COMMON_NS}),
    "report": (["report", "--out", "o"], {"out": Path("o")}),
    "view": (["view", "o", "--port", "9000", "--host", "0.0.0.0", "-v"],
             {"out": Path("o"), "port": 9000, "host": "0.0.0.0", "verbose": True}),
    "run": (["run", "--slides", "a.svs", "--labels", "l.csv", "--out", "o", "--mpp", "1", "--tile-px", "128",
             "--mpp-override", "0.25", "--descriptor", "timm", "--encoder-model", "resnet50", *COMMON_ARGV],
            {"slides": ["a.svs"], "labels": Path("l.csv"), "out": Path("o"), "mpp": 1.0, "tile_px": 128,
             "mpp_override": 0.25, "descriptor": "timm", "encoder_model": "resnet50", **COMMON_NS}),
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option_name(action: argparse.Action) -> str:
    return next((f for f in action.option_strings if f.startswith("--")), action.dest)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {_option_name(a): a for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def _field(section: str, key: str):
    return PipelineConfig.model_fields[section].annotation.model_fields[key]


def test_every_documented_command_is_there():
    assert list(_subparsers(build_parser())) == list(COMMAND_OPTIONS)


@pytest.mark.parametrize("command", list(COMMAND_OPTIONS))
def test_each_command_takes_exactly_its_documented_options(command):
    actions = _actions(_subparsers(build_parser())[command])
    assert list(actions) == COMMAND_OPTIONS[command]
    required = {name for name, a in actions.items() if a.required}
    assert required == REQUIRED[command]


@pytest.mark.parametrize("command", list(FULL_ARGV))
def test_each_command_parses_all_its_options(command):
    argv, expected = FULL_ARGV[command]
    args = build_parser().parse_args(argv)
    assert args.command == command
    assert args.handler is getattr(cli, f"cmd_{command}")
    assert {k: getattr(args, k) for k in expected} == expected


@pytest.mark.parametrize("command", list(FULL_ARGV))
def test_options_left_out_leave_the_config_alone(command):
    """Only the required arguments: no config override, so the config is the defaults."""
    argv = [command]
    for name in REQUIRED[command]:
        value = {"--labels": "l.csv", "--slides": "a.svs"}.get(name, "o")
        argv += [value] if not name.startswith("--") else [name, value]
    assert _config_from_args(build_parser().parse_args(argv)) == PipelineConfig()


def test_config_backed_help_choices_and_type_come_from_the_config():
    seen = set()
    for command, sub in _subparsers(build_parser()).items():
        sub.format_help()  # the whole help renders
        for name, action in _actions(sub).items():
            if name not in CONFIG_FLAGS:
                continue
            seen.add(name)
            section, key = CONFIG_FLAGS[name]
            field = _field(section, key)
            line = sub._get_formatter()._expand_help(action)  # the help text as --help prints it, unwrapped
            if field.description:
                assert field.description in line, (command, name)
            assert f"default: {field.default}" in line and f"{section}.{key}" in line, (command, name, line)
            annotation = field.annotation
            if typing.get_origin(annotation) is typing.Literal:
                assert action.choices == list(typing.get_args(annotation)), (command, name)
            else:
                bounds = {type(m): m for m in field.metadata}
                low, high = bounds.get(annotated_types.Ge), bounds.get(annotated_types.Le)
                if low and high and high.le - low.ge < 8:
                    assert action.choices == list(range(low.ge, high.le + 1)), (command, name)
                else:
                    assert action.choices is None, (command, name)
    assert seen == set(CONFIG_FLAGS)


def test_mpp_override_has_one_help_text():
    texts = {_actions(sub)["--mpp-override"].help for sub in _subparsers(build_parser()).values()
             if "--mpp-override" in _actions(sub)}
    assert len(texts) == 1 and _field("tiling", "mpp_override").description in texts.pop()


def test_config_from_args_builds_the_overrides():
    args = build_parser().parse_args(["describe", "--slides", "s", "--out", "o", "--mpp", "0.25", "--tile-px", "128",
                                      "--reader", "tiff", "--scheduler", "tcp://h:1"])
    config = _config_from_args(args)
    assert (config.tiling.mpp, config.tiling.tile_px, config.reader.kind) == (0.25, 128, "tiff")
    assert (config.cluster.kind, config.cluster.address) == ("address", "tcp://h:1")
    # everything not given keeps its default
    assert config.tiling.stride_px is None and config.descriptor.name == PipelineConfig().descriptor.name
    assert config.cluster.workers is None


# one valid command line per config-backed flag, and the value the config must then hold
OVERRIDE_CASES = {
    "--mpp": (["describe", "--slides", "s", "--out", "o"], "2", 2.0),
    "--tile-px": (["run", "--slides", "s", "--labels", "l", "--out", "o"], "64", 64),
    "--stride-px": (["describe", "--slides", "s", "--out", "o"], "100", 100),
    "--mpp-override": (["retry", "o"], "0.3", 0.3),
    "--descriptor": (["describe", "--slides", "s", "--out", "o"], "cnn", "cnn"),
    "--encoder-model": (["describe", "--slides", "s", "--out", "o"], "enc.onnx", "enc.onnx"),
    "--reader": (["describe", "--slides", "s", "--out", "o"], "openslide", "openslide"),
    "--workers": (["cam", "--out", "o"], "5", 5),
    "--method": (["reduce", "--out", "o"], "autoencoder", "autoencoder"),
    "--components": (["reduce", "--out", "o"], "2", 2),
    "--folds": (["train", "--out", "o", "--labels", "l"], "4", 4),
    "--layer": (["cam", "--out", "o"], "mixed5", "mixed5"),
}


@pytest.mark.parametrize("flag", list(CONFIG_FLAGS))
def test_every_config_backed_option_reaches_the_config(flag):
    argv, text, value = OVERRIDE_CASES[flag]
    section, key = CONFIG_FLAGS[flag]
    assert getattr(getattr(PipelineConfig(), section), key) != value  # the case tests a change
    config = _config_from_args(build_parser().parse_args([*argv, flag, text]))
    assert getattr(getattr(config, section), key) == value


def test_command_line_wins_over_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tiling:\n  mpp: 2.0\n  tile_px: 64\ncluster:\n  workers: 7\n")
    config = _config_from_args(build_parser().parse_args(
        ["describe", "--slides", "s", "--out", "o", "--config", str(path), "--mpp", "1.0"]))
    assert (config.tiling.mpp, config.tiling.tile_px, config.cluster.workers) == (1.0, 64, 7)


# --- exit codes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, missing", [
    (["describe", "--out", "o"], "--slides"),
    (["describe", "--slides", "s"], "--out"),
    (["train", "--out", "o"], "--labels"),
    (["predict", "--slides", "s", "--out", "o"], "--model"),
    (["run", "--slides", "s", "--out", "o"], "--labels"),
    (["report"], "--out"),
    (["retry"], "out"),
    (["inspect"], "slides"),
    ([], "command"),
])
def test_missing_required_argument_exits_2(argv, missing, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "required" in err and missing in err


@pytest.mark.parametrize("extra, named", [
    (["--mpp", "-1"], "must be > 0"),
    (["--mpp", "0"], "must be > 0"),
    (["--mpp-override", "abc"], "--mpp-override"),
    (["--tile-px", "12.5"], "--tile-px"),
    (["--reader", "pillow"], "invalid choice: 'pillow'"),
    (["--descriptor", "vgg"], "invalid choice: 'vgg'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_value_is_rejected_by_the_parser_with_exit_2(extra, named, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        main(["describe", "--slides", str(tmp_path), "--out", str(out), *extra])
    assert exc.value.code == 2 and named in capsys.readouterr().err
    assert not out.exists()


def test_components_outside_the_config_bounds_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reduce", "--out", str(tmp_path), "--components", "4"])
    assert exc.value.code == 2 and "invalid choice: 4" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["describe", "--tile-px", "4"], "tiling.tile_px"),
    (["describe", "--stride-px", "512"], "stride_px (512) must not exceed tile_px (256)"),
    (["describe", "--workers", "0"], "cluster.workers"),
    (["train", "--labels", "l.csv", "--folds", "1"], "train.folds"),
])
def test_value_the_config_rejects_returns_2_before_anything_runs(argv, named, tmp_path, capsys):
    out = tmp_path / "o"
    command, *rest = argv
    slides = ["--slides", str(tmp_path)] if command == "describe" else []
    assert main([command, *slides, "--out", str(out), *rest]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config (command line)") and named in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["describe", "train"])
def test_bad_config_file_returns_2_naming_the_key(command, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling:\n  tile_size: 3\n")
    out = tmp_path / "o"
    extra = ["--slides", str(tmp_path)] if command == "describe" else ["--labels", str(tmp_path / "l.csv")]
    assert main([command, *extra, "--out", str(out), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "tiling.tile_size: unknown key" in err and str(bad) in err
    assert not out.exists()


def test_missing_config_file_returns_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["reduce", "--out", str(tmp_path), "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "config file not found" in err


def test_labels_naming_unknown_slides_return_2(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nnope_a,0\nnope_b,1\n")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["train", "--out", str(out), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert str(labels) in err and "nope_a" in err and "nope_b" in err
    assert not (out / "model").exists()


def test_version_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("wsi-pipeline ")


def test_inspect_real_slide_returns_0(cmu_slide, capsys):
    assert main(["inspect", "--json", str(cmu_slide)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["slide_id"] == cmu_slide.stem and row["mpp_source"] == "slide_metadata" and row["width_px"] == 2220
    assert main(["inspect", "--json", "--mpp-override", "0.25", str(cmu_slide)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["mpp"] == 0.25 and row["mpp_source"] == "override"


def test_inspect_unreadable_file_is_reported_not_fatal(tmp_path, capsys):
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide")
    assert main(["inspect", str(bad)]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split()[0] == "slide_id" and "ERROR" in row and "unsupported_format" in row
