"""Ray Train + DeepSpeed on CPU, for real: 2 gloo worker processes on the session's local Ray.

* fault tolerance: a worker SIGKILL-style crash mid-epoch, the run resumes from the latest
  checkpoint and every training window of the epoch is consumed exactly once;
* equivalence: ZeRO-2 (with gradient accumulation) and ZeRO-3 with 2 workers follow the
  single-process trainer's loss trajectory on the same global batches (fp32, rtol 1e-4 over 10
  steps), and their final checkpoints consolidate into the trainer's final weights in 1 process;
* a run checkpointing to ``s3://`` on the test S3 server.
"""

from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch

from stackrec_dist.config import config_from_dict
from tests.train.reference_run import single_process_reference

pytestmark = pytest.mark.slow


def _consumed(log_dir: Path) -> tuple[dict[int, float], Counter]:
    """(global loss per step from rank 0, multiset of window fingerprints over all ranks)."""
    losses, windows = {}, Counter()
    for path in sorted(log_dir.glob("consumed-rank*.jsonl")):
        steps = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            steps.append(rec["step"])
            windows.update(rec["windows"])
            if path.name == "consumed-rank0.jsonl":
                losses[rec["step"]] = rec["loss"]
        assert steps == sorted(set(steps)), f"{path.name}: a step logged twice after resume: {steps}"
    return losses, windows


# -- fault tolerance ------------------------------------------------------------------------------


def test_worker_crash_resumes_and_consumes_each_window_once(ray_local, tmp_path):
    from stackrec_dist.data.loader import build_train_loader
    from stackrec_dist.data.synthetic import generate_sequence_dataset
    from stackrec_dist.train.ray_job import fit_distributed
    from stackrec_dist.train.batches import window_fingerprints
    from stackrec_dist.train.loop import LoopOptions

    data = tmp_path / "data"
    generate_sequence_dataset(str(data), num_sequences=160, num_items=60, seed=3, num_shards=2, row_group_size=20)
    job = config_from_dict({
        "name": "fault",
        "model": {"dim": 16, "num_blocks": 2},
        "data": {"path": str(data), "batch_size": 16, "max_len": 10, "shuffle_buffer": 32},
        "optim": {"warmup_steps": 2},
        "eval": {"batch_size": 64},
        "train": {"epochs": 1, "eval_every": 3, "patience": 0},
        "distributed": {"num_workers": 2, "zero_stage": 2, "max_failures": 1,
                        "storage_path": str(tmp_path / "ray")},
    })
    marker = tmp_path / "crashed"
    logs = tmp_path / "consumed"
    result = fit_distributed(job, LoopOptions(consumed_log_dir=str(logs), fail_at_step=5, fail_rank=1,
                                                fail_marker=str(marker)))
    assert result.error is None
    assert marker.exists(), "the crash hook never fired"

    expected = Counter()
    loader = build_train_loader(job.data, "train", rank=0, world_size=1)
    for batch in loader:
        expected.update(window_fingerprints(batch))
    _, consumed = _consumed(logs)
    assert sum(expected.values()) > 100
    missing, repeated = expected - consumed, consumed - expected
    assert not missing and not repeated, f"{sum(missing.values())} windows lost, {sum(repeated.values())} repeated"
    assert result.metrics["valid/count"] == 160  # the distributed validation saw every row once
    state = json.loads(Path(result.checkpoint.path, "train_state.json").read_text())
    # The shares are uneven: the last step is the last one of the rank with the most batches.
    last = max(json.loads(line)["step"] for path in logs.glob("consumed-rank*.jsonl")
               for line in path.read_text().splitlines())
    assert state["step"] == result.metrics["step"] == last


# -- equivalence with the single-process trainer ---------------------------------------------------

STEPS = 10


def _equivalence_job(stage: int, accum: int, storage: Path):
    return config_from_dict({
        "name": f"equiv-z{stage}",
        "model": {"num_items": 151, "dim": 24, "num_blocks": 2, "alpha_init": 0.5},
        "data": {"batch_size": 16, "max_len": 12, "seed": 5},
        "optim": {"lr": 5e-3, "warmup_steps": 3, "weight_decay": 0.01, "grad_clip": 1.0},
        "train": {"max_steps": STEPS, "eval_every": 5, "patience": 0, "seed": 11},
        "distributed": {"num_workers": 2, "zero_stage": stage, "gradient_accumulation_steps": accum,
                        "storage_path": str(storage)},
    })


@pytest.mark.parametrize("stage,accum", [(2, 2), (3, 1)])
def test_zero_matches_single_process_trainer(ray_local, tmp_path, stage, accum):
    from stackrec_dist.train.ray_job import fit_distributed
    from stackrec_dist.train.loop import LoopOptions
    from stackrec_dist.train.zero_checkpoint import inspect_checkpoint, load_consolidated_state_dict

    job = _equivalence_job(stage, accum, tmp_path / "ray")
    logs = tmp_path / "consumed"
    result = fit_distributed(job, LoopOptions(data_source="synthetic", synthetic_steps_per_epoch=STEPS,
                                                evaluate=False, consumed_log_dir=str(logs)))
    assert result.error is None and result.metrics["step"] == STEPS
    losses, _ = _consumed(logs)
    ref_losses, ref_state = single_process_reference(job, STEPS)
    got = [losses[s] for s in range(1, STEPS + 1)]
    assert ref_losses[0] != pytest.approx(ref_losses[-1], rel=1e-3)  # the weights really moved
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref_losses, dtype=torch.float64),
                               rtol=1e-4, atol=0)

    # The final 2-worker checkpoint consolidates on CPU and loads into one process.
    ckpt = Path(result.checkpoint.path)
    info = inspect_checkpoint(ckpt)
    assert (info.zero_stage, info.world_size) == (stage, 2)
    full = load_consolidated_state_dict(ckpt)
    assert sorted(full) == sorted(ref_state)
    for name, ref in ref_state.items():
        assert full[name].shape == ref.shape, name
        torch.testing.assert_close(full[name], ref, rtol=1e-4, atol=1e-5, msg=name)
    assert math.isfinite(result.metrics["train/loss"])


# -- S3 storage -----------------------------------------------------------------------------------


def test_checkpoints_to_s3_storage(ray_local, s3_server, tmp_path):
    from stackrec_dist.data.storage import open_fs
    from stackrec_dist.data.synthetic import generate_sequence_dataset
    from stackrec_dist.train.checkpoint import open_checkpoint
    from stackrec_dist.train.loop import LoopOptions
    from stackrec_dist.train.ray_job import fit_distributed, local_checkpoint_dir

    prefix = f"s3://{s3_server.bucket}/dist-{uuid.uuid4().hex[:10]}"
    opts = s3_server.storage_options
    generate_sequence_dataset(f"{prefix}/data", num_sequences=80, num_items=40, seed=1, num_shards=2,
                              row_group_size=20, storage_options=opts)
    job = config_from_dict({
        "name": "s3run",
        "model": {"dim": 16, "num_blocks": 2},
        "data": {"path": f"{prefix}/data", "batch_size": 16, "max_len": 10, "storage_options": opts},
        "eval": {"batch_size": 64},
        "train": {"max_steps": 4, "eval_every": 2, "patience": 0, "checkpoint_dir": str(tmp_path / "local-ckpt")},
        "distributed": {"num_workers": 2, "zero_stage": 3, "storage_path": f"{prefix}/ray"},
    })
    result = fit_distributed(job, LoopOptions())
    assert result.metrics["step"] == 4 and result.metrics["valid/count"] == 80
    assert result.checkpoint.path.startswith(f"{s3_server.bucket}/")
    fs, _ = open_fs(prefix, opts)
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.find(result.checkpoint.path)}
    assert {"train_state.json", "cursor-rank0.json", "cursor-rank1.json", "latest", "COMPLETE"} <= names
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    # The one reader takes the checkpoint straight from the store, and as a local copy.
    remote = open_checkpoint(f"s3://{result.checkpoint.path}", opts)
    local = open_checkpoint(local_checkpoint_dir(job, result))
    assert local.path.is_relative_to(tmp_path / "local-ckpt")
    for checkpoint in (remote, local):
        assert checkpoint.engine == {"kind": "deepspeed", "zero_stage": 3, "world_size": 2, "tag": "engine"}
        full = checkpoint.model_state()
        assert "head.weight" in full and all(torch.isfinite(t).all() for t in full.values())


def test_zero3_checkpoint_of_two_workers_goes_through_evaluate_grow_and_init(ray_local, tiny_dataset, tmp_path,
                                                                            capsys):
    """`stackrec train` on 2 Ray workers at ZeRO-3 ends with a test table; its checkpoint is accepted
    by `stackrec evaluate`, `stackrec grow` and `stackrec train --init` (one process)."""
    from stackrec_dist.cli import main

    common = ["--set", f"data.path={tiny_dataset}", "--set", "data.max_len=20", "--set", "data.batch_size=32",
              "--set", "model.dim=16", "--set", "model.num_blocks=2", "--set", "eval.batch_size=128",
              "--set", "train.progress=false", "--set", "growth.alpha_policy=zero_new"]
    run = tmp_path / "run"
    assert main(["train", *common, "--set", "train.max_steps=4", "--set", "train.eval_every=2",
                 "--set", f"train.checkpoint_dir={run}", "--set", "distributed.num_workers=2",
                 "--set", "distributed.zero_stage=3", "--set", f"distributed.storage_path={tmp_path / 'ray'}"]) == 0
    out = capsys.readouterr().out
    trained = json.loads(out.splitlines()[-1].split(" ", 1)[1])
    assert "test" in out and trained["test/count"] == 300
    # Rank 0's tracking, written by the tracker actor on the driver's node into the run directory.
    from tests.train.test_tracking import read_events

    events = sorted((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert [step for step, _ in read_events(events[0].parent)[0]["valid/ndcg@5"]] == [2, 4]
    last = run / "last"
    assert json.loads((last / "train_state.json").read_text())["engine"]["world_size"] == 2
    assert main(["evaluate", *common, "--checkpoint", str(last), "--split", "test"]) == 0
    evaluated = json.loads(capsys.readouterr().out.splitlines()[-1].split(" ", 1)[1])
    # The same best weights as the run's own test evaluation.
    assert evaluated["test/ndcg@5"] == pytest.approx(trained["test/ndcg@5"], abs=1e-9)
    assert main(["grow", *common, "--checkpoint", str(last), "--output", str(tmp_path / "grown")]) == 0
    capsys.readouterr()
    assert main(["evaluate", *common, "--checkpoint", str(tmp_path / "grown"), "--split", "test"]) == 0
    grown = json.loads(capsys.readouterr().out.splitlines()[-1].split(" ", 1)[1])
    assert grown["test/ndcg@5"] == pytest.approx(trained["test/ndcg@5"], abs=1e-6)  # zero_new keeps the function
    assert main(["train", *common, "--init", str(tmp_path / "grown"), "--set", "train.max_steps=2",
                 "--set", "train.eval_every=2", "--set", f"train.checkpoint_dir={tmp_path / 'deeper'}"]) == 0
    deeper = json.loads((tmp_path / "deeper" / "last" / "train_state.json").read_text())
    assert deeper["model_config"]["num_blocks"] == 4 and deeper["engine"]["kind"] == "torch"
