import pytest
import torch

from stackrec_dist.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_roundtrip_and_weights_only(tmp_path):
    states = {"model": {"w": torch.arange(3.0)}, "train_state": {"step": 7, "history": [{"a": 1.0}]}}
    save_checkpoint(tmp_path / "ck", states)
    loaded = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert loaded["train_state"]["step"] == 7


def test_overwrite_keeps_a_complete_copy(tmp_path):
    save_checkpoint(tmp_path / "ck", {"model": {"v": torch.tensor(1)}})
    save_checkpoint(tmp_path / "ck", {"model": {"v": torch.tensor(2)}})
    assert load_checkpoint(tmp_path / "ck")["model"]["v"].item() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_incomplete_checkpoint_is_never_loaded(tmp_path):
    save_checkpoint(tmp_path / "ck", {"model": {"v": torch.tensor(1)}})
    (tmp_path / "ck" / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "ck")


def test_missing_part_is_named(tmp_path):
    save_checkpoint(tmp_path / "ck", {"model": {"v": torch.tensor(1)}})
    with pytest.raises(CheckpointError, match="lacks optimizer.pt"):
        load_checkpoint(tmp_path / "ck", names=("model", "optimizer"))


def test_pickled_code_is_refused(tmp_path):
    save_checkpoint(tmp_path / "ck", {"model": {"v": torch.tensor(1)}})

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "ck" / "model.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        load_checkpoint(tmp_path / "ck")
