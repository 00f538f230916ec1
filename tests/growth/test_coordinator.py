import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stackrec_dist.growth.coordinator import Coordinator
from stackrec_dist.growth.ledger import PLAN_STATE, STAGE_MANIFEST, WIPE_ENV, verify_stage_output
from stackrec_dist.train.checkpoint import open_checkpoint
from stackrec_dist.models import build_model
from tests.growth.plan_runner import PerturbRunner, job

REPO = Path(__file__).resolve().parents[2]


def _run_subprocess(run_dir: Path, crash: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("STACKREC_CRASH_AT", None)
    if crash:
        env["STACKREC_CRASH_AT"] = crash
    proc = subprocess.run([sys.executable, "-m", "tests.growth.plan_runner", str(run_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = json.loads((run_dir / PLAN_STATE).read_text())
    return open_checkpoint(state["done"][-1]["output"]).model_state()


def _calls(run_dir: Path) -> list[str]:
    return (run_dir / "calls.log").read_text().split()


def test_plan_runs_to_final_depth_with_manifests(tmp_path):
    state = Coordinator(job(), tmp_path, stage_trainer=PerturbRunner(tmp_path)).run()
    assert [r.name for r in state.done] == ["train-2", "grow-4", "train-4", "grow-8", "train-8"]
    assert [r.blocks for r in state.done] == [2, 4, 4, 8, 8]
    grown = tmp_path / "grow-8" / "grown"
    assert verify_stage_output(grown)
    manifest = json.loads((grown / STAGE_MANIFEST).read_text())
    assert manifest["blocks"] == 8 and manifest["plan_position"] == 3
    assert manifest["parent_blocks"] == 4 and manifest["stage"] == "grow-8"
    assert _calls(tmp_path) == ["train-2", "train-4", "train-8"]


def test_grown_checkpoint_preserves_the_parent_function(tmp_path):
    Coordinator(job(), tmp_path, stage_trainer=PerturbRunner(tmp_path)).run()
    m_parent, _ = open_checkpoint(tmp_path / "train-4" / "final").load_model("final")
    m_grown, _ = open_checkpoint(tmp_path / "grow-8" / "grown").load_model("final")
    x = torch.randint(1, 30, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(m_grown(x), m_parent(x), rtol=0, atol=0)


def test_rerun_of_a_finished_plan_does_nothing(tmp_path):
    Coordinator(job(), tmp_path, stage_trainer=PerturbRunner(tmp_path)).run()
    Coordinator(job(), tmp_path, stage_trainer=PerturbRunner(tmp_path)).run()
    assert _calls(tmp_path) == ["train-2", "train-4", "train-8"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    reference = tmp_path_factory.mktemp("reference")
    assert _run_subprocess(reference, None) == 0
    return reference


@pytest.mark.slow
@pytest.mark.parametrize(
    "crash, retrained",
    [
        ("after_train:train-4", ["train-4"]),           # trained, not yet recorded
        ("snapshot:grow-8", []),                         # about to read the parent
        ("stacking:grow-8", []),                         # parent loaded, nothing written
        ("before_manifest:grow-8", []),                  # grown weights in place, manifest missing
        ("before_record:grow-4", []),                    # manifest written, plan state not updated
    ],
)
def test_crash_at_any_point_resumes_at_the_right_stage(tmp_path, reference_run, crash, retrained):
    reference = reference_run
    run = tmp_path / "crashed"
    assert _run_subprocess(run, crash) == 17
    done_before = [r["name"] for r in json.loads((run / PLAN_STATE).read_text())["done"]]
    assert "train-2" in done_before  # every crash point lies after the first stage was recorded
    assert _run_subprocess(run, None) == 0
    calls = _calls(run)
    # Stages recorded before the crash are never redone; only the interrupted train stage is.
    for name in ["train-2", "train-4", "train-8"]:
        expected = 2 if name in retrained else 1
        assert calls.count(name) == expected, (name, calls)
    assert all(name in [r["name"] for r in json.loads((run / PLAN_STATE).read_text())["done"]] for name in done_before)
    final, ref = _final_state(run), _final_state(reference)
    assert final.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(final[key], ref[key], rtol=0, atol=0)


@pytest.mark.slow
def test_half_written_grown_checkpoint_is_never_loaded(tmp_path):
    assert _run_subprocess(tmp_path, "before_manifest:grow-4") == 17
    grown = tmp_path / "grow-4" / "grown"
    assert grown.exists() and not verify_stage_output(grown)
    # Poison the half-written weights: if anything loaded them, the final model would differ.
    torch.save({"poison": torch.zeros(1)}, grown / "model.pt")
    assert _run_subprocess(tmp_path, None) == 0
    assert verify_stage_output(grown)
    assert "poison" not in torch.load(grown / "model.pt", weights_only=True)


def test_recorded_output_that_no_longer_verifies_is_redone(tmp_path):
    Coordinator(job(), tmp_path, stage_trainer=PerturbRunner(tmp_path)).run()
    grown = tmp_path / "grow-8" / "grown"
    with open(grown / "model.pt", "ab") as f:
        f.write(b"corruption")
    state = Coordinator(job(), tmp_path, stage_trainer=PerturbRunner(tmp_path)).run()
    assert verify_stage_output(grown)
    assert _calls(tmp_path).count("train-8") == 2 and _calls(tmp_path).count("train-4") == 1
    assert state.done[-1].blocks == 8


def test_grow_before_any_training_fails_clearly(tmp_path):
    cfg = job({"plan": [{"name": "g", "action": "grow"}]})
    with pytest.raises(ValueError, match="grow needs a trained model"):
        Coordinator(cfg, tmp_path, stage_trainer=PerturbRunner(tmp_path)).run()


def test_leftover_temporary_directories_are_removed(tmp_path):
    (tmp_path / "grow-4" / ".grown.tmp-999").mkdir(parents=True)
    Coordinator(job(), tmp_path, stage_trainer=PerturbRunner(tmp_path)).run()
    assert not list(tmp_path.glob("*/.*.tmp-*"))


def test_wipe_hook_empties_the_scratch_at_every_stage_end(tmp_path, monkeypatch):
    """The two-node test's hook (STACKREC_WIPE_AT_STAGE_END) in one process: each stage starts with
    the scratch emptied of what the stages before it left there, and the plan still finishes."""
    scratch, run_dir = tmp_path / "scratch", tmp_path / "run"
    scratch.mkdir()
    monkeypatch.setenv(WIPE_ENV, str(scratch))
    seen = []

    class LeavesFiles(PerturbRunner):
        def __call__(self, job, world, init_state, stage, run_id, sink, **kw):
            seen.append(sorted(p.name for p in scratch.iterdir()))
            (scratch / f"left-by-{stage}").mkdir()
            (scratch / f"left-by-{stage}.txt").write_text("x")
            return super().__call__(job, world, init_state, stage, run_id, sink, **kw)

    run_dir.mkdir()
    state = Coordinator(job(), run_dir, stage_trainer=LeavesFiles(run_dir)).run()
    assert seen == [[], [], []]
    assert scratch.is_dir() and not list(scratch.iterdir())
    assert state.done[-1].blocks == 8


class _SlotRecorder(PerturbRunner):
    def __call__(self, job, world, init_state, stage, run_id, sink, **kw):
        with open(self.run_dir / "slots.log", "a") as f:
            slot = kw.get("schedule_slot")
            f.write(f"{stage} {slot.start if slot else '-'} {slot.total if slot else '-'}\n")
        return super().__call__(job, world, init_state, stage, run_id, sink, **kw)


def test_a_plan_wide_schedule_hands_each_train_stage_its_slot(tmp_path):
    Coordinator(job({"optim": {"schedule": "plan"}, "train": {"device": "cpu", "max_steps": 10}}), tmp_path,
                stage_trainer=_SlotRecorder(tmp_path)).run()
    assert (tmp_path / "slots.log").read_text().split("\n")[:3] == ["train-2 0 30", "train-4 10 30", "train-8 20 30"]
