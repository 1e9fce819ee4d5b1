"""``wsi-pipeline`` command line: one sub-command per stage, each a thin wrapper over the stage's Python function.

Exit codes: 0 when the command finished (even if some slides failed: see ``OUT/manifest.json``), 2 for bad arguments,
config or labels (nothing was done), 1 for an unexpected error.

The options are defined once, in ``pipeline/cli_options.py`` (help, type and choices of the config-backed ones come
from ``pipeline/config.py``); each ``_add_*_parser`` below only names the options its command takes, and registers
the command's handler with ``_command``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .cli_options import COMMON, add_options, config_overrides, use
from .core.config import PipelineConfig, load_config
from .core.errors import ConfigError, LabelsError, NoRunError, OutputLockedError, PipelineError, PortInUseError
from .core.outputs import log_file_handler
from .core.startup import resume_gc

log = logging.getLogger("pipeline")


def setup_logging(out_dir: Path | None, command: str, verbose: bool = False) -> Path | None:
    """Console logging, plus one log file per run in ``OUT/logs/`` with per-slide timings. Called when a command has
    imported its stage and starts its work: the garbage collector paused for the start-up resumes here."""
    resume_gc()
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
    """The ``--config`` file (or the defaults) with every config-backed option given on the command line on top."""
    config = load_config(getattr(args, "config", None))
    return config.with_overrides(**config_overrides(args))


def _command(sub, name: str, handler, help: str, options) -> argparse.ArgumentParser:
    """One sub-command: its help, the options it takes (names from ``cli_options.OPTIONS``) and its handler."""
    p = sub.add_parser(name, help=help)
    add_options(p, options)
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi-pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"wsi-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_describe_parsers(sub)
    _add_reduce_parser(sub)
    _add_model_parsers(sub)
    _add_cam_parser(sub)
    _add_report_parser(sub)
    _add_view_parser(sub)
    _add_run_parser(sub)
    return parser


# --- inspect / describe / retry ---------------------------------------------------------------------------------


def _add_describe_parsers(sub) -> None:
    _command(sub, "inspect", cmd_inspect, "print slide metadata (dimensions, levels, vendor, mpp and its source)",
             ["slides", "--json", "--mpp-override"])
    _command(sub, "describe", cmd_describe, "tile slides and write per-tile descriptors to Zarr stores",
             ["--slides", "--out", "--mpp", "--tile-px", "--stride-px", "--mpp-override", "--descriptor",
              "--encoder-model", "--reader", "--stain", "--annotations", *COMMON])
    _command(sub, "retry", cmd_retry, "describe again only the slides that failed (settings of the last run)",
             ["out", "--mpp-override", *COMMON])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_inspect(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .slides.open import find_slides, read_slide_info

    resume_gc()  # no log to set up: the work starts here

    paths, _ = find_slides(args.slides)
    rows, failures = [], 0
    for path in paths:
        try:
            rows.append(read_slide_info(path, mpp_override=config.tiling.mpp_override).to_dict())
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
    from .describe.runner import describe_slides

    log_path = setup_logging(args.out, "describe", args.verbose)
    summary = describe_slides(args.slides, args.out, config)
    _print_summary("describe", summary, args.out, log_path)
    return 0


def cmd_retry(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .core.artefacts import RUN_CONFIG_NAME
    from .describe.retry import retry_failed

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
    _command(sub, "reduce", cmd_reduce, "fit PCA or an autoencoder on the cohort's descriptors and write every "
                                        "slide's feature map (OUT/maps/*.png shows them)",
             ["--out", "--method", "--components", "--reducer", *COMMON])


def cmd_reduce(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .core.artefacts import MAPS_DIR, REDUCER_DIR, RUN_CONFIG_NAME
    from .reduce.reducers import load_reducer
    from .reduce.runner import reduce_slides

    if args.config is None and (args.out / RUN_CONFIG_NAME).exists():
        # the settings the slides were described with, with this command's overrides on top
        args.config = args.out / RUN_CONFIG_NAME
        config = _config_from_args(args)
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
    _command(sub, "train", cmd_train, "fine-tune InceptionV3 on the feature maps, then evaluate on held-out slides",
             ["--out", use("--labels", required=True), "--folds", "--force", "--config",
              use("--scheduler", note="training runs on one of its GPU workers (cluster.gpu_placement)"),
              use("--verbose", note="one line per epoch")])
    _command(sub, "evaluate", cmd_evaluate, "test metrics, predictions and plots of a trained model",
             ["--out", use("--model", note="default OUT/model"),
              use("--labels", note="evaluate every slide of this CSV instead of the stored test set"),
              "--config", "--verbose"])
    _command(sub, "predict", cmd_predict, "describe new slides, map them with the model's reducer, and predict",
             [use("--model", required=True), "--slides", "--out", "--mpp-override", *COMMON])


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

    from .core.parallel import task_runner
    from .train.runner import train

    log_path = setup_logging(args.out, "train", args.verbose)
    # A cluster is joined only when training may go to its GPU workers; a local one would just sit idle.
    remote = config.cluster.kind != "local" and config.cluster.gpu_placement != "client"
    with task_runner(config.cluster, in_process=not remote) as runner:
        summary = train(args.out, args.labels, config, force=args.force,
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
    from .evaluate.runner import evaluate

    setup_logging(args.out, "evaluate", args.verbose)
    metrics = evaluate(args.out, args.model, args.labels)
    print("evaluate:")
    _print_metrics(metrics, args.out)
    return 0


def cmd_predict(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .core.artefacts import PREDICT_DIR, PREDICTIONS_CSV
    from .predict import predict_slides

    log_path = setup_logging(args.out, "predict", args.verbose)
    result = predict_slides(args.slides, args.model, args.out, config)
    for row in result["predictions"]:
        probs = " ".join(f"{k}:{v:.3f}" for k, v in row["probabilities"].items())
        print(f"{row['slide_id']}\t{row['predicted_label']}\t{probs}")
    for slide_id, record in result["failed"].items():
        print(f"{slide_id}\tFAILED {record['code']}: {record['message']}")
    print(f"predict: {len(result['predictions'])} predicted, {len(result['failed'])} failed -> "
          f"{args.out / PREDICT_DIR / PREDICTIONS_CSV}")
    if log_path:
        print(f"  log: {log_path}")
    return 0


# --- cam / report / run --------------------------------------------------------------------------------------------


def _add_cam_parser(sub) -> None:
    _command(sub, "cam", cmd_cam, "Grad-CAM per slide: overlay PNG, pyramidal heatmap TIFF, GeoJSON, cohort mosaic",
             ["--out", use("--model", note="default OUT/model"), "--layer", *COMMON])


def cmd_cam(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .cam.runner import cam_slides
    from .core.parallel import task_runner

    log_path = setup_logging(args.out, "cam", args.verbose)
    with task_runner(config.cluster) as runner:
        summary = cam_slides(args.out, config, model_dir=args.model, runner=runner)
    _print_summary("cam", summary, args.out, log_path)
    print(f"  mosaic: {args.out / 'mosaic.png'}")
    return 0


def _add_report_parser(sub) -> None:
    _command(sub, "report", cmd_report, "write OUT/report.html (self-contained) from what the stages produced",
             ["--out"])


def cmd_report(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .report.html import build_report

    resume_gc()  # no log to set up: the work starts here

    print(f"report: {build_report(args.out)}")
    return 0


def _add_view_parser(sub) -> None:
    _command(sub, "view", cmd_view, "zoomable slide viewer in the browser: slides with CAM, feature map and "
                                    "tissue/QC overlays and regions (local, read-only; Ctrl-C stops it)",
             ["out", "--port", "--host", "--verbose"])


def cmd_view(args: argparse.Namespace, config: PipelineConfig) -> int:
    from .view.server import ViewerServer

    setup_logging(None, "view", args.verbose)
    server = ViewerServer(args.out, host=args.host, port=args.port)
    print(f"view: {len(server.app.catalog.slides)} slides of {server.app.catalog.out_dir} at {server.url} "
          "(Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print("view: stopped", flush=True)
    return 0


def _add_run_parser(sub) -> None:
    _command(sub, "run", cmd_run, "describe -> reduce -> train -> evaluate -> cam -> report, resuming what is done",
             ["--slides", use("--labels", required=True), "--out", "--mpp", "--tile-px", "--mpp-override",
              "--descriptor", "--encoder-model", "--stain", "--annotations", *COMMON])


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


def entry() -> None:
    """The ``wsi-pipeline`` console script: ``main``, then exit without the interpreter's teardown of every module
    (numba/LLVM, Dask's threads: 0.3-0.5 s of a short command). Logs and output are flushed first; an unexpected
    error still ends the normal way, with its traceback."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _config_from_args(args)
        return args.handler(args, config)
    except (ConfigError, LabelsError, OutputLockedError, NoRunError, PortInUseError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        resume_gc()  # a command that stopped before its work (bad config, labels, a locked output)
