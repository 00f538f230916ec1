"""The one training loop in a single process (the world-size-1 case, plain PyTorch engine)."""

import math

import pytest
import torch

from stackrec_dist.config import config_from_dict
from stackrec_dist.errors import CheckpointError, TrainingError
from stackrec_dist.train.checkpoint import open_checkpoint
from stackrec_dist.train.data_info import count_windows
from stackrec_dist.train.device import DeviceChoice
from stackrec_dist.train.loop import LocalSink, TrainLoop, World

CPU = World(DeviceChoice("cpu"))


def _cfg(dataset, tmp_path, **train):
    return config_from_dict({
        "data": {"path": str(dataset), "max_len": 20, "batch_size": 32, "shuffle_buffer": 128},
        "model": {"dim": 16, "num_blocks": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"checkpoint_dir": str(tmp_path / "ck"), "progress": False, "patience": 0,
                  "log_every": 1, **train},
        "eval": {"batch_size": 128},
    })


def _loop(cfg, resume=False, **kw):
    return TrainLoop(cfg, CPU, sink=LocalSink(cfg.train.checkpoint_dir, resume=resume), **kw)


def test_loss_decreases_and_metrics_beat_chance(tiny_dataset, tmp_path):
    loop = _loop(_cfg(tiny_dataset, tmp_path, max_steps=60, eval_every=30))
    first = loop.train_step(next(iter(loop.train_loader)))
    summary = loop.fit()
    assert summary["steps"] == 60 and len(summary["history"]) == 2
    batch = next(iter(loop.train_loader))
    with torch.no_grad():
        last = loop.engine(batch["inputs"], batch["targets"]).item()
    assert last < first - 0.3
    test = loop.validate("test", loop.best_model())
    assert test["count"] == 300
    # 59 items: a random ranking has HR@5 ~ 5/59.
    assert test["hr@5"] > 2 * 5 / 59


def test_steps_per_epoch_counts_every_window(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, epochs=1.0, eval_every=1000)
    loop = _loop(cfg)
    windows = sum(int((b["targets"] != 0).any(dim=1).sum()) for b in loop.train_loader)
    assert windows == count_windows(cfg.data)
    assert loop.steps_per_epoch == math.ceil(windows / 32)


def test_whole_epochs_stop_at_the_epoch_end(tiny_dataset, tmp_path):
    loop = _loop(_cfg(tiny_dataset, tmp_path, epochs=2.0, eval_every=1000))
    summary = loop.fit()
    assert summary["epochs"] == 2 and summary["steps"] == 2 * loop.steps_per_epoch


def test_checkpoint_of_another_window_stride_is_refused(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, max_steps=4, eval_every=4)
    cfg.data.window_stride = 5
    first = _loop(cfg)
    first.total_steps = 2
    first.fit()
    cfg.data.window_stride = 10
    with pytest.raises(CheckpointError, match="data.window_stride=5, this reader has data.window_stride=10"):
        _loop(cfg, resume=True).load(open_checkpoint(tmp_path / "ck" / "last"))
    cfg.data.window_stride = 5
    _loop(cfg, resume=True).load(open_checkpoint(tmp_path / "ck" / "last"))


def test_resume_restores_every_named_state(tiny_dataset, tmp_path):
    """Stop after 7 of 14 steps, rebuild from the checkpoint: model, optimizer, schedule, counters
    and data cursor continue (the reader resumes exactly-once, not in the same order: see docs/data.md)."""
    first = _loop(_cfg(tiny_dataset, tmp_path, max_steps=14, eval_every=7))
    first.total_steps = 7  # stop early; the schedule stays that of a 14-step run
    first.fit()
    saved_optimizer = first.engine.optimizer.state_dict()
    resumed = _loop(_cfg(tiny_dataset, tmp_path, max_steps=14, eval_every=7), resume=True)
    resumed.load(open_checkpoint(tmp_path / "ck" / "last"))
    assert resumed.state.step == 7 and resumed.total_steps == 14
    assert resumed.engine.lr() == first.engine.lr()
    for key, value in saved_optimizer["state"].items():
        torch.testing.assert_close(resumed.engine.optimizer.state_dict()["state"][key]["exp_avg"], value["exp_avg"])
    remaining = sum(int((b["targets"] != 0).any(dim=1).sum()) for b in resumed.train_loader)
    assert remaining == count_windows(resumed.job.data) - 7 * 32
    again = _loop(_cfg(tiny_dataset, tmp_path, max_steps=14, eval_every=7), resume=True)
    assert again.fit()["steps"] == 14


def test_early_stopping_keeps_the_best_weights(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, max_steps=400, eval_every=5, patience=2)
    cfg.optim.lr = 0.5  # diverges quickly after the first validations: stop early
    loop = _loop(cfg)
    summary = loop.fit()
    assert summary["steps"] < 400
    assert loop.state.bad_validations == 2
    best, which = open_checkpoint(tmp_path / "ck" / "best").load_model()
    assert which == "final"  # a weights-only checkpoint: its weights are the best ones
    for name, tensor in best.state_dict().items():
        torch.testing.assert_close(tensor, loop.best_state[name])
    # The full checkpoint carries the same best weights beside the final ones.
    last = open_checkpoint(tmp_path / "ck" / "last")
    assert last.weights("best")[0] == "best" and last.train_state["best_step"] == summary["best_step"]


def test_grown_weights_continue_training(tiny_dataset, tmp_path):
    from stackrec_dist.config import GrowthConfig
    from stackrec_dist.growth.grow import grow_state

    shallow = _loop(_cfg(tiny_dataset, tmp_path / "s", max_steps=20, eval_every=20))
    shallow.fit()
    before = shallow.validate("valid")
    state, grown_cfg = grow_state(shallow.full_model_state(), shallow.model_cfg, GrowthConfig(alpha_policy="zero_new"))
    cfg = _cfg(tiny_dataset, tmp_path / "d", max_steps=10, eval_every=10)
    cfg.model = grown_cfg
    deep = _loop(cfg, init_state=state)
    assert deep.validate("valid")["ndcg@5"] == pytest.approx(before["ndcg@5"], abs=1e-6)
    deep.fit()
    assert len(deep.model.blocks) == 4


def test_an_epoch_without_a_window_is_an_error_not_a_hang(tmp_path):
    """Every user has exactly the minimum 3 items: leave-last-out keeps 1 training item each, so
    the training split has no (history, next item) pair; the loop must stop with a reason."""
    from stackrec_dist.config import PrepareConfig
    from stackrec_dist.data.prepare import prepare_dataset

    raw = tmp_path / "raw.csv"
    raw.write_text("user,item,timestamp\n" + "".join(f"u{u},i{(u + k) % 7},{k}\n" for u in range(20) for k in range(3)))
    data = tmp_path / "data"
    prepare_dataset(PrepareConfig(source=str(raw), output=str(data), num_shards=1), cache_dir=str(tmp_path / "c"))
    loop = _loop(_cfg(data, tmp_path, max_steps=5))
    with pytest.raises(TrainingError, match="yielded no training window"):
        loop.fit()


def test_a_checkpoint_of_another_catalogue_is_refused(tiny_dataset, tmp_path):
    loop = _loop(_cfg(tiny_dataset, tmp_path, max_steps=2, eval_every=2))
    loop.fit()
    other = _cfg(tiny_dataset, tmp_path, max_steps=2)
    other.model.num_items = 99
    with pytest.raises(CheckpointError, match="catalogue of 61 items but dataset .* has 99"):
        _loop(other).load(open_checkpoint(tmp_path / "ck" / "last"))


def test_a_schedule_slot_sets_the_rate_from_the_plan_wide_curve(tiny_dataset, tmp_path):
    from stackrec_dist.train.schedule import ScheduleSlot, lr_lambda

    cfg = _cfg(tiny_dataset, tmp_path, max_steps=10, eval_every=10)
    loop = _loop(cfg, schedule_slot=ScheduleSlot(start=30, total=60))
    assert loop.engine.lr() == pytest.approx(3e-3 * lr_lambda(cfg.optim, 60)(30))
    loop.fit()
    assert loop.engine.lr() == pytest.approx(3e-3 * lr_lambda(cfg.optim, 60)(40))
