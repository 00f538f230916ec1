"""A stage runner for coordinator tests that 'trains' by a deterministic perturbation.

It stands in for the optimizer only: checkpoints, stacking, manifests and the plan state are the
real code. Every call is appended to ``calls.log`` in the run directory so tests can count them.
Run as a script, it executes a plan (used to crash the coordinator in a subprocess).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from stackrec_dist.config import JobConfig, config_from_dict
from stackrec_dist.growth.coordinator import Coordinator
from stackrec_dist.growth.segment import StageResult
from stackrec_dist.models import build_model


class PerturbRunner:
    """A stage trainer for ``Coordinator(stage_trainer=...)``: no optimizer, a seeded perturbation."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def __call__(self, job: JobConfig, world, init_state, stage: str, run_id: str, sink, **_) -> StageResult:
        with open(self.run_dir / "calls.log", "a") as f:
            f.write(stage + "\n")
        torch.manual_seed(job.train.seed)
        model = build_model(job.model)
        if init_state is not None:
            model.load_state_dict(init_state)
        g = torch.Generator().manual_seed(len(stage))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g)) if not name.endswith("alpha") else p.add_(0.3)
        history = [{"step": 10, "epoch": 1, "elapsed_s": 0.1, "valid/ndcg@5": 0.1 * model.cfg.num_blocks}]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return StageResult(state, state, {"steps": 10, "train_s": 0.1, "history": history})


PLAN = [
    {"name": "train-2", "action": "train"},
    {"name": "grow-4", "action": "grow"},
    {"name": "train-4", "action": "train"},
    {"name": "grow-8", "action": "grow"},
    {"name": "train-8", "action": "train"},
]


def job(extra: dict | None = None) -> JobConfig:
    raw = {"model": {"num_items": 30, "dim": 8, "num_blocks": 2}, "plan": PLAN, "train": {"device": "cpu"},
           "growth": {"method": "adjacent", "alpha_policy": "zero_new"}}
    raw.update(extra or {})
    return config_from_dict(raw)


if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    Coordinator(job(extra), run_dir, stage_trainer=PerturbRunner(run_dir)).run()
