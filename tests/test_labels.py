import numpy as np
import pytest

from pipeline.core.errors import LabelsError
from pipeline.model.labels import LabelMapping, check_slides, read_labels
from pipeline.train.splits import class_weights, fold_splits, holdout_split


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


# --- splits ------------------------------------------------------------------------------------------------------


def test_holdout_split_is_stratified_disjoint_and_seeded(tmp_path):
    table = read_labels(cohort_csv(tmp_path, 10, (1, 2, 3)))
    split = holdout_split(table, 0.2, 0.2, seed=3)
    sets = [set(split.train), set(split.val), set(split.test)]
    assert sum(map(len, sets)) == len(table) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    y = table.y
    for part in (split.train, split.val, split.test):
        assert sorted(set(y[part].tolist())) == [0, 1, 2]  # every class in every set
    assert len(split.test) == 6 and len(split.val) == 6
    again = holdout_split(table, 0.2, 0.2, seed=3)
    assert again.test.tolist() == split.test.tolist()
    assert holdout_split(table, 0.2, 0.2, seed=4).test.tolist() != split.test.tolist()


def test_holdout_split_groups_patients(tmp_path):
    table = read_labels(cohort_csv(tmp_path, 12, (0, 1), patients=True))
    split = holdout_split(table, 0.2, 0.25, seed=0)
    groups = table.groups
    patients = [set(groups[idx].tolist()) for idx in (split.train, split.val, split.test)]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert len(split.test) > 0 and len(split.val) > 0


def test_split_column_is_used(tmp_path):
    rows = ["slide_id,label,split"] + [f"t{i},{i % 2},train" for i in range(8)] + ["v0,0,val", "v1,1,val",
                                                                                    "x0,0,test", "x1,1,test"]
    table = read_labels(write(tmp_path, "\n".join(rows)))
    split = holdout_split(table, 0.2, 0.2)
    ids = split.ids(table)
    assert sorted(ids["val"]) == ["v0", "v1"] and sorted(ids["test"]) == ["x0", "x1"] and len(ids["train"]) == 8


def test_too_few_slides_per_class(tmp_path):
    table = read_labels(write(tmp_path, "slide_id,label\na,0\nb,0\nc,0\nd,1\ne,1\n"))
    with pytest.raises(LabelsError) as err:
        holdout_split(table, 0.2, 0.2)
    assert "needs 3 per class" in str(err.value) and "1: 2" in str(err.value)


def test_kfold_tests_every_slide_once(tmp_path):
    table = read_labels(cohort_csv(tmp_path, 9, (0, 1, 2), patients=True))
    splits = fold_splits(table, 3, 0.2, seed=1)
    assert [s.fold for s in splits] == [1, 2, 3]
    tested = np.concatenate([s.test for s in splits])
    assert sorted(tested.tolist()) == list(range(len(table)))
    groups = table.groups
    for s in splits:
        assert not set(groups[s.test]) & set(groups[np.concatenate([s.train, s.val])])
        assert not set(s.train) & set(s.val)
        assert sorted(set(table.y[s.train].tolist())) == [0, 1, 2]


def test_kfold_needs_enough_per_class(tmp_path):
    table = read_labels(cohort_csv(tmp_path, 3, (0, 1)))
    with pytest.raises(LabelsError, match="5-fold"):
        fold_splits(table, 5, 0.2)


def test_class_weights_balance_the_classes():
    y = np.array([0] * 6 + [1] * 2)
    w = class_weights(y, 2)
    # each class contributes the same total weight, and the mean weight per slide is 1
    assert w[y].sum() == pytest.approx(len(y))
    assert (w[0] * 6) == pytest.approx(w[1] * 2)
