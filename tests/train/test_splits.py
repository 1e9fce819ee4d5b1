"""Train/validation/test splits (stratified, grouped by patient, or the labels file's own), folds, class weights."""

import numpy as np
import pytest

from pipeline.core.errors import LabelsError
from pipeline.model.labels import read_labels
from pipeline.train.splits import class_weights, fold_splits, holdout_split
from tests.model.test_labels import cohort_csv, write


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
