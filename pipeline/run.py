"""``wsi-pipeline run``: describe -> reduce -> train (+ evaluate) -> CAM -> report in one command.

Each stage resumes on its own (skips what is current), so rerunning ``run`` after an interruption or after adding
slides redoes only the missing or stale work. One Dask cluster serves all stages of the run.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

from .core.config import PipelineConfig
from .core.outputs import Manifest, atomic_write_text, output_lock
from .core.parallel import task_runner

log = logging.getLogger("pipeline")

USED_LABELS_NAME = "labels.used.csv"


def labels_without_failed_slides(labels_csv: str | Path, out_dir: Path) -> tuple[Path, list[str]]:
    """A copy of the labels file without the rows of slides that failed an earlier stage (recorded in the manifest).

    Ids that never existed still reach ``train`` and fail there with a clear message: only known failures are dropped.
    """
    failed = {sid for sid, rec in Manifest(out_dir).slides.items() if rec.get("status") == "failed"}
    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:
        text = fh.read()
    dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else ",", delimiters=",;\t")
    rows = list(csv.reader(text.splitlines(), dialect))
    if not rows:
        return Path(labels_csv), []
    header, body = rows[0], rows[1:]
    try:
        col = [h.strip().lower() for h in header].index("slide_id")
    except ValueError:
        return Path(labels_csv), []  # train reports the missing column
    kept = [r for r in body if not r or r[col].strip() not in failed]
    dropped = [r[col].strip() for r in body if r and r[col].strip() in failed]
    if not dropped:
        return Path(labels_csv), []
    lines = [",".join(header)] + [",".join(r) for r in kept]
    path = out_dir / USED_LABELS_NAME
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path, dropped


def run_all(slides: list[str | Path], labels_csv: str | Path, out_dir: str | Path,
            config: PipelineConfig | None = None, progress: bool | None = None) -> dict:
    """The whole pipeline; returns a summary per stage and the report path."""
    from .cam.runner import cam_slides
    from .describe.runner import describe_slides
    from .model.labels import read_labels
    from .reduce.runner import reduce_slides
    from .report.html import build_report
    from .train.runner import train

    config = config or PipelineConfig()
    out_dir = Path(out_dir)
    t0 = time.monotonic()
    summary: dict = {}
    # Fail on a bad labels file before any heavy work.
    table = read_labels(labels_csv, config.train.label_kind)
    with output_lock(out_dir, command="run"), task_runner(config.cluster) as runner:
        summary["describe"] = describe_slides(slides, out_dir, config, runner=runner, progress=progress)
        summary["reduce"] = reduce_slides(out_dir, config, runner=runner, progress=progress)
        used_labels, dropped = labels_without_failed_slides(labels_csv, out_dir)
        if dropped:
            log.warning("run: %d labelled slide(s) failed earlier and are left out of training: %s",
                        len(dropped), ", ".join(dropped[:10]))
        summary["train"] = train(out_dir, used_labels, config, runner=runner)
        labels = {sid: str(lab) for sid, lab in zip(table.slide_ids, table.labels)}
        summary["cam"] = cam_slides(out_dir, config, runner=runner, labels=labels, progress=progress)
        report = build_report(out_dir)
    summary["report"] = str(report)
    summary["seconds"] = round(time.monotonic() - t0, 2)
    return summary
