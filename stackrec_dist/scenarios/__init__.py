"""CL / TS / TF scenarios are plans of stages in the job config (see configs/*ts*.yaml etc.):

- TS: train k blocks for part of the budget, grow, continue; repeat to the target depth.
- CL: train on slice-1, then grow and fine-tune as each cumulative slice arrives (stage data_path).
- TF: pre-train with stacking on the source dataset, new_head for the target, fine-tune on it.
- baseline: the same final depth from scratch is a plan with one train stage.

``run_plan`` runs one through the growth coordinator, evaluates the final model on the test split
and writes ``<run_dir>/summary.json`` (the input of ``stackrec report``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from stackrec_dist.config import JobConfig, config_to_dict
from stackrec_dist.growth.coordinator import Coordinator, PlanState, write_json_atomic

SUMMARY = "summary.json"


def validation_curve(state: PlanState) -> list[dict[str, float]]:
    """Validation points of all train stages on one wall-clock / step axis (grow time included)."""
    curve, offset_s, offset_steps = [], 0.0, 0
    for record in state.done:
        history = record.metrics.get("history", [])
        for point in history:
            curve.append({**point, "stage": record.name, "blocks": record.blocks,
                          "data_path": record.metrics.get("data_path", ""), "stage_start_s": offset_s,
                          "wall_s": offset_s + point["elapsed_s"], "global_step": offset_steps + point["step"]})
        offset_s += record.elapsed_s
        offset_steps += int(record.metrics.get("steps", 0))
    return curve


def run_plan(cfg: JobConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    from stackrec_dist.data.stream import iter_eval_batches
    from stackrec_dist.eval.evaluate import evaluate
    from stackrec_dist.growth.model_checkpoint import open_model_checkpoint
    from stackrec_dist.models import build_model
    from stackrec_dist.train.trainer import resolve_device

    run_dir = Path(run_dir or cfg.train.checkpoint_dir)
    state = Coordinator(cfg, run_dir).run()
    final = state.done[-1]
    checkpoint = open_model_checkpoint(final.output)
    model = build_model(checkpoint.model_config)
    model.load_state_dict(checkpoint.state_dict())
    device = resolve_device(cfg.train.device)
    last_train = next(s for s in reversed(cfg.plan) if s.action == "train")
    data = dataclasses.replace(cfg.data, path=last_train.data_path or cfg.data.path)
    test = evaluate(model.to(device), iter_eval_batches(data, "test", cfg.eval.batch_size), cfg.eval.ks, device)
    summary = {
        "name": cfg.name,
        "stages": [{"name": r.name, "action": r.action, "blocks": r.blocks, "elapsed_s": r.elapsed_s,
                    "steps": r.metrics.get("steps", 0)} for r in state.done],
        "wall_s": state.elapsed_s,
        "steps": sum(int(r.metrics.get("steps", 0)) for r in state.done),
        "final_blocks": final.blocks,
        "test": test,
        "curve": validation_curve(state),
        "config": config_to_dict(cfg),
    }
    write_json_atomic(run_dir / SUMMARY, summary)
    return {"wall_s": summary["wall_s"], "steps": summary["steps"], "final_blocks": final.blocks,
            **{f"test/{k}": v for k, v in test.items()}}
