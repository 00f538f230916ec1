"""A growth plan on real Ray Train + DeepSpeed: 2 workers at ZeRO-2, grow from the partitioned
checkpoint, continue with 1 worker at ZeRO-3 (the world size and ZeRO stage change at growth)."""

import json
from pathlib import Path

import pytest
import torch

from stackrec_dist.config import config_from_dict
from stackrec_dist.growth.coordinator import PLAN_STATE, STAGE_MANIFEST, verify_stage_output
from stackrec_dist.growth.model_checkpoint import open_model_checkpoint
from stackrec_dist.scenarios import run_plan

pytestmark = pytest.mark.slow


def test_plan_grows_a_zero2_checkpoint_and_continues_on_zero3(ray_local, tiny_dataset, tmp_path):
    cfg = config_from_dict({
        "name": "rayplan",
        "data": {"path": str(tiny_dataset), "max_len": 20, "batch_size": 32, "shuffle_buffer": 64},
        "model": {"dim": 16, "num_blocks": 2},
        "optim": {"warmup_steps": 2},
        "eval": {"batch_size": 128},
        "growth": {"method": "cross", "alpha_policy": "zero_new"},
        "train": {"eval_every": 3, "patience": 0, "progress": False, "checkpoint_dir": str(tmp_path / "run")},
        "distributed": {"num_workers": 2, "zero_stage": 2, "storage_path": str(tmp_path / "ray")},
        "plan": [
            {"name": "train-2", "action": "train", "max_steps": 3},
            {"name": "grow-4", "action": "grow"},
            {"name": "train-4", "action": "train", "max_steps": 3, "num_workers": 1, "zero_stage": 3},
        ],
    })
    result = run_plan(cfg)
    assert result["final_blocks"] == 4 and 0 <= result["test/ndcg@5"] <= 1
    done = json.loads((tmp_path / "run" / PLAN_STATE).read_text())["done"]
    first, grown = Path(done[0]["output"]), tmp_path / "run" / "grow-4" / "grown"
    assert (first / "model_config.json").exists(), "the first stage's output is the DeepSpeed checkpoint"
    assert verify_stage_output(grown)
    assert json.loads((grown / STAGE_MANIFEST).read_text())["parent"] == str(first)
    parent = open_model_checkpoint(first).state_dict()
    child = open_model_checkpoint(grown).state_dict()
    # cross: new blocks i and i+2 copy old block i; consolidated from the ZeRO-2 shards.
    for i in (0, 1):
        for j in (i, i + 2):
            torch.testing.assert_close(child[f"blocks.{j}.conv1.weight"], parent[f"blocks.{i}.conv1.weight"], rtol=0, atol=0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["blocks"] for s in summary["stages"]] == [2, 4, 4]
    assert summary["curve"] and all("wall_s" in p for p in summary["curve"])
