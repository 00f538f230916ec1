"""The CLI's error contract (docs/errors.md): one line per user error, its class's exit code, the
traceback under --debug and in the error log; errors from Ray workers unwrapped first."""

from __future__ import annotations

import pytest

from stackrec_dist import cli
from stackrec_dist.data.errors import DataError
from stackrec_dist.data.storage import StorageError
from stackrec_dist.errors import (
    CheckpointError,
    ConfigErrorBase,
    DataErrorBase,
    DeviceError,
    StackrecError,
    StorageErrorBase,
    TrainingError,
    unwrap_worker_error,
)
from tests.errors.conftest import assert_one_line, run_cli


def test_exit_codes_are_distinct_and_stable():
    codes = {cls: cls.exit_code for cls in (ConfigErrorBase, DataErrorBase, CheckpointError, StorageErrorBase,
                                            DeviceError, TrainingError)}
    assert list(codes.values()) == [2, 3, 4, 5, 6, 7]
    assert StackrecError.exit_code == 1


def _fail_with(monkeypatch, exc):
    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_config", boom)


@pytest.mark.parametrize("exc, code, line", [
    (DataError("null sequence", path="s3://b/ds/train/part-00001.parquet", row_group=3, row=17, field="item_ids"),
     3, "stackrec: data error: s3://b/ds/train/part-00001.parquet row group 3 row 17 field item_ids: null sequence"),
    (StorageError("s3://b/k: refused\n(still failing)"), 5, "stackrec: storage error: s3://b/k: refused (still failing)"),
    (CheckpointError("runs/x/model.pt: truncated"), 4, "stackrec: checkpoint error: runs/x/model.pt: truncated"),
    (DeviceError("train.device cuda: no CUDA device"), 6, "stackrec: device error: train.device cuda: no CUDA device"),
    (TrainingError("epoch 0 yielded no batch"), 7, "stackrec: training error: epoch 0 yielded no batch"),
])
def test_main_prints_one_line(monkeypatch, capsys, tmp_path, exc, code, line):
    monkeypatch.setenv("STACKREC_ERROR_LOG", str(tmp_path / "err.log"))
    _fail_with(monkeypatch, exc)
    assert cli.main(["config"]) == code
    err = capsys.readouterr().err
    assert err.strip() == line
    assert "Traceback" in (tmp_path / "err.log").read_text()


def test_debug_shows_the_traceback_above_the_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("STACKREC_ERROR_LOG", str(tmp_path / "err.log"))
    _fail_with(monkeypatch, CheckpointError("x.pt: corrupt"))
    for argv in (["--debug", "config"], ["config", "--debug"]):
        assert cli.main(argv) == 4
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[0].startswith("Traceback") and lines[-1] == "stackrec: checkpoint error: x.pt: corrupt"


def test_a_bug_is_not_hidden(monkeypatch, tmp_path):
    monkeypatch.setenv("STACKREC_ERROR_LOG", str(tmp_path / "err.log"))
    _fail_with(monkeypatch, KeyError("a bug"))
    with pytest.raises(KeyError):
        cli.main(["config"])


def test_config_error_through_the_real_cli(tmp_path):
    res = run_cli("config", "--set", "optim.lr=-1", tmp_path=tmp_path)
    assert_one_line(res, 2, "config", "optim.lr must be > 0")
    assert "Traceback" in (tmp_path / "last-error.log").read_text()
    res = run_cli("--debug", "config", "--set", "optim.lr=-1", tmp_path=tmp_path)
    assert res.code == 2 and "Traceback" in res.stderr and res.last.startswith("stackrec: config error: ")


# -- errors raised inside Ray workers -------------------------------------------------------------


def _task_error(cause):
    from ray.exceptions import RayTaskError

    return RayTaskError("train_fn", "Traceback (most recent call last):\n  ...", cause,
                        proctitle="ray::RayTrainWorker", pid=1234, ip="127.0.0.1")


def test_unwrap_ray_task_error_and_its_dual_instance():
    err = DataError("null sequence", path="s3://b/x.parquet", row=3, field="item_ids")
    wrapped = _task_error(err)
    assert unwrap_worker_error(wrapped) is err
    dual = wrapped.as_instanceof_cause()  # RayTaskError(DataError): both types, Ray's text
    assert isinstance(dual, DataError)
    assert unwrap_worker_error(dual) is err


def test_unwrap_train_v2_worker_group_and_controller_errors():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    bad_data = DataError("null sequence", path="x.parquet", row=1)
    other = RuntimeError("rank 0 saw the collective time out")
    group = WorkerGroupError("rank 0: ...\nrank 1: ...", {0: other, 1: bad_data})
    assert unwrap_worker_error(group) is bad_data  # the project error wins over a peer's symptom
    assert unwrap_worker_error(WorkerGroupError("...", {0: other})) is other
    wrapped = UserExceptionWithTraceback(bad_data, "Traceback ...")
    assert unwrap_worker_error(WorkerGroupError("...", {2: wrapped})) is bad_data
    storage = StorageError("s3://b/k: refused")
    assert unwrap_worker_error(ControllerError(_task_error(storage))) is storage


def test_unwrap_leaves_other_exceptions_alone():
    plain = ValueError("x")
    assert unwrap_worker_error(plain) is plain
    chained = StorageError("s3://b/k: refused")
    chained.__cause__ = ConnectionRefusedError()
    assert unwrap_worker_error(chained) is chained


def test_main_prints_the_worker_error(monkeypatch, capsys, tmp_path):
    from ray.train.v2.api.exceptions import WorkerGroupError

    monkeypatch.setenv("STACKREC_ERROR_LOG", str(tmp_path / "err.log"))
    err = DataError("null sequence", path="s3://b/x.parquet", row_group=0, row=3, field="item_ids")
    _fail_with(monkeypatch, WorkerGroupError("rank 1 failed", {1: _task_error(err)}))
    assert cli.main(["config"]) == 3
    assert capsys.readouterr().err.strip() == (
        "stackrec: data error: s3://b/x.parquet row group 0 row 3 field item_ids: null sequence")
