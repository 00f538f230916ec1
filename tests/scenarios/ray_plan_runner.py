"""Small growth plans on real Ray + DeepSpeed for the plan tests. Run as a script, it runs one
(the crash-safety tests kill it, or its workers, in a subprocess and run it again)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stackrec_dist.config import JobConfig, config_from_dict

GROW_TWICE = [
    {"name": "train-2", "action": "train", "max_steps": 2},
    {"name": "grow-4", "action": "grow"},
    {"name": "train-4", "action": "train", "max_steps": 2},
    {"name": "grow-8", "action": "grow"},
    {"name": "train-8", "action": "train", "max_steps": 2},
]


def plan_job(dataset: str | Path, tmp: Path, name: str = "plan", plan: list[dict] | None = None, workers: int = 1,
             zero_stage: int = 0, method: str = "adjacent", eval_every: int = 2, max_failures: int = 0) -> JobConfig:
    return config_from_dict({
        "name": name,
        "data": {"path": str(dataset), "max_len": 20, "batch_size": 32, "shuffle_buffer": 64},
        "model": {"dim": 16, "num_blocks": 2},
        "optim": {"warmup_steps": 2},
        "eval": {"batch_size": 128},
        "growth": {"method": method, "alpha_policy": "zero_new"},
        "train": {"eval_every": eval_every, "patience": 0, "progress": False, "checkpoint_dir": str(tmp / "run")},
        "distributed": {"num_workers": workers, "zero_stage": zero_stage, "storage_path": str(tmp / "ray"),
                        "max_failures": max_failures},
        "plan": plan or GROW_TWICE,
    })


if __name__ == "__main__":
    from stackrec_dist.scenarios.plan import run_plan

    dataset, tmp = sys.argv[1], Path(sys.argv[2])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    run_plan(plan_job(dataset, tmp, **extra))
