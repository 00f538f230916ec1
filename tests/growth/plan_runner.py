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
from stackrec_dist.models import build_model
from stackrec_dist.train.checkpoint import model_config_to_state, save_checkpoint
from stackrec_dist.train.checkpoint import load_model


class PerturbRunner:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def train(self, cfg: JobConfig, init_checkpoint, stage_dir: Path):
        with open(self.run_dir / "calls.log", "a") as f:
            f.write(stage_dir.name + "\n")
        torch.manual_seed(cfg.train.seed)
        model = load_model(init_checkpoint) if init_checkpoint else build_model(cfg.model)
        g = torch.Generator().manual_seed(len(stage_dir.name))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g)) if not name.endswith("alpha") else p.add_(0.3)
        out = stage_dir / "best"
        save_checkpoint(out, {"model": model.state_dict(),
                              "train_state": {"step": 10, "model_config": model_config_to_state(model.cfg)}})
        history = [{"step": 10, "epoch": 1, "elapsed_s": 0.1, "valid/ndcg@5": 0.1 * model.cfg.num_blocks}]
        return out, {"steps": 10, "history": history}


PLAN = [
    {"name": "train-2", "action": "train"},
    {"name": "grow-4", "action": "grow"},
    {"name": "train-4", "action": "train"},
    {"name": "grow-8", "action": "grow"},
    {"name": "train-8", "action": "train"},
]


def job(extra: dict | None = None) -> JobConfig:
    raw = {"model": {"num_items": 30, "dim": 8, "num_blocks": 2}, "plan": PLAN,
           "growth": {"method": "adjacent", "alpha_policy": "zero_new"}}
    raw.update(extra or {})
    return config_from_dict(raw)


if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    Coordinator(job(extra), run_dir, PerturbRunner(run_dir)).run()
