import math

import pytest
import torch

from stackrec_dist.config import config_from_dict
from stackrec_dist.train.checkpoint import load_model
from stackrec_dist.train.data_info import count_windows
from stackrec_dist.train.trainer import Trainer


def _cfg(dataset, tmp_path, **train):
    return config_from_dict({
        "data": {"path": str(dataset), "max_len": 20, "batch_size": 32, "shuffle_buffer": 128},
        "model": {"dim": 16, "num_blocks": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"checkpoint_dir": str(tmp_path / "ck"), "progress": False, "patience": 0,
                  "log_every": 1, **train},
        "eval": {"batch_size": 128},
    })


def test_loss_decreases_and_metrics_beat_chance(tiny_dataset, tmp_path):
    trainer = Trainer(_cfg(tiny_dataset, tmp_path, max_steps=60, eval_every=30))
    first = trainer.train_step(next(iter(trainer.train_loader)))
    summary = trainer.fit()
    assert summary["steps"] == 60
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        last = trainer.objective(batch["inputs"], batch["targets"]).item()
    assert last < first - 0.3
    test = trainer.validate("test")
    assert test["count"] == 300
    # 59 items: a random ranking has HR@5 ~ 5/59.
    assert test["hr@5"] > 2 * 5 / 59


def test_steps_per_epoch_counts_every_window(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, epochs=1.0, eval_every=1000)
    trainer = Trainer(cfg)
    windows = sum(int((b["targets"] != 0).any(dim=1).sum()) for b in trainer.train_loader)
    assert windows == count_windows(cfg.data)
    assert trainer.steps_per_epoch == math.ceil(windows / 32)


def test_resume_restores_every_named_state(tiny_dataset, tmp_path):
    """Stop after 7 of 14 steps, rebuild from the checkpoint: model, optimizer, schedule, counters
    and data cursor continue (the reader resumes exactly-once, not in the same order: see docs/data.md)."""
    first = Trainer(_cfg(tiny_dataset, tmp_path, max_steps=14, eval_every=7))
    first.total_steps = 7  # stop early; the schedule stays that of a 14-step run
    first.fit()
    saved = first.state_dicts()
    resumed = Trainer(_cfg(tiny_dataset, tmp_path, max_steps=14, eval_every=7))
    resumed.load(tmp_path / "ck" / "last")
    assert resumed.state.step == 7 and resumed.total_steps == 14
    assert resumed.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    for key, value in saved["optimizer"]["state"].items():
        torch.testing.assert_close(resumed.optimizer.state_dict()["state"][key]["exp_avg"], value["exp_avg"])
    consumed_before = saved["data"]
    remaining = sum(int((b["targets"] != 0).any(dim=1).sum()) for b in resumed.train_loader)
    assert remaining == count_windows(resumed.cfg.data) - 7 * 32
    assert consumed_before is not None
    resumed.load(tmp_path / "ck" / "last")
    assert resumed.fit()["steps"] == 14


def test_early_stopping_and_best_model_restored(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, max_steps=400, eval_every=5, patience=2)
    cfg.optim.lr = 0.5  # diverges quickly after the first validations: stop early
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["steps"] < 400
    assert trainer.state.bad_validations >= 2
    best = load_model(tmp_path / "ck" / "best")
    for a, b in zip(best.state_dict().values(), trainer.model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_grown_model_continues_training(tiny_dataset, tmp_path):
    from stackrec_dist.config import GrowthConfig
    from stackrec_dist.growth.grow import grow_model

    shallow = Trainer(_cfg(tiny_dataset, tmp_path / "s", max_steps=20, eval_every=20))
    shallow.fit()
    before = shallow.validate("valid")
    grown = grow_model(shallow.model, GrowthConfig(alpha_policy="zero_new"))
    deep = Trainer(_cfg(tiny_dataset, tmp_path / "d", max_steps=10, eval_every=10), model=grown)
    assert deep.validate("valid")["ndcg@5"] == pytest.approx(before["ndcg@5"], abs=1e-6)
    deep.fit()
    assert len(deep.model.blocks) == 4
