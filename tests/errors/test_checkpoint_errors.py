"""Bad checkpoints: one ``stackrec: checkpoint error`` line (exit 4) naming the file, never torch's
advice to load with ``weights_only=False``."""

from __future__ import annotations

import os

import pytest
import torch

from stackrec_dist.errors import CheckpointError, safe_torch_load
from tests.errors.conftest import assert_one_line, run_cli, write_job

CHECKPOINT = 4


class _Payload:
    """Pickled as a call of os.getcwd: what a tampered checkpoint could run on a plain torch.load."""

    def __reduce__(self):
        return (os.getcwd, ())


def _unsafe(path):
    torch.save({"weight": _Payload()}, path)
    return path


def _truncated(path):
    torch.save({"weight": torch.zeros(256)}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def test_safe_torch_load_reads_plain_state(tmp_path):
    torch.save({"w": torch.ones(3), "step": 4}, tmp_path / "ok.pt")
    state = safe_torch_load(tmp_path / "ok.pt")
    assert state["step"] == 4 and torch.equal(state["w"], torch.ones(3))


@pytest.mark.parametrize("make, text", [
    (lambda p: p, "checkpoint file does not exist"),
    (lambda p: (p.mkdir(), p)[1], "is a directory"),
    (lambda p: (p.write_bytes(b""), p)[1], "empty checkpoint file (0 bytes)"),
    (_truncated, "truncated or corrupt checkpoint file (300 bytes)"),
    (lambda p: (p.write_bytes(b"not a checkpoint at all"), p)[1], "corrupt checkpoint file"),
    (_unsafe, "refused to load: the file holds pickled Python objects (posix.getcwd)"),
])
def test_safe_torch_load_one_line_naming_the_file(tmp_path, make, text):
    path = make(tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and text in message
    assert "\n" not in message and "weights_only" not in message


def test_missing_checkpoint_through_evaluate(tmp_path, corpus_source):
    res = run_cli("evaluate", "--config", str(write_job(tmp_path, corpus_source)),
                  "--checkpoint", str(tmp_path / "nope"), tmp_path=tmp_path)
    assert_one_line(res, CHECKPOINT, "checkpoint", str(tmp_path / "nope"), "does not exist")


def test_truncated_checkpoint_through_evaluate(tmp_path, corpus_source, checkpoint):
    model = checkpoint / "model.pt"
    model.write_bytes(model.read_bytes()[:200])
    res = run_cli("evaluate", "--config", str(write_job(tmp_path, corpus_source)),
                  "--checkpoint", str(checkpoint), tmp_path=tmp_path)
    assert_one_line(res, CHECKPOINT, "checkpoint", str(model), "truncated or corrupt")


def test_unsafe_pickle_through_evaluate(tmp_path, corpus_source, checkpoint):
    _unsafe(checkpoint / "model.pt")
    res = run_cli("evaluate", "--config", str(write_job(tmp_path, corpus_source)),
                  "--checkpoint", str(checkpoint), tmp_path=tmp_path)
    assert "weights_only" not in res.stderr
    assert_one_line(res, CHECKPOINT, "checkpoint", str(checkpoint / "model.pt"), "refused to load")
