"""Slides several to a task, and the order they are taken in (``pipeline/describe/grouping.py``)."""

from pipeline.describe.grouping import PlanQueue, largest_first, slide_bytes


def test_largest_slides_are_taken_first_equal_sizes_in_their_order(tmp_path):
    sizes = {"a.svs": 10, "b.svs": 300, "c.svs": 10, "d.svs": 50}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
    series = tmp_path / "e-series"  # a DICOM series is a folder: its files' sizes together
    series.mkdir()
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(b"x" * 40)
    paths = [tmp_path / name for name in sizes] + [series, tmp_path / "missing.svs"]
    assert slide_bytes(series) == 120 and slide_bytes(tmp_path / "missing.svs") == 0  # its task says what is wrong
    ordered = largest_first(paths, str)
    assert [p.name for p in ordered] == ["b.svs", "e-series", "d.svs", "a.svs", "c.svs", "missing.svs"]
    queue = PlanQueue(ordered, capacity=2)
    assert [p.name for p in queue.take(grouped=False) + queue.take(grouped=False)] == ["b.svs", "e-series"]
