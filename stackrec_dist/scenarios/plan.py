"""``run_plan``: one plan (TS, CL, TF or a from-scratch baseline) through the growth coordinator,
holding one Ray session for all its segments; then the final model's test metrics and
``<run_dir>/summary.json`` (the input of ``stackrec report``)."""


from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from stackrec_dist.config import JobConfig, config_to_dict
from stackrec_dist.growth.coordinator import Coordinator
from stackrec_dist.growth.ledger import PlanState, write_json_atomic

SUMMARY = "summary.json"


def validation_curve(state: PlanState) -> list[dict[str, float]]:
    """Validation points of all train stages on one wall-clock / step axis. A stage's set-up (and
    the grow or pause before it) is counted before its first point."""
    curve, offset_s, offset_steps = [], 0.0, 0
    for record in state.done:
        setup = max(0.0, record.elapsed_s - float(record.metrics.get("train_s", record.elapsed_s)))
        for point in record.metrics.get("history", []):
            curve.append({**point, "stage": record.name, "blocks": record.blocks,
                          "data_path": record.metrics.get("data_path", ""), "stage_start_s": offset_s,
                          "wall_s": offset_s + setup + point["elapsed_s"], "global_step": offset_steps + point["step"]})
        offset_s += record.elapsed_s
        offset_steps += int(record.metrics.get("steps", 0))
    return curve


def growth_pauses(state: PlanState) -> list[dict[str, Any]]:
    """Seconds between the last optimizer step of each train stage and the first of the next one,
    and where they go: the stage's final validation and checkpoint (``finish_s``), handing the
    weights on (gather, record, stack; a new worker group when the segment changes: ``handover_s``),
    building the next model, optimizer, engine and reader (``build_s``), its first batch
    (``first_batch_s``)."""
    trains = [r for r in state.done if r.action == "train" and r.metrics.get("last_step_end_t")]
    pauses = []
    for before, after in zip(trains, trains[1:]):
        b, a = before.metrics, after.metrics
        if not a.get("first_step_start_t"):
            continue
        pause = {"from": before.name, "to": after.name, "blocks": after.blocks,
                 "pause_s": a["first_step_start_t"] - b["last_step_end_t"]}
        if b.get("fit_end_t") and a.get("init_start_t") and a.get("built_t"):
            pause.update({"finish_s": b["fit_end_t"] - b["last_step_end_t"],
                          "handover_s": a["init_start_t"] - b["fit_end_t"],
                          "build_s": a["built_t"] - a["init_start_t"],
                          "first_batch_s": a["first_step_start_t"] - a["built_t"]})
        pauses.append(pause)
    return pauses


@contextlib.contextmanager
def plan_session(cfg: JobConfig):
    """One Ray session for every segment of the plan (none for a single-process plan)."""
    from stackrec_dist.growth.segment import stage_workers

    if any(s.action == "train" and stage_workers(cfg, s)[0] > 0 for s in cfg.plan):
        from stackrec_dist.train.ray_job import ray_session

        with ray_session(cfg):
            yield
    else:
        yield


def run_plan(cfg: JobConfig, run_dir: str | Path | None = None, options=None) -> dict[str, Any]:
    """Run the plan into ``run_dir`` (default ``train.checkpoint_dir``), test the final model, write
    the summary. ``options``: the loops' run-time switches (``train.loop.LoopOptions``; tests)."""
    from stackrec_dist.eval.evaluate import evaluate_split
    from stackrec_dist.train.checkpoint import open_checkpoint
    from stackrec_dist.train.device import resolve_device

    run_dir = Path(run_dir or cfg.train.checkpoint_dir)
    t0 = time.time()
    with plan_session(cfg):
        state = Coordinator(cfg, run_dir, options=options).run()
    plan_wall_s = time.time() - t0
    final_train = next(r for r in reversed(state.done) if r.action == "train")
    model, which = open_checkpoint(final_train.output).load_model("best")
    device = resolve_device(cfg.train.device).torch_device()
    last_train = next(s for s in reversed(cfg.plan) if s.action == "train")
    data = dataclasses.replace(cfg.data, path=last_train.data_path or cfg.data.path)
    test = evaluate_split(model, data, "test", cfg.eval, device, max_batches=0)  # the final test: every row
    summary = {
        "name": cfg.name,
        "stages": [{"name": r.name, "action": r.action, "blocks": r.blocks, "elapsed_s": r.elapsed_s,
                    "train_s": r.metrics.get("train_s", 0.0), "startup_s": r.metrics.get("startup_s", 0.0),
                    "steps": r.metrics.get("steps", 0)} for r in state.done],
        "wall_s": state.elapsed_s,
        "command_wall_s": plan_wall_s,
        "train_s": sum(float(r.metrics.get("train_s", 0.0)) for r in state.done),
        "pauses": growth_pauses(state),
        "steps": sum(int(r.metrics.get("steps", 0)) for r in state.done),
        "final_blocks": final_train.blocks,
        "test_weights": which,
        "test": test,
        "curve": validation_curve(state),
        "config": config_to_dict(cfg),
    }
    write_json_atomic(run_dir / SUMMARY, summary)
    return {"wall_s": summary["wall_s"], "train_s": summary["train_s"], "steps": summary["steps"],
            "final_blocks": final_train.blocks, "device": final_train.metrics.get("device", ""),
            "precision": final_train.metrics.get("precision", ""),
            **{f"test/{k}": v for k, v in test.items()}}
