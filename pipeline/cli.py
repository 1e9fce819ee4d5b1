"""``wsi-pipeline`` command line: one sub-command per stage, each a thin wrapper over the stage's Python function.

Exit codes: 0 when the command finished (even if some slides failed: see ``OUT/manifest.json``), 2 for bad arguments,
config or labels (nothing was done), 1 for an unexpected error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .config import PipelineConfig, load_config
from .errors import ConfigError, LabelsError, OutputLockedError, PipelineError
from .outputs import log_file_handler

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
    handler, log_path = log_file_handler(out_dir, command)
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
    _add_reduce_parser(sub)
    _add_model_parsers(sub)
    _add_cam_parsers(sub)
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


# --- reduce -----------------------------------------------------------------------------------------------------


def _add_reduce_parser(sub) -> None:
    p = sub.add_parser("reduce", help="fit PCA or an autoencoder on the cohort's descriptors and write every slide's "
                                      "feature map (OUT/maps/*.png shows them)")
    p.add_argument("--out", type=Path, required=True, help="output directory of describe")
    p.add_argument("--method", dest="reduce_method", choices=["pca", "autoencoder"], help="reducer (default pca)")
    p.add_argument("--components", dest="reduce_components", type=int, choices=[1, 2, 3],
                   help="channels K of the feature map (default 3)")
    p.add_argument("--reducer", type=Path, help="map with this saved reducer (OUT/reducer or MODEL/reducer) "
                                                "instead of fitting one; its method and K are used")
    _add_common(p)


def cmd_reduce(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .describe import RUN_CONFIG_NAME
    from .reduce import MAPS_DIR, REDUCER_DIR, load_reducer, reduce_slides

    if args.config is None and (args.out / RUN_CONFIG_NAME).exists():
        # the settings the slides were described with, with this command's overrides on top
        args.config = args.out / RUN_CONFIG_NAME
        config = _config_from_args(args)
    config = config.with_overrides(reduce__method=args.reduce_method, reduce__components=args.reduce_components)
    if args.reducer is not None and (args.reduce_method or args.reduce_components):
        reducer = load_reducer(args.reducer)
        asked = {"--method": (args.reduce_method, reducer.method),
                 "--components": (args.reduce_components, reducer.components)}
        conflicts = [f"{flag} {want} (the reducer has {have})" for flag, (want, have) in asked.items()
                     if want is not None and want != have]
        if conflicts:
            raise ConfigError(f"{', '.join(conflicts)} conflicts with --reducer {args.reducer}",
                              fix="Leave out --method/--components with --reducer (the reducer's are used), or fit "
                                  "a new reducer without --reducer.")
    log_path = setup_logging(args.out, "reduce", args.verbose)
    summary = reduce_slides(args.out, config, reducer_path=args.reducer)
    _print_summary("reduce", summary, args.out, log_path)
    print(f"  maps: {args.out / MAPS_DIR}  reducer: {args.out / REDUCER_DIR}")
    return 0


# --- train / evaluate / predict ---------------------------------------------------------------------------------


def _add_model_parsers(sub) -> None:
    p = sub.add_parser("train", help="fine-tune InceptionV3 on the feature maps, then evaluate on held-out slides")
    p.add_argument("--out", type=Path, required=True, help="output directory with described and reduced slides")
    p.add_argument("--labels", type=Path, required=True, help="CSV: slide_id,label[,patient_id,split]")
    p.add_argument("--folds", type=int, help="k-fold cross-validation with K folds (overrides train.folds)")
    p.add_argument("--force", action="store_true", help="retrain even when the saved model is current")
    p.add_argument("--config", type=Path, help="YAML config (see workflows/)")
    p.add_argument("--scheduler", help="Dask scheduler address: training runs on one of its GPU workers "
                                       "(cluster.gpu_placement)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (one line per epoch) to the console")

    p = sub.add_parser("evaluate", help="test metrics, predictions and plots of a trained model")
    p.add_argument("--out", type=Path, required=True, help="output directory holding the slides' feature maps")
    p.add_argument("--model", type=Path, help="model directory (default OUT/model)")
    p.add_argument("--labels", type=Path, help="evaluate every slide of this labels CSV instead of the stored test set")
    p.add_argument("--config", type=Path, help="YAML config (see workflows/)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("predict", help="describe new slides, map them with the model's reducer, and predict")
    p.add_argument("--model", type=Path, required=True, help="model directory written by train (OUT/model)")
    p.add_argument("--slides", nargs="+", required=True, help="slide files and/or directories")
    p.add_argument("--out", type=Path, required=True, help="output directory for the new slides' stores")
    p.add_argument("--mpp-override", type=_positive_float, help="level-0 µm/px to use for every slide of this run")
    _add_common(p)


def _print_metrics(metrics: dict, out: Path) -> None:
    keys = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "mae", "quadratic_weighted_kappa")
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if metrics.get(k) is not None)
    print(f"  {metrics.get('split', 'test')} ({metrics.get('n_slides', 0)} slides): {shown or 'no metrics'}")
    summary = (metrics.get("fold_summary") or {}).get("mean")
    if summary:
        std = metrics["fold_summary"]["std"]
        print("  per fold: " + ", ".join(f"{k} {v:.3f} ± {std[k]:.3f}" for k, v in summary.items()))
    versus = metrics.get("network_vs_baseline") or {}
    if versus.get("metric"):
        verdict = ("WARNING: the network does worse than the baseline" if versus["network_below_baseline"]
                   else f"network {versus['margin']:+.3f}")
        print(f"  map-statistics baseline: {versus['metric']} {versus['baseline']:.3f} ({verdict})")
    print(f"  metrics: {out / 'metrics.json'}  predictions: {out / 'predictions.csv'}  plots: {out / 'plots'}")


def cmd_train(args: argparse.Namespace, config: PipelineConfig) -> int:
    import json as _json

    from .parallel import task_runner
    from .train import train

    log_path = setup_logging(args.out, "train", args.verbose)
    # A cluster is joined only when training may go to its GPU workers; a local one would just sit idle.
    remote = config.cluster.kind != "local" and config.cluster.gpu_placement != "client"
    with task_runner(config.cluster, in_process=not remote) as runner:
        summary = train(args.out, args.labels, config, folds=args.folds, force=args.force,
                        verbose=2 if args.verbose else 0, runner=runner)
    state = "model is current, training skipped" if summary["skipped"] else f"trained in {summary['seconds']:.1f} s"
    where = summary.get("trained_on") or {}
    if not summary["skipped"] and where.get("worker"):
        state += f" on worker {where['worker']} ({where.get('gpus', 0)} GPU)"
    print(f"train: {summary['slides']} labelled slides, {state} -> {args.out / 'model'}")
    _print_metrics(_json.loads((args.out / "metrics.json").read_text(encoding="utf-8")), args.out)
    if log_path:
        print(f"  log: {log_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .evaluate import evaluate

    setup_logging(args.out, "evaluate", args.verbose)
    metrics = evaluate(args.out, args.model, args.labels)
    print("evaluate:")
    _print_metrics(metrics, args.out)
    return 0


def cmd_predict(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .evaluate import PREDICT_DIR, predict_slides

    log_path = setup_logging(args.out, "predict", args.verbose)
    result = predict_slides(args.slides, args.model, args.out, config)
    for row in result["predictions"]:
        probs = " ".join(f"{k}:{v:.3f}" for k, v in row["probabilities"].items())
        print(f"{row['slide_id']}\t{row['predicted_label']}\t{probs}")
    for slide_id, record in result["failed"].items():
        print(f"{slide_id}\tFAILED {record['code']}: {record['message']}")
    print(f"predict: {len(result['predictions'])} predicted, {len(result['failed'])} failed -> "
          f"{args.out / PREDICT_DIR / 'predictions.csv'}")
    if log_path:
        print(f"  log: {log_path}")
    return 0


def _add_cam_parsers(sub) -> None:
    p = sub.add_parser("cam", help="Grad-CAM per slide: overlay PNG, pyramidal heatmap TIFF, GeoJSON, cohort mosaic")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, help="model directory (default OUT/model)")
    p.add_argument("--layer", help="layer for Grad-CAM (default: chosen for resolution)")
    _add_common(p)

    p = sub.add_parser("report", help="write OUT/report.html (self-contained) from what the stages produced")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("run", help="describe -> reduce -> train -> evaluate -> cam -> report, resuming what is done")
    p.add_argument("--slides", nargs="+", required=True, help="slide files and/or directories")
    p.add_argument("--labels", type=Path, required=True, help="CSV: slide_id,label[,patient_id,split]")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mpp", type=_positive_float)
    p.add_argument("--tile-px", type=int)
    p.add_argument("--mpp-override", type=_positive_float)
    _add_common(p)


def cmd_cam(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .cam import cam_slides
    from .parallel import task_runner

    if args.layer:
        config = config.with_overrides(cam__layer=args.layer)
    log_path = setup_logging(args.out, "cam", args.verbose)
    with task_runner(config.cluster) as runner:
        summary = cam_slides(args.out, config, model_dir=args.model, runner=runner)
    _print_summary("cam", summary, args.out, log_path)
    print(f"  mosaic: {args.out / 'mosaic.png'}")
    return 0


def cmd_report(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .report import build_report

    print(f"report: {build_report(args.out)}")
    return 0


def cmd_run(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .run import run_all

    log_path = setup_logging(args.out, "run", args.verbose)
    summary = run_all(args.slides, args.labels, args.out, config)
    for stage in ("describe", "reduce", "train", "cam"):
        stage_summary = summary.get(stage) or {}
        parts = ", ".join(f"{k} {v}" for k, v in stage_summary.items()
                          if isinstance(v, (int, float, str)) and k != "seconds")
        print(f"{stage}: {parts}")
    print(f"log: {log_path}")
    print(f"report: {summary['report']}")
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
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "describe": cmd_describe,
    "retry": cmd_retry,
    "reduce": cmd_reduce,
    "cam": cmd_cam,
    "report": cmd_report,
    "run": cmd_run,
}
