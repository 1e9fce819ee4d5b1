"""Slide labels: the labels CSV and the label <-> class mapping (saved with the model as ``labels.json``).

The CSV has a header with ``slide_id`` and ``label`` and optionally ``patient_id`` and ``split`` (``train``, ``val``,
``test``). Everything about it is checked before any heavy work, and each problem is a ``LabelsError`` naming the
file and the line (or slide id) and saying what to change.

Labels are integers of any range (``train.label_kind: integer``, the default) or strings (``label_kind: string``).
Keras trains classes ``0..K-1``; ``LabelMapping`` converts both ways and is saved with the model:

* integers that form a contiguous range (grades 1..5) map by an offset: class = label - 1, and back;
* integers with gaps (1, 2, 4) map by rank (class 0, 1, 2); the ordinal metrics still use the user's values;
* strings map in sorted order (``"benign" -> 0, "malignant" -> 1``).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from ..core.errors import LabelsError

log = logging.getLogger("pipeline")


SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
REQUIRED_COLUMNS = ("slide_id", "label")
OPTIONAL_COLUMNS = ("patient_id", "split")
_MAX_LISTED = 8  # ids named in one error message


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


@dataclass(frozen=True)
class LabelMapping:
    """User labels <-> Keras class indices 0..K-1. ``values`` are the user's labels in class order."""

    kind: Literal["integer", "string"]
    values: tuple

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @property
    def offset(self) -> int | None:
        """For contiguous integer labels, class = label - offset; None otherwise."""
        if self.kind == "integer" and self.contiguous:
            return int(self.values[0])
        return None

    @property
    def contiguous(self) -> bool:
        return self.kind == "integer" and list(self.values) == list(range(self.values[0], self.values[0] + len(self.values)))

    @property
    def ordinal(self) -> bool:
        """Integer labels are treated as ordered (grades): MAE and quadratic weighted kappa are reported."""
        return self.kind == "integer"

    def to_index(self, labels: Iterable) -> np.ndarray:
        lookup = {v: i for i, v in enumerate(self.values)}
        out = []
        for value in labels:
            if value not in lookup:
                raise LabelsError(f"label {value!r} is not one of the model's classes {list(self.values)}",
                                  fix="Use only labels the model was trained on.")
            out.append(lookup[value])
        return np.asarray(out, dtype=np.int64)

    def to_label(self, indices: Iterable[int]) -> list:
        return [self.values[int(i)] for i in indices]

    def names(self) -> list[str]:
        """Class names for plots and CSV columns (``prob_<name>``)."""
        return [str(v) for v in self.values]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "values": list(self.values), "offset": self.offset, "contiguous": self.contiguous,
                "num_classes": self.num_classes,
                "classes": {str(i): v for i, v in enumerate(self.values)}}

    @classmethod
    def from_dict(cls, data: dict) -> "LabelMapping":
        kind = data["kind"]
        values = tuple(int(v) for v in data["values"]) if kind == "integer" else tuple(str(v) for v in data["values"])
        return cls(kind=kind, values=values)

    @classmethod
    def fit(cls, labels: Iterable, kind: Literal["integer", "string"]) -> "LabelMapping":
        values = tuple(sorted(set(labels)))
        mapping = cls(kind=kind, values=values)
        if kind == "integer" and not mapping.contiguous:
            log.warning("integer labels %s have gaps: classes are assigned by rank (%s)", list(values),
                        ", ".join(f"{v}->{i}" for i, v in enumerate(values)))
        return mapping


@dataclass
class LabelTable:
    """The parsed labels file: one row per slide, in file order."""

    path: str
    slide_ids: list[str]
    labels: list  # user labels (int or str)
    lines: list[int]  # line number of each row in the file (for messages)
    mapping: LabelMapping
    patient_ids: list[str] | None = None
    splits: list[str] | None = None  # "train" | "val" | "test" per row, when the file has a split column
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def y(self) -> np.ndarray:
        """Class indices 0..K-1."""
        return self.mapping.to_index(self.labels)

    @property
    def groups(self) -> np.ndarray:
        """Patient of each row (the slide itself when no patient column): the unit that must not straddle sets."""
        if self.patient_ids is None:
            return np.asarray(self.slide_ids)
        return np.asarray(self.patient_ids)

    def line_of(self, slide_id: str) -> int:
        return self.lines[self.slide_ids.index(slide_id)]

    def subset(self, keep: Iterable[str]) -> "LabelTable":
        keep = set(keep)
        rows = [i for i, s in enumerate(self.slide_ids) if s in keep]
        pick = lambda seq: None if seq is None else [seq[i] for i in rows]  # noqa: E731
        return LabelTable(self.path, pick(self.slide_ids), pick(self.labels), pick(self.lines), self.mapping,
                          pick(self.patient_ids), pick(self.splits), self.sha256)


def _sniff_delimiter(header_line: str) -> str:
    # Spreadsheets in many locales export ';' or tabs; a header without commas tells which one it is.
    if "," in header_line:
        return ","
    for delim in (";", "\t"):
        if delim in header_line:
            return delim
    return ","


def _parse_integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)  # spreadsheets write 3 as "3.0"
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def read_labels(path: str | Path, label_kind: Literal["integer", "string"] = "integer") -> LabelTable:
    """Parse and validate a labels CSV (see the module docstring). Raises ``LabelsError``."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError("labels file not found", path=path, fix="Pass an existing CSV with --labels.")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")  # Excel writes a byte-order mark
    except UnicodeDecodeError as err:
        raise LabelsError(f"not UTF-8 text ({err.reason} at byte {err.start})", path=path,
                          fix="Save the labels file as UTF-8 CSV.") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise LabelsError("the file is empty or its first line (the header) is blank", path=path,
                          fix="Start the file with the header line: slide_id,label[,patient_id,split]")
    reader = csv.reader(lines, delimiter=_sniff_delimiter(lines[0]))
    header = [h.strip().lower() for h in next(reader)]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise LabelsError(f"line 1: the header {header} lacks the column(s) {missing}", path=path,
                          fix="Start the file with the header line: slide_id,label[,patient_id,split]")
    dup_cols = sorted({h for h in header if header.count(h) > 1 and h})
    if dup_cols:
        raise LabelsError(f"line 1: column(s) {dup_cols} appear more than once", path=path)
    extra = [h for h in header if h not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        log.info("labels file %s: ignoring column(s) %s", path, extra)
    col = {name: header.index(name) for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if name in header}

    slide_ids, labels, line_nos, patients, splits = [], [], [], [], []
    first_line: dict[str, int] = {}
    for line_no, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines are harmless
        cells = [c.strip() for c in row] + [""] * (len(header) - len(row))
        slide_id, label_text = cells[col["slide_id"]], cells[col["label"]]
        if not slide_id:
            raise LabelsError(f"line {line_no}: the slide_id is empty", path=path)
        if not label_text:
            raise LabelsError(f"line {line_no}: slide '{slide_id}' has no label", path=path,
                              fix="Give every slide a label, or remove the row.")
        if slide_id in first_line:
            raise LabelsError(f"line {line_no}: slide '{slide_id}' is listed again (first on line "
                              f"{first_line[slide_id]})", path=path, fix="Keep one row per slide.")
        first_line[slide_id] = line_no
        if label_kind == "integer":
            value = _parse_integer(label_text)
            if value is None:
                raise LabelsError(
                    f"line {line_no}: the label {label_text!r} of slide '{slide_id}' is not an integer",
                    path=path, fix="Use integer labels, or set train.label_kind: string in the config for text labels.")
            labels.append(value)
        else:
            labels.append(label_text)
        slide_ids.append(slide_id)
        line_nos.append(line_no)
        if "patient_id" in col:
            patient = cells[col["patient_id"]]
            if not patient:
                raise LabelsError(f"line {line_no}: slide '{slide_id}' has an empty patient_id", path=path,
                                  fix="Fill in every patient_id (or drop the column).")
            patients.append(patient)
        if "split" in col:
            split = SPLIT_NAMES.get(cells[col["split"]].lower())
            if split is None:
                raise LabelsError(f"line {line_no}: split {cells[col['split']]!r} of slide '{slide_id}' is not "
                                  f"one of train, val, test", path=path,
                                  fix="Write train, val or test in the split column (or drop the column).")
            splits.append(split)

    if not slide_ids:
        raise LabelsError("the file has a header but no rows", path=path, fix="Add one row per slide.")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise LabelsError(f"every slide has the same label {classes[0]!r}: a classifier needs at least two classes",
                          path=path, fix="Add slides of another class.")
    table = LabelTable(str(path), slide_ids, labels, line_nos, LabelMapping.fit(labels, label_kind),
                       patients if "patient_id" in col else None, splits if "split" in col else None,
                       hashlib.sha256(raw).hexdigest()[:16])
    if table.splits is not None:
        _check_given_splits(table)
    return table


def _check_given_splits(table: LabelTable) -> None:
    if "train" not in table.splits:
        raise LabelsError("the split column has no 'train' rows", path=table.path)
    if table.patient_ids is not None:
        seen: dict[str, tuple[str, int]] = {}
        for patient, split, line in zip(table.patient_ids, table.splits, table.lines):
            if patient in seen and seen[patient][0] != split:
                raise LabelsError(
                    f"line {line}: patient '{patient}' is in '{split}' but also in '{seen[patient][0]}' (line "
                    f"{seen[patient][1]}): slides of one patient must stay in one set", path=table.path,
                    fix="Give all slides of a patient the same split.")
            seen.setdefault(patient, (split, line))
    train_classes = {table.labels[i] for i, s in enumerate(table.splits) if s == "train"}
    absent = [v for v in table.mapping.values if v not in train_classes]
    if absent:
        raise LabelsError(f"class(es) {absent} have no 'train' rows", path=table.path,
                          fix="Put slides of every class in the training split.")


def check_slides(table: LabelTable, available: Iterable[str], what: str = "feature maps") -> None:
    """Every labelled slide must exist in the output directory (before any model is built)."""
    available = set(available)
    unknown = [s for s in table.slide_ids if s not in available]
    if unknown:
        first = unknown[0]
        raise LabelsError(
            f"{len(unknown)} labelled slide(s) have no {what} in the output directory: {_listing(unknown)} "
            f"(first on line {table.line_of(first)})", path=table.path,
            fix="Check the slide ids (file names without extension, as in OUT/slides/), run describe and reduce "
                "for those slides, or remove their rows.")
