"""loss.sampler=unigram: the proposal comes from the manifest's item counts and trains."""

import json

import pytest
import torch

from stackrec_dist.config import LossConfig, ModelConfig, config_from_dict
from stackrec_dist.losses import full_softmax_loss
from stackrec_dist.models import build_model
from stackrec_dist.train.data_info import dataset_num_items, item_counts
from stackrec_dist.train.step import RecommenderLoss
from stackrec_dist.train.device import DeviceChoice
from stackrec_dist.train.loop import TrainLoop, World

UNIGRAM = {"kind": "sampled", "sampler": "unigram", "num_samples": 16}


def test_proposal_is_frequency_to_the_075(tiny_dataset):
    cfg = config_from_dict({"data": {"path": str(tiny_dataset)}, "loss": UNIGRAM})
    model = build_model(ModelConfig(num_items=dataset_num_items(cfg.data), dim=8, num_blocks=1))
    objective = RecommenderLoss.for_data(model, cfg.loss, cfg.data)
    counts = item_counts(cfg.data).double()
    want = (counts + 1) ** 0.75
    want[0] = 0
    want /= want.sum()
    q = objective.log_q.double().exp()
    assert q[0] == 0
    torch.testing.assert_close(q, want, rtol=1e-5, atol=0)
    # Popular items really are drawn more often: empirical frequencies of 200k draws.
    draws = torch.multinomial(q.float(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    empirical = torch.bincount(draws, minlength=len(q)).double() / len(draws)
    assert (empirical - q).abs().max() < 0.01


def test_model_catalogue_larger_than_the_data(tiny_dataset):
    """benchmarks/scale.py: one model catalogue for every data size; the extra ids count 0."""
    cfg = config_from_dict({"data": {"path": str(tiny_dataset)}, "loss": UNIGRAM})
    have = dataset_num_items(cfg.data)
    model = build_model(ModelConfig(num_items=have + 7, dim=8, num_blocks=1))
    q = RecommenderLoss.for_data(model, cfg.loss, cfg.data).log_q.exp()
    assert q.shape == (have + 7,)
    # Never seen: all the same, and no more than any real item's (count >= 0).
    torch.testing.assert_close(q[have:], torch.full((7,), q[have].item()))
    assert q[have] > 0 and q[have] <= q[1:have].min()


def test_unigram_without_counts_fails_at_construction():
    model = build_model(ModelConfig(num_items=11, dim=8, num_blocks=1))
    with pytest.raises(ValueError, match="item_counts"):
        RecommenderLoss(model, LossConfig(**UNIGRAM))
    with pytest.raises(ValueError, match="shape"):
        RecommenderLoss(model, LossConfig(**UNIGRAM), item_counts=torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="prepared dataset"):
        RecommenderLoss.for_data(model, LossConfig(**UNIGRAM), None)


def _loop(cfg) -> TrainLoop:
    return TrainLoop(cfg, World(DeviceChoice("cpu")))


def test_unigram_sampled_softmax_trains(tiny_dataset, tmp_path):
    cfg = config_from_dict({
        "data": {"path": str(tiny_dataset), "max_len": 20, "batch_size": 32, "shuffle_buffer": 128},
        "model": {"dim": 16, "num_blocks": 2},
        "loss": UNIGRAM,
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"checkpoint_dir": str(tmp_path / "ck"), "progress": False, "patience": 0, "log_every": 1,
                  "max_steps": 60, "eval_every": 1000},
        "eval": {"batch_size": 128},
    })
    loop = _loop(cfg)
    assert loop.engine.module.log_q is not None
    batch = next(iter(loop.train_loader))

    def full_loss() -> float:
        with torch.no_grad():
            hidden = loop.model(batch["inputs"])
            return full_softmax_loss(hidden, batch["targets"], loop.model.head.weight,
                                     loop.model.head.bias).item()

    before = full_loss()
    loop.fit()
    assert full_loss() < before - 0.15  # chance is log(59) = 4.08


def test_step_times_probe_is_opt_in(tiny_dataset, tmp_path, monkeypatch):
    """STACKREC_STEP_TIMES_FILE (benchmarks/scale.py): one line per optimizer step, nothing unset."""
    from stackrec_dist.train import step as step_module

    cfg = config_from_dict({
        "data": {"path": str(tiny_dataset), "max_len": 20, "batch_size": 32},
        "model": {"dim": 8, "num_blocks": 1},
        "train": {"checkpoint_dir": str(tmp_path / "ck"), "progress": False, "patience": 0, "max_steps": 3,
                  "eval_every": 1000},
    })
    probe = tmp_path / "steps.jsonl"
    _loop(cfg).fit()
    assert not probe.exists()
    monkeypatch.setenv(step_module.STEP_TIMES_ENV, str(probe))
    try:
        _loop(cfg).fit()
    finally:
        step_module.remove_step_probe()
    lines = [json.loads(x) for x in probe.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert lines[0]["time"] <= lines[-1]["time"]
