"""TF (transfer) scenario end to end on tiny synthetic data: source/target domains prepared with
``prepare.user_subset``, stacking pre-training on the source, a new head, fine-tuning on the target."""

import json
from pathlib import Path

import pytest
import torch

from stackrec_dist.config import PrepareConfig, config_from_dict
from stackrec_dist.data.manifest import read_manifest
from stackrec_dist.data.prepare import prepare_dataset, read_id_map
from stackrec_dist.data.storage import open_fs
from stackrec_dist.growth.ledger import PLAN_STATE, STAGE_MANIFEST, verify_stage_output
from stackrec_dist.train.checkpoint import open_checkpoint
from stackrec_dist.scenarios.plan import SUMMARY, run_plan


def _prepare(tmp: Path, subset: str) -> str:
    out = tmp / f"data-{subset}"
    cfg = PrepareConfig(source="synthetic", output=str(out), synthetic_users=300, synthetic_items=60,
                        num_shards=2, row_group_size=64, user_subset=subset)
    prepare_dataset(cfg, cache_dir=str(tmp / "cache"))
    return str(out)


@pytest.fixture(scope="module")
def tf_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tf")
    source, target = _prepare(tmp, "source"), _prepare(tmp, "target")
    run_dir = tmp / "run"
    cfg = config_from_dict({
        "name": "tf-tiny",
        "data": {"path": source, "max_len": 12, "batch_size": 16, "shuffle_buffer": 64},
        "model": {"dim": 8, "num_blocks": 2},
        "growth": {"method": "adjacent", "alpha_policy": "zero_new"},
        "optim": {"warmup_steps": 2},
        "train": {"eval_every": 3, "patience": 0, "log_every": 3, "checkpoint_dir": str(run_dir),
                  "device": "cpu", "threads": 1, "progress": False},
        "eval": {"ks": [5, 20], "batch_size": 64},
        "plan": [
            {"name": "train-2", "action": "train", "data_path": source, "max_steps": 6},
            {"name": "grow-4", "action": "grow"},
            {"name": "new_head", "action": "new_head", "data_path": target},
            {"name": "finetune-4", "action": "train", "data_path": target, "max_steps": 6},
        ],
    })
    result = run_plan(cfg, run_dir)
    return {"source": source, "target": target, "run_dir": run_dir, "result": result}


def _state(path) -> dict[str, torch.Tensor]:
    return open_checkpoint(path).model_state()


def test_domains_share_item_ids(tf_run):
    assert read_id_map(tf_run["source"], "items") == read_id_map(tf_run["target"], "items")
    assert set(read_id_map(tf_run["source"], "users")).isdisjoint(read_id_map(tf_run["target"], "users"))


def test_final_model_and_transferred_weights(tf_run):
    run_dir = tf_run["run_dir"]
    done = json.loads((run_dir / PLAN_STATE).read_text())["done"]
    assert [(r["name"], r["blocks"]) for r in done] == [
        ("train-2", 2), ("grow-4", 4), ("new_head", 4), ("finetune-4", 4)]
    final = open_checkpoint(done[-1]["output"])
    assert final.model_config.num_blocks == 4
    fs, root = open_fs(tf_run["target"])
    assert final.model_config.num_items == read_manifest(fs, root).num_items

    grown, head = _state(run_dir / "grow-4" / "grown"), _state(run_dir / "new_head" / "new_head")
    # The head is freshly initialised: not the pre-trained (grown, copied) one.
    assert not torch.allclose(head["head.weight"], grown["head.weight"])
    # Blocks (conv weights included) and the embedding descend from the pre-training untouched.
    block_keys = [k for k in grown if k.startswith("blocks.")]
    assert any(k.endswith("conv1.weight") for k in block_keys)
    for key in block_keys + ["item_embedding.weight"]:
        assert torch.equal(head[key], grown[key]), key
    # ... and fine-tuning moved them.
    tuned = final.model_state()
    assert any(not torch.equal(tuned[k], head[k]) for k in block_keys if k.endswith("conv1.weight"))


def test_new_head_manifest_records_parent(tf_run):
    out = tf_run["run_dir"] / "new_head" / "new_head"
    assert verify_stage_output(out)
    manifest = json.loads((out / STAGE_MANIFEST).read_text())
    assert Path(manifest["parent"]) == tf_run["run_dir"] / "grow-4" / "grown"
    assert manifest["stage"] == "new_head"


def test_summary_has_target_test_metrics(tf_run):
    summary = json.loads((tf_run["run_dir"] / SUMMARY).read_text())
    assert summary["final_blocks"] == 4
    assert {"mrr@5", "hr@5", "ndcg@5", "ndcg@20"} <= set(summary["test"])
    assert all(0.0 <= summary["test"][k] <= 1.0 for k in ("mrr@5", "hr@5", "ndcg@5"))
    # The evaluated split is the target's (the last train stage's dataset): one row per target user.
    assert summary["config"]["plan"][-1]["data_path"] == tf_run["target"]
    fs, root = open_fs(tf_run["target"])
    assert summary["test"]["count"] == read_manifest(fs, root).splits["test"].rows
    assert [s["steps"] for s in summary["stages"]] == [6, 0, 0, 6]
    assert tf_run["result"]["final_blocks"] == 4
