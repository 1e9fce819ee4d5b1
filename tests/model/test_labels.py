"""The labels file (checked before any heavy work) and the label <-> class mapping."""

import pytest

from pipeline.core.errors import LabelsError
from pipeline.model.labels import LabelMapping, check_slides, read_labels


def write(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def cohort_csv(tmp_path, n_per_class=10, labels=(1, 2, 3), patients=False):
    lines = ["slide_id,label" + (",patient_id" if patients else "")]
    for label in labels:
        for i in range(n_per_class):
            lines.append(f"s{label}_{i},{label}" + (f",p{label}_{i // 2}" if patients else ""))
    return write(tmp_path, "\n".join(lines) + "\n")


# --- mapping ---------------------------------------------------------------------------------------------------


def test_integer_offset_round_trip(tmp_path):
    table = read_labels(write(tmp_path, "slide_id,label\na,3\nb,5\nc,4\nd,3.0\n"))
    mapping = table.mapping
    assert mapping.offset == 3 and mapping.contiguous
    assert table.y.tolist() == [0, 2, 1, 0]  # class = label - offset
    assert mapping.to_label(table.y) == [3, 5, 4, 3]  # and back, in the user's integers
    again = LabelMapping.from_dict(mapping.to_dict())
    assert again == mapping and again.to_label([2]) == [5]


def test_integer_labels_with_gaps_map_by_rank(tmp_path):
    table = read_labels(write(tmp_path, "slide_id,label\na,1\nb,4\nc,2\n"))
    assert table.mapping.offset is None and not table.mapping.contiguous
    assert table.y.tolist() == [0, 2, 1]
    assert table.mapping.to_label([2]) == [4]


def test_string_labels_sorted(tmp_path):
    table = read_labels(write(tmp_path, "slide_id,label\na,malignant\nb,benign\n"), label_kind="string")
    assert table.mapping.values == ("benign", "malignant")
    assert table.y.tolist() == [1, 0]
    assert not table.mapping.ordinal


def test_semicolon_bom_extra_columns_and_blank_lines(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes("\ufeffSlide_ID;Label;note\n\na;1;x\nb;2;y\n".encode("utf-8"))
    table = read_labels(path)
    assert table.slide_ids == ["a", "b"] and table.labels == [1, 2]
    assert table.lines == [3, 4]


# --- errors name the file and the line ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, expected", [
    ("slide_id,label\na,1\nb,high\n", "integer", ["line 3", "'high'", "not an integer", "label_kind: string"]),
    ("slide_id,label\na,1\nb,2.5\n", "integer", ["line 3", "not an integer"]),
    ("slide_id,label\na,1\nb,2\na,2\n", "integer", ["line 4", "'a'", "first on line 2"]),
    ("slide_id,label\na,1\nb,1\n", "integer", ["same label 1", "two classes"]),
    ("slide,label\na,1\n", "integer", ["line 1", "slide_id"]),
    ("slide_id,label\na,1\nb,\n", "integer", ["line 3", "'b' has no label"]),
    ("slide_id,label\n,1\n", "integer", ["line 2", "slide_id is empty"]),
    ("slide_id,label\n", "integer", ["no rows"]),
    ("", "integer", ["empty"]),
    ("slide_id,label,split\na,1,train\nb,2,holdout\n", "integer", ["line 3", "'holdout'"]),
    ("slide_id,label,split\na,1,train\nb,2,test\n", "integer", ["[2] have no 'train' rows"]),
    ("slide_id,label,patient_id,split\na,1,p1,train\nb,2,p2,train\nc,2,p1,test\n", "integer",
     ["line 4", "patient 'p1'", "one set"]),
])
def test_bad_label_files(tmp_path, text, kind, expected):
    path = write(tmp_path, text)
    with pytest.raises(LabelsError) as err:
        read_labels(path, kind)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message
    assert err.value.code == "bad_labels"


def test_missing_file(tmp_path):
    with pytest.raises(LabelsError, match="not found"):
        read_labels(tmp_path / "nope.csv")


def test_unknown_slide_ids_named_with_line(tmp_path):
    table = read_labels(write(tmp_path, "slide_id,label\na,1\nghost,2\nb,2\n"))
    check_slides(table, {"a", "b", "ghost", "other"})  # slides without labels are fine
    with pytest.raises(LabelsError) as err:
        check_slides(table, {"a", "b"})
    assert "ghost" in str(err.value) and "line 3" in str(err.value) and str(table.path) in str(err.value)
