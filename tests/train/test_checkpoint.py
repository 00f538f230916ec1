"""The one checkpoint format: atomic writes, the one reader, and its refusals (one line each)."""

import json

import pytest
import torch

from stackrec_dist.config import ModelConfig
from stackrec_dist.errors import CheckpointError
from stackrec_dist.models import build_model
from stackrec_dist.train.checkpoint import (
    BEST_MODEL_FILE,
    COMPLETE_MARKER,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    open_checkpoint,
    save_model_checkpoint,
    write_atomically,
)

CFG = ModelConfig(num_items=20, dim=8, num_blocks=2)


def _weights(seed=0):
    torch.manual_seed(seed)
    return build_model(CFG).state_dict()


def test_weights_only_roundtrip_with_best(tmp_path):
    final, best = _weights(0), _weights(1)
    save_model_checkpoint(tmp_path / "ck", final, CFG, {"step": 7}, best_state=best)
    checkpoint = open_checkpoint(tmp_path / "ck")
    assert checkpoint.model_config == CFG and checkpoint.step == 7
    assert checkpoint.weights("best")[0] == "best" and checkpoint.weights("final")[0] == "final"
    model, which = checkpoint.load_model("best")
    assert which == "best"
    for key, value in best.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_overwrite_keeps_a_complete_copy(tmp_path):
    write_atomically(tmp_path / "ck", lambda d: (d / "v").write_text("1"))
    write_atomically(tmp_path / "ck", lambda d: (d / "v").write_text("2"))
    assert (tmp_path / "ck" / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_incomplete_checkpoint_is_never_loaded(tmp_path):
    save_model_checkpoint(tmp_path / "ck", _weights(), CFG)
    (tmp_path / "ck" / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        open_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("no_state", "lacks train_state.json"),
    ("bad_json", "is not valid JSON"),
    ("truncated", "truncated or corrupt checkpoint file"),
    ("wrong_width", "do not fit its model config"),
])
def test_bad_checkpoints_are_one_clear_error(tmp_path, case, message):
    path = tmp_path / "ck"
    if case == "file":
        path.write_text("x")
    elif case != "missing":
        save_model_checkpoint(path, _weights(), CFG)
        if case == "no_state":
            (path / TRAIN_STATE_FILE).unlink()
        elif case == "bad_json":
            (path / TRAIN_STATE_FILE).write_text("{")
        elif case == "truncated":
            data = (path / MODEL_FILE).read_bytes()
            (path / MODEL_FILE).write_bytes(data[: len(data) // 2])
        elif case == "wrong_width":
            state = json.loads((path / TRAIN_STATE_FILE).read_text())
            state["model_config"]["dim"] = 16
            (path / TRAIN_STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path).load_model()


def test_pickled_code_is_refused_without_advice_to_run_it(tmp_path):
    save_model_checkpoint(tmp_path / "ck", _weights(), CFG)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "ck" / BEST_MODEL_FILE)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path / "ck").load_model("best")
    assert "refused to load" in str(err.value) and "weights_only=False" not in str(err.value)
