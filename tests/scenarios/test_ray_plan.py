"""A growth plan on real Ray Train + DeepSpeed: 2 workers at ZeRO-2, grow from the partitioned
checkpoint, continue with 1 worker at ZeRO-3 (the world size and ZeRO stage change at growth)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stackrec_dist.growth.ledger import PLAN_STATE, STAGE_MANIFEST, verify_stage_output
from stackrec_dist.train.checkpoint import open_checkpoint
from tests.scenarios.ray_plan_runner import plan_job
from stackrec_dist.scenarios.plan import run_plan

pytestmark = pytest.mark.slow


def test_plan_grows_a_zero2_checkpoint_and_continues_on_zero3(ray_local, tiny_dataset, tmp_path):
    cfg = plan_job(tiny_dataset, tmp_path, "rayplan", workers=2, zero_stage=2, method="cross", eval_every=3, plan=[
        {"name": "train-2", "action": "train", "max_steps": 3},
        {"name": "grow-4", "action": "grow"},
        {"name": "train-4", "action": "train", "max_steps": 3, "num_workers": 1, "zero_stage": 3},
    ])
    result = run_plan(cfg)
    assert result["final_blocks"] == 4 and 0 <= result["test/ndcg@5"] <= 1
    done = json.loads((tmp_path / "run" / PLAN_STATE).read_text())["done"]
    first, grown = Path(done[0]["output"]), tmp_path / "run" / "grow-4" / "grown"
    assert first == tmp_path / "run" / "train-2" / "final" and verify_stage_output(first)
    assert verify_stage_output(grown)
    assert json.loads((grown / STAGE_MANIFEST).read_text())["parent"] == str(first)
    parent = open_checkpoint(first).model_state()
    child = open_checkpoint(grown).model_state()
    # cross: new blocks i and i+2 copy old block i; gathered from the ZeRO-2 workers.
    for i in (0, 1):
        for j in (i, i + 2):
            torch.testing.assert_close(child[f"blocks.{j}.conv1.weight"], parent[f"blocks.{i}.conv1.weight"], rtol=0, atol=0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["blocks"] for s in summary["stages"]] == [2, 4, 4]
    assert summary["curve"] and all("wall_s" in p for p in summary["curve"])


def test_plan_grows_in_place_in_one_worker_group(ray_local, tiny_dataset, tmp_path):
    """Same world size and ZeRO stage throughout: one Ray run (one worker group) trains 2 blocks,
    grows to 4 and 8 in place and continues; the grown weights are recorded as they happen."""
    cfg = plan_job(tiny_dataset, tmp_path, "inplace", workers=2, zero_stage=3)
    result = run_plan(cfg)
    assert result["final_blocks"] == 8
    runs = [p for p in (tmp_path / "ray").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # one TorchTrainer run for the whole plan
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["blocks"] for s in summary["stages"]] == [2, 4, 4, 8, 8]
    assert summary["stages"][0]["startup_s"] > 0 and all(s["startup_s"] == 0 for s in summary["stages"][1:])
    assert [p["to"] for p in summary["pauses"]] == ["train-4", "train-8"]
    assert all(0 < p["pause_s"] < 60 for p in summary["pauses"])
    # Rank 0 tracked the whole plan on one step axis (TensorBoard under the run directory).
    from tests.train.test_tracking import read_events

    events = sorted((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    scalars, _ = read_events(events[0].parent)
    assert scalars["model/depth"] == [(0, 2.0), (2, 4.0), (4, 8.0)]
    assert len(scalars["growth/pause_s"]) == 2
    # The recorded grown weights are the parent's, stacked (zero_new: new blocks' alpha = 0).
    parent = open_checkpoint(tmp_path / "run" / "train-4" / "final").model_state()
    grown = open_checkpoint(tmp_path / "run" / "grow-8" / "grown").model_state()
    for i in range(4):
        torch.testing.assert_close(grown[f"blocks.{2 * i}.conv1.weight"], parent[f"blocks.{i}.conv1.weight"],
                                   rtol=0, atol=0)
        assert grown[f"blocks.{2 * i + 1}.alpha"].item() == 0.0


# -- crash safety of in-place growth ------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    done = json.loads((run_dir / PLAN_STATE).read_text())["done"]
    return open_checkpoint(done[-1]["output"]).model_state()


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_plan(plan_job(tiny_dataset, tmp, "crashplan"))
    return _final_weights(tmp / "run")


def test_worker_killed_while_growing_in_place_resumes_identically(ray_local, tiny_dataset, tmp_path, monkeypatch,
                                                                  uninterrupted):
    """The worker dies between the end of train-4 and its stacking into 8 blocks; Ray restarts
    the group, which resumes from what was recorded and ends bit-identical to an uninterrupted run."""
    monkeypatch.setenv("STACKREC_CRASH_AT", "snapshot:grow-8")
    monkeypatch.setenv("STACKREC_CRASH_ONCE", str(tmp_path / "crashed"))
    run_plan(plan_job(tiny_dataset, tmp_path, "crashplan", max_failures=1))
    assert (tmp_path / "crashed").exists(), "the fault was never injected"
    steps = {r["name"]: r["metrics"].get("steps") for r in
             json.loads((tmp_path / "run" / PLAN_STATE).read_text())["done"]}
    assert steps == {"train-2": 2, "grow-4": None, "train-4": 2, "grow-8": None, "train-8": 2}
    _assert_same_weights(_final_weights(tmp_path / "run"), uninterrupted)


@pytest.mark.parametrize("crash", ["before_manifest:grow-4", "after_train:train-4"])
def test_coordinator_rerun_after_a_crash_resumes_identically(tiny_dataset, tmp_path, crash, uninterrupted):
    """A crash inside the segment (in the ledger while recording a grown model, or in a worker
    before its stage is recorded) fails the whole command; running it again resumes from what
    was recorded, never from a half-written file, and ends bit-identical."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "STACKREC_CRASH_AT": crash}
    args = [sys.executable, "-m", "tests.scenarios.ray_plan_runner", str(tiny_dataset), str(tmp_path),
            json.dumps({"name": "crashplan"})]
    first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode != 0
    done = [r["name"] for r in json.loads((tmp_path / "run" / PLAN_STATE).read_text())["done"]]
    assert "train-8" not in done
    env.pop("STACKREC_CRASH_AT")
    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert verify_stage_output(tmp_path / "run" / "grow-4" / "grown")
    _assert_same_weights(_final_weights(tmp_path / "run"), uninterrupted)
