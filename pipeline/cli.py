"""``wsi-pipeline`` command line: one sub-command per stage, each a thin wrapper over the stage's Python function.

Exit codes: 0 when the command finished (even if some slides failed: see ``OUT/manifest.json``), 2 for bad arguments,
config or labels (nothing was done), 1 for an unexpected error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .config import PipelineConfig, load_config
from .errors import ConfigError, LabelsError, OutputLockedError, PipelineError

log = logging.getLogger("pipeline")


def setup_logging(out_dir: Path | None, command: str, verbose: bool = False) -> Path | None:
    """Console logging, plus one log file per run in ``OUT/logs/`` with per-slide timings."""
    root = logging.getLogger("pipeline")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(console)
    if out_dir is None:
        return None
    log_dir = Path(out_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}.log"
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    return log_path


def _config_from_args(args: argparse.Namespace) -> PipelineConfig:
    config = load_config(getattr(args, "config", None))
    overrides = {
        "tiling__mpp": getattr(args, "mpp", None),
        "tiling__tile_px": getattr(args, "tile_px", None),
        "tiling__stride_px": getattr(args, "stride_px", None),
        "tiling__mpp_override": getattr(args, "mpp_override", None),
        "descriptor__name": getattr(args, "descriptor", None),
        "cluster__workers": getattr(args, "workers", None),
        "reader__kind": getattr(args, "reader", None),
    }
    if getattr(args, "scheduler", None):
        overrides.update(cluster__kind="address", cluster__address=args.scheduler)
    return config.with_overrides(**overrides)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (see workflows/)")
    p.add_argument("--workers", type=int, help="local Dask worker processes (default: one per core)")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to the console")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wsi-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print slide metadata (dimensions, levels, vendor, mpp and its source)")
    p.add_argument("slides", nargs="+", help="slide files or directories")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--mpp-override", type=_positive_float)

    p = sub.add_parser("describe", help="tile slides and write per-tile descriptors to Zarr stores")
    p.add_argument("--slides", nargs="+", required=True, help="slide files and/or directories")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mpp", type=_positive_float, help="target resolution, µm/px (default 0.5)")
    p.add_argument("--tile-px", type=int, help="tile size in pixels at the target resolution (default 256)")
    p.add_argument("--stride-px", type=int, help="step between tiles (default: tile size, no overlap)")
    p.add_argument("--mpp-override", type=_positive_float, help="level-0 µm/px to use for every slide of this run")
    p.add_argument("--descriptor", choices=["stats", "cnn"])
    p.add_argument("--reader", choices=["auto", "openslide", "tiff"])
    _add_common(p)

    p = sub.add_parser("retry", help="describe again only the slides that failed (settings of the last run)")
    p.add_argument("out", type=Path, help="output directory of an earlier run")
    p.add_argument("--mpp-override", type=_positive_float, help="level-0 µm/px for the retried slides")
    _add_common(p)
    return parser


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .slides import find_slides, read_slide_info

    paths, _ = find_slides(args.slides)
    rows, failures = [], 0
    for path in paths:
        try:
            rows.append(read_slide_info(path, mpp_override=args.mpp_override).to_dict())
        except PipelineError as err:
            failures += 1
            rows.append({"path": str(path), "error": err.to_record()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["slide_id", "vendor", "width_px", "height_px", "levels", "downsamples", "mpp", "mpp_source"]
    table = [header]
    for r in rows:
        if "error" in r:
            table.append([Path(r["path"]).name, "ERROR", r["error"]["code"], "", "", "", "", r["error"]["message"]])
            continue
        table.append([r["slide_id"], _fmt(r["vendor"]), str(r["width_px"]), str(r["height_px"]), str(r["level_count"]),
                      ",".join(f"{d:.4g}" for d in r["level_downsamples"]), _fmt(r["mpp"]), r["mpp_source"]])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _print_summary(name: str, summary: dict, out: Path, log_path: Path | None) -> None:
    parts = ", ".join(f"{k} {v}" for k, v in summary.items() if k != "seconds")
    print(f"{name}: {parts} in {summary.get('seconds', 0):.1f} s -> {out}")
    if summary.get("failed"):
        print(f"  failed slides and reasons: {out / 'manifest.json'}")
    if log_path:
        print(f"  log: {log_path}")


def cmd_describe(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .describe import describe_slides

    log_path = setup_logging(args.out, "describe", args.verbose)
    summary = describe_slides(args.slides, args.out, config)
    _print_summary("describe", summary, args.out, log_path)
    return 0


def cmd_retry(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .describe import RUN_CONFIG_NAME, retry_failed

    if args.config is None and (args.out / RUN_CONFIG_NAME).exists():
        # the last run's settings, with this command's overrides on top
        args.config = args.out / RUN_CONFIG_NAME
        config = _config_from_args(args)
    log_path = setup_logging(args.out, "retry", args.verbose)
    summary = retry_failed(args.out, config)
    _print_summary("retry", summary, args.out, log_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return cmd_inspect(args)
        config = _config_from_args(args)
        handler = COMMANDS[args.command]
        return handler(args, config)
    except (ConfigError, LabelsError, OutputLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


COMMANDS = {
    "describe": cmd_describe,
    "retry": cmd_retry,
}
