"""The report's sections: the capped CAM sheet and the model line."""

from pipeline.report.sections import model_summary, sheet_selection


def test_sheet_holds_the_most_confident_per_class_and_every_misclassified_slide():
    pics = {"cam": "x"}
    rows = [{"slide_id": f"c{i}", "label": "0", "prediction": "0", "probability": p, "pictures": pics}
            for i, p in enumerate([0.6, 0.99, 0.7, 0.95, 0.8, 0.97])]
    rows += [{"slide_id": "w1", "label": "1", "prediction": "0", "probability": 0.51, "pictures": pics},
             {"slide_id": "w2", "label": "0", "prediction": "1", "probability": 0.9, "pictures": pics},
             {"slide_id": "p1", "label": "1", "prediction": "1", "probability": 0.8, "pictures": pics},
             {"slide_id": "nocam", "label": "1", "prediction": "0", "probability": 0.9, "pictures": {}},
             {"slide_id": "train", "label": "1", "prediction": None, "probability": None, "pictures": pics}]
    groups = {heading: [r["slide_id"] for r in group] for heading, group in sheet_selection(rows, per_class=3)}
    assert groups == {"most confident correct predictions of class 0": ["c1", "c5", "c3"],
                      "most confident correct predictions of class 1": ["p1"],
                      "misclassified slides (2)": ["w2", "w1"]}


def test_model_summary_names_weights_head_backend_and_classes():
    info = {"config": {"train": {"weights": None, "recipe": "scratch", "head_block": "mixed2"}},
            "versions": {"backend": "jax"}, "labels": {"values": [0, 1]}}
    assert model_summary(info) == ("InceptionV3, weights random init, recipe scratch, head on mixed2, jax backend"
                                   " · classes 0, 1")
    info["config"]["train"].update(weights="imagenet", recipe="finetune")
    assert model_summary(info).startswith("InceptionV3, weights imagenet, recipe finetune, head on mixed2")


def test_metrics_table_shows_the_cam_against_annotations():
    from pipeline.report.sections import metrics_table

    html = metrics_table({"accuracy": 0.9, "cam_annotations": {"overall": {"slides": 4, "pointing_game": 0.75,
                                                                           "iou_top_decile_mean": 0.31}}})
    assert "4 annotated slides" in html and "pointing game 0.75" in html and "0.31" in html
    assert "annotated" not in metrics_table({"accuracy": 0.9})
