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


def test_sizes_known_from_surveys_group_slides_from_the_first_task():
    """Slides a survey measured (``PlanQueue.expect``) go in groups from the first task, sized by their mean; without
    sizes the first slides go alone."""
    slides = [f"s{i:02d}" for i in range(40)]
    blind = PlanQueue(slides, capacity=2, target_tiles=100)
    assert [len(blind.take()) for _ in range(2)] == [1, 1] and not blind.sizes_known()
    surveyed = PlanQueue(slides, capacity=2, target_tiles=100)
    surveyed.expect([20] * 40)  # 5 slides make the target
    assert surveyed.sizes_known()
    first = [surveyed.take() for _ in range(3)]
    assert [len(group) for group in first] == [5, 5, 5] and first[0] == slides[:5]
    while len(surveyed) > 4:
        surveyed.take()
    assert [len(surveyed.take()) for _ in range(4)] == [1, 1, 1, 1]  # the last ones alone: the workers end together
