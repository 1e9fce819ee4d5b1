"""Every command-line option of ``wsi-pipeline``, each defined once.

``ConfigOption`` wraps one field of the typed config (``pipeline/config.py``): its help is the field's description
plus its default, its choices are the field's ``Literal`` values (or the few integers its bounds allow), its type
comes from the annotation, and it knows the ``section__key`` override it sets. So ``--help`` cannot drift from the
config. ``Option`` is a plain option (paths, flags, ``--scheduler``). ``OPTIONS`` maps each option's name (its long
flag, or its name when positional) to it; the sub-commands in ``pipeline/cli.py`` only list the names they take.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Callable

import annotated_types
from pydantic.fields import FieldInfo

from .core.config import PipelineConfig

MAX_INT_CHOICES = 8  # an int field bounded to at most this many values is offered as choices (e.g. reduce.components)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def config_field(section: str, key: str) -> FieldInfo:
    """The pydantic field ``section.key`` of ``PipelineConfig``."""
    return PipelineConfig.model_fields[section].annotation.model_fields[key]


def _bound(field: FieldInfo, kind: type) -> Any:
    return next((getattr(m, kind.__name__.lower()) for m in field.metadata if isinstance(m, kind)), None)


class Option:
    """One argparse argument: flags and keyword arguments given once; ``add_to`` puts it on a sub-parser."""

    def __init__(self, *flags: str, help: str, overrides: Callable[[Any], dict] | None = None, **kwargs: Any):
        self.flags = flags
        self.help = help
        self.kwargs = kwargs
        self._overrides = overrides

    @property
    def name(self) -> str:
        """The long flag (``--verbose`` for ``-v/--verbose``), or the name of a positional argument."""
        return next((f for f in self.flags if f.startswith("--")), self.flags[0])

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.name.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser, *, required: bool | None = None, note: str | None = None):
        """Add to ``parser``; ``required`` and a command-specific ``note`` (appended to the help) may vary per use."""
        kwargs = dict(self.kwargs)
        if required is not None:
            kwargs["required"] = required
        text = f"{self.help}; {note}" if note else self.help
        return parser.add_argument(*self.flags, help=text.replace("%", "%%"), **kwargs)

    def overrides(self, args: argparse.Namespace) -> dict[str, Any]:
        """The ``section__key`` config overrides this option's value in ``args`` asks for (none when not given)."""
        value = getattr(args, self.dest, None)
        if self._overrides is None or value is None:
            return {}
        return self._overrides(value)


class ConfigOption(Option):
    """An option that sets the config field ``section.key``; help, type and choices are taken from the field."""

    def __init__(self, flag: str, section: str, key: str, *, dest: str | None = None):
        field = config_field(section, key)
        self.section, self.key = section, key
        description = field.description or f"{section} {key.replace('_', ' ')}"
        help_text = f"{description} (default: {field.default}; config key {section}.{key})"
        kwargs: dict[str, Any] = {"dest": dest} if dest else {}
        kwargs.update(_argparse_type(field, f"{section}.{key}"))
        super().__init__(flag, help=help_text, overrides=lambda value: {self.override_key: value}, **kwargs)

    @property
    def override_key(self) -> str:
        return f"{self.section}__{self.key}"


def _argparse_type(field: FieldInfo, where: str) -> dict[str, Any]:
    """``type`` (and ``choices``) for argparse from a field's annotation: Literal, float, int or str, maybe | None."""
    annotation = field.annotation
    if typing.get_origin(annotation) is not typing.Literal:  # unwrap ``X | None``
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else annotation
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        return {"type": type(values[0]), "choices": list(values)}
    if annotation is float:
        return {"type": _positive_float} if _bound(field, annotated_types.Gt) == 0 else {"type": float}
    if annotation is int:
        low, high = _bound(field, annotated_types.Ge), _bound(field, annotated_types.Le)
        if low is not None and high is not None and high - low < MAX_INT_CHOICES:
            return {"type": int, "choices": list(range(low, high + 1))}
        return {"type": int}
    if annotation is str:
        return {"type": str}
    raise TypeError(f"config field {where} ({field.annotation}) has no command-line type")


def _scheduler_overrides(address: str) -> dict[str, Any]:
    return {"cluster__kind": "address", "cluster__address": address} if address else {}


_ALL = (
    # where the inputs and outputs are
    Option("slides", nargs="+", help="slide files or directories"),
    Option("--slides", nargs="+", required=True, help="slide files and/or directories"),
    Option("out", type=Path, help="output directory of an earlier run"),
    Option("--out", type=Path, required=True,
           help="the run's output directory: stages read what earlier stages wrote there and add their outputs"),
    Option("--labels", type=Path, help="labels CSV: slide_id,label[,patient_id,split]"),
    Option("--model", type=Path, help="model directory written by train"),
    Option("--reducer", type=Path, help="map with this saved reducer (OUT/reducer or MODEL/reducer) instead of "
                                        "fitting one; its method and K are used"),
    Option("--config", type=Path, help="YAML config (see workflows/)"),
    # settings of the typed config
    ConfigOption("--mpp", "tiling", "mpp"),
    ConfigOption("--tile-px", "tiling", "tile_px"),
    ConfigOption("--stride-px", "tiling", "stride_px"),
    ConfigOption("--mpp-override", "tiling", "mpp_override"),
    ConfigOption("--descriptor", "descriptor", "name"),
    ConfigOption("--encoder-model", "descriptor", "model"),
    ConfigOption("--reader", "reader", "kind"),
    ConfigOption("--stain", "stain", "method", dest="stain_method"),
    ConfigOption("--annotations", "annotations", "dir"),
    ConfigOption("--workers", "cluster", "workers"),
    ConfigOption("--method", "reduce", "method", dest="reduce_method"),
    ConfigOption("--components", "reduce", "components", dest="reduce_components"),
    ConfigOption("--folds", "train", "folds"),
    ConfigOption("--layer", "cam", "layer"),
    # how the command runs
    Option("--scheduler", overrides=_scheduler_overrides,
           help="address of an existing Dask scheduler, e.g. tcp://host:8786 (sets cluster.kind address)"),
    Option("-v", "--verbose", action="store_true", help="log progress to the console"),
    Option("--json", action="store_true", help="machine-readable output"),
    Option("--force", action="store_true", help="retrain even when the saved model is current"),
    # the viewer
    Option("--port", type=int, default=8765, help="port of the viewer's web server (default 8765; 0: any free port)"),
    Option("--host", default="127.0.0.1",
           help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)"),
)

OPTIONS: dict[str, Option] = {opt.name: opt for opt in _ALL}
if len(OPTIONS) != len(_ALL):
    raise RuntimeError("two command-line options share a name")

# --config, --workers, --scheduler, -v: taken by every command that runs Dask tasks
COMMON = ("--config", "--workers", "--scheduler", "--verbose")


def use(name: str, *, required: bool | None = None, note: str | None = None) -> tuple[str, dict]:
    """An option as one command takes it: required there, or with a note on what it means there."""
    if name not in OPTIONS:
        raise KeyError(f"no option {name}")
    return name, {k: v for k, v in {"required": required, "note": note}.items() if v is not None}


def add_options(parser: argparse.ArgumentParser, names) -> None:
    """Add the named options (names, or ``use(...)`` pairs) to a sub-parser, in order."""
    for item in names:
        name, extra = (item, {}) if isinstance(item, str) else item
        OPTIONS[name].add_to(parser, **extra)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``section__key`` overrides of every option given in ``args`` (``PipelineConfig.with_overrides``)."""
    overrides: dict[str, Any] = {}
    for opt in OPTIONS.values():
        overrides.update(opt.overrides(args))
    return overrides
