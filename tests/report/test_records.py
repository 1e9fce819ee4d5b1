"""One row per slide from its manifest record and prediction: the columns of the report table and the viewer list."""

from pipeline.report.records import COLUMNS, failures_of, is_misclassified, read_predictions, slide_row

DONE = {"status": "done", "tiles": 120, "mpp": 0.25, "qc": {"pen": 3, "blur": 2},
        "stages": {"train": {"status": "done", "label": 2, "split": "test"}, "cam": {"status": "done"}}}
FAILED_CAM = {"status": "done", "tiles": 5,
              "stages": {"cam": {"status": "failed", "error": {"code": "missing_input", "message": "no map"}}}}


def test_slide_row_has_every_column():
    row = slide_row("a", DONE, {"true_label": "2", "predicted_label": "1", "prob_1": "0.81234", "prob_2": "0.1"})
    assert list(row) == ["slide_id", *COLUMNS]
    assert row == {"slide_id": "a", "status": "done", "label": "2", "prediction": "1", "probability": 0.8123,
                   "split": "test", "tiles": 120, "qc_excluded": 5, "qc_reasons": "blur 2, pen 3",
                   "cam_annotation": None, "mpp": 0.25, "failure": None}
    assert is_misclassified(row)
    untested = slide_row("b", DONE, {})  # a training slide: its label from the train stage, no prediction
    assert (untested["label"], untested["prediction"], untested["probability"]) == ("2", None, None)
    assert not is_misclassified(untested)


def test_cam_annotation_column():
    record = {"stages": {"cam": {"status": "done", "annotation_class": "Tumor", "pointing_hit": True,
                                 "iou_top_decile": 0.4213}}}
    assert slide_row("d", record, {})["cam_annotation"] == "Tumor: hit, IoU 0.42"


def test_failures_of_every_stage():
    row = slide_row("c", FAILED_CAM, {})
    assert row["status"] == "failed" and row["failure"] == "cam: missing_input" and row["qc_excluded"] is None
    broken = {"status": "failed", "error": {"code": "corrupt_slide", "message": "bad"}}
    assert failures_of(broken) == [{"stage": "describe", "code": "corrupt_slide", "message": "bad"}]
    assert failures_of(DONE) == []


def test_read_predictions(tmp_path):
    assert read_predictions(tmp_path) == {}
    (tmp_path / "predictions.csv").write_text("slide_id,true_label,predicted_label,prob_0,prob_1\ns1,0,1,0.3,0.7\n")
    assert read_predictions(tmp_path)["s1"]["predicted_label"] == "1"
