import json
import multiprocessing
import os

import pytest

from pipeline.core.errors import OutputLockedError
from pipeline.core.outputs import LOCK_NAME, Manifest, atomic_output_path, atomic_write_json, output_lock


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "m.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]


def test_atomic_output_path_discards_on_error(tmp_path):
    target = tmp_path / "img.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_manifest_round_trip(tmp_path):
    m = Manifest(tmp_path)
    m.update_slide("s1", status="done", tiles=3)
    m.update_stage("s1", "reduce", status="done")
    again = Manifest(tmp_path)
    assert again.slides["s1"]["tiles"] == 3
    assert again.slides["s1"]["stages"]["reduce"]["status"] == "done"


def _hold_lock(out_dir, ready, release):
    with output_lock(out_dir, command="holder"):
        ready.set()
        release.wait(20)


def test_second_run_refused_while_first_alive(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    proc.start()
    try:
        assert ready.wait(20)
        with pytest.raises(OutputLockedError) as err:
            with output_lock(tmp_path, command="second"):
                pass
        assert str(proc.pid) in str(err.value) and "holder" in str(err.value)
    finally:
        release.set()
        proc.join(20)
    with output_lock(tmp_path):  # free again once the holder finished
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    import socket

    dead_pid = 2 ** 22 + 12345
    while True:
        try:
            os.kill(dead_pid, 0)
            dead_pid += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead_pid += 1
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname()}))
    with output_lock(tmp_path, command="new") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
