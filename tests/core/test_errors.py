"""The typed errors: codes, fix sentences, manifest records, and pickling (Dask ships them between processes)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from pipeline.core import errors
from pipeline.core.errors import PipelineError, SlideError, error_record

ALL_ERRORS = sorted((obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, PipelineError)),
                    key=lambda cls: cls.__name__)
# the abstract bases, and ModelError whose raisers always give their own fix
WITHOUT_DEFAULT_FIX = {"PipelineError", "SlideError", "ModelError"}
RUN_LEVEL = {"ConfigError", "LabelsError", "OutputLockedError", "ReducerError", "ModelError",
             "EncoderError", "EncoderWeightsMissingError", "EncoderInputSizeError", "EncoderOutputError",
             "NoRunError", "PortInUseError"}


def _ids(classes):
    return [cls.__name__ for cls in classes]


def test_the_error_module_defines_what_the_tests_expect():
    names = set(_ids(ALL_ERRORS))
    assert len(names) >= 18 and {"ConfigError", "LabelsError", "MissingMppError", "TileReadError"} <= names


def test_codes_are_unique_snake_case_strings():
    codes = [cls.code for cls in ALL_ERRORS]
    assert len(set(codes)) == len(codes)
    for code in codes:
        assert code and code == code.lower() and " " not in code


def test_default_fixes():
    assert {cls.__name__ for cls in ALL_ERRORS if not cls.default_fix} == WITHOUT_DEFAULT_FIX


def test_slide_level_and_run_level_errors():
    """Slide errors are recorded against a slide and the batch goes on; the others stop the run."""
    for cls in ALL_ERRORS:
        if cls.__name__ in RUN_LEVEL or cls is PipelineError:
            assert not issubclass(cls, SlideError), cls.__name__
        else:
            assert issubclass(cls, SlideError), cls.__name__


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=_ids(ALL_ERRORS))
def test_message_names_the_path_and_the_fix(cls):
    err = cls("cannot read level 2", path=Path("/data/slides/a b.svs"))
    assert err.code == cls.code and err.path == "/data/slides/a b.svs" and err.detail == "cannot read level 2"
    assert err.fix == cls.default_fix
    text = str(err)
    assert text.startswith("/data/slides/a b.svs: cannot read level 2")
    if cls.default_fix:
        assert text.endswith(f" Fix: {cls.default_fix}")
    else:
        assert "Fix:" not in text
    own = cls("bad", fix="Do this instead.")
    assert own.path is None and own.fix == "Do this instead." and str(own) == "bad Fix: Do this instead."


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=_ids(ALL_ERRORS))
def test_record_round_trips_through_json(cls):
    err = cls("broken", path="/x/s.svs")
    record = error_record(err)
    assert record == err.to_record() == {"code": cls.code, "message": str(err)}
    assert json.loads(json.dumps(record)) == record


def test_record_of_an_untyped_exception_is_internal_error():
    assert error_record(ZeroDivisionError("division by zero")) == {
        "code": "internal_error", "message": "ZeroDivisionError: division by zero"}
    assert error_record(KeyError("k"))["message"] == "KeyError: 'k'"


def _same(a: PipelineError, b: PipelineError) -> None:
    assert type(a) is type(b)
    assert (a.code, a.path, a.fix, a.detail, str(a), a.args) == (b.code, b.path, b.fix, b.detail, str(b), b.args)
    assert error_record(a) == error_record(b)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=_ids(ALL_ERRORS))
def test_pickle_keeps_code_path_fix_and_message(cls):
    for err in (cls("tile (3, 4) does not decode", path="/x/s.svs"), cls("no path, own fix", fix="Do it."),
                cls("defaults only")):
        _same(err, pickle.loads(pickle.dumps(err)))


# --- across processes on a real Dask cluster ----------------------------------------------------------------------


def raise_error(class_name: str, message: str, path: str | None, fix: str | None):
    """Dask task: raise the named typed error in the worker process."""
    raise getattr(errors, class_name)(message, path=path, fix=fix)


def worker_pid() -> int:
    import os

    return os.getpid()


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def test_typed_errors_cross_a_dask_process_boundary(dask_client, tmp_path):
    import os

    from pipeline.core.errors import UnsupportedFormatError
    from pipeline.slides.open import read_slide_info

    assert dask_client.submit(worker_pid, pure=False).result(timeout=60) != os.getpid()  # a separate process
    # a pipeline function failing on a worker
    bad = tmp_path / "not_a_slide.svs"
    bad.write_text("hello")
    with pytest.raises(UnsupportedFormatError) as exc:
        dask_client.submit(read_slide_info, str(bad), pure=False).result(timeout=60)
    assert exc.value.code == "unsupported_format" and exc.value.path == str(bad)
    assert str(bad) in str(exc.value) and exc.value.fix == UnsupportedFormatError.default_fix
    # every class, with and without path and with its own fix
    futures = {cls: dask_client.submit(raise_error, cls.__name__, f"{cls.__name__} on a worker",
                                       f"/w/{cls.code}.svs", "Fix it." if i % 2 else None, pure=False)
               for i, cls in enumerate(ALL_ERRORS)}
    for i, (cls, future) in enumerate(futures.items()):
        with pytest.raises(cls) as exc:
            future.result(timeout=60)
        expected = cls(f"{cls.__name__} on a worker", path=f"/w/{cls.code}.svs", fix="Fix it." if i % 2 else None)
        _same(exc.value, expected)
