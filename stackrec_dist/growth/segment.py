"""A plan's segments and what runs inside one worker group: train a stage, grow in place,
continue (``run_segment``); where a segment (re)starts from what the ledger recorded
(``resume_point``). Nothing here touches Ray: the same code runs in the driver's process for a
single-process plan and inside every Ray worker for a distributed one (``train/ray_job.py``).

A segment is a maximal run of plan stages that share one worker group: every train stage has the
same number of workers and ZeRO stage, and a grow or new_head joins the segment of the train stage
before it. Inside a segment nothing restarts: when a train stage ends, every rank takes the full
weights, stacks them with the pure functions of ``growth/grow.py`` (each rank computes the same
result, no tensors travel), builds the next engine and continues on the next stage's data.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stackrec_dist.config import JobConfig, ModelConfig, StageConfig
from stackrec_dist.growth.grow import grow_state, new_head_state
from stackrec_dist.growth.ledger import PlanLedger, StageRecord, maybe_crash, maybe_wipe_scratch
from stackrec_dist.train.schedule import ScheduleSlot, step_budget

# -- plan arithmetic -------------------------------------------------------------------------------


def stage_workers(cfg: JobConfig, stage: StageConfig) -> tuple[int, int]:
    """(number of workers, ZeRO stage) of a train stage."""
    workers = cfg.distributed.num_workers if stage.num_workers < 0 else stage.num_workers
    zero = cfg.distributed.zero_stage if stage.zero_stage < 0 else stage.zero_stage
    return workers, zero


def plan_segments(cfg: JobConfig) -> list[list[int]]:
    """Plan positions grouped by worker group; grow/new_head stages join the segment before them."""
    segments: list[list[int]] = []
    current: tuple[int, int] | None = None
    for position, stage in enumerate(cfg.plan):
        if stage.action != "train":
            if not segments:
                raise ValueError(f"plan stage {stage.name!r}: {stage.action} needs a trained model before it")
            segments[-1].append(position)
            continue
        group = stage_workers(cfg, stage)
        if segments and group == current:
            segments[-1].append(position)
        else:
            segments.append([position])
            current = group
    return segments


def stage_job_config(cfg: JobConfig, stage: StageConfig, model_cfg: ModelConfig, stage_dir: Path) -> JobConfig:
    """The job config of one train stage: its data, budget, learning rate, model and checkpoint directory."""
    data = dataclasses.replace(cfg.data, path=stage.data_path or cfg.data.path,
                               train_split=stage.train_split or cfg.data.train_split)
    train = dataclasses.replace(
        cfg.train,
        checkpoint_dir=str(stage_dir),
        max_steps=stage.max_steps or cfg.train.max_steps,
        epochs=stage.epochs or cfg.train.epochs,
        patience=cfg.train.patience if stage.patience < 0 else stage.patience,
        eval_every=stage.eval_every or cfg.train.eval_every,
    )
    # With a plan-wide schedule the warm-up belongs to the plan's curve; the stage's own ramp
    # travels in its ScheduleSlot (plan_schedule_slot).
    own_warmup = stage.warmup_steps >= 0 and cfg.optim.schedule == "stage"
    optim = dataclasses.replace(
        cfg.optim,
        lr=stage.lr or cfg.optim.lr,
        warmup_steps=stage.warmup_steps if own_warmup else cfg.optim.warmup_steps,
    )
    workers, zero = stage_workers(cfg, stage)
    distributed = dataclasses.replace(cfg.distributed, num_workers=workers, zero_stage=zero)
    return dataclasses.replace(cfg, name=f"{cfg.name}-{stage.name}", data=data, train=train, model=model_cfg,
                               optim=optim, distributed=distributed, plan=[])


def plan_schedule_slot(cfg: JobConfig, position: int, steps_per_epoch: Callable[[Any], int]) -> ScheduleSlot | None:
    """The slot of the plan-wide learning-rate curve that train stage ``position`` runs
    (``optim.schedule=plan``), None when every stage has its own curve.

    Slots follow the stages' budgets, not the steps they actually took: a stage that stops early
    on a plateau leaves the rest of its slot unused, so where each stage starts on the curve does
    not depend on how the stages before it ended (and a resumed plan computes the same slots)."""
    if cfg.optim.schedule != "plan" or not cfg.plan:
        return None
    jobs = [(i, stage_job_config(cfg, s, cfg.model, Path("."))) for i, s in enumerate(cfg.plan) if s.action == "train"]
    budgets = [(i, step_budget(job.train, lambda: steps_per_epoch(job.data))) for i, job in jobs]
    start = sum(steps for i, steps in budgets if i < position)
    ramp = max(0, cfg.plan[position].warmup_steps) if start > 0 else 0
    return ScheduleSlot(start, sum(steps for _, steps in budgets), ramp)


def initial_model_config(cfg: JobConfig, stage: StageConfig) -> ModelConfig:
    """The model of a plan's first train stage, its catalogue read from the stage's dataset."""
    model_cfg = cfg.model
    if model_cfg.num_items == 0:
        from stackrec_dist.train.data_info import dataset_num_items

        data = dataclasses.replace(cfg.data, path=stage.data_path or cfg.data.path)
        model_cfg = dataclasses.replace(model_cfg, num_items=dataset_num_items(data))
    return model_cfg


def _steps_per_epoch_fn(options) -> Callable[[Any], int]:
    """Epoch length of a stage's data, as ``TrainLoop`` counts it (the manifest; no shard is read)."""
    if options is not None and options.data_source == "synthetic":
        return lambda data: options.synthetic_steps_per_epoch
    from stackrec_dist.train.data_info import steps_per_epoch

    return lambda data: steps_per_epoch(data, data.train_split)


@dataclass
class SegmentStart:
    """Where a segment begins: the weights and model config the previous stage left (None at the
    plan's start), and the plan positions still to run."""

    positions: list[int]
    model_cfg: ModelConfig
    weights: dict[str, torch.Tensor] | None = None
    parent: str = ""  # the recorded output the weights come from
    step_offset: int = 0  # optimizer steps of the train stages before it
    last_step_end_t: float = 0.0  # wall-clock of the last optimizer step before it (growth pauses)


@dataclass
class StageResult:
    final_state: dict[str, torch.Tensor]  # full weights on every rank
    best_state: dict[str, torch.Tensor] | None  # rank 0 only
    summary: dict[str, Any]


# -- what runs inside one worker group -------------------------------------------------------------


def train_stage(job: JobConfig, world, init_state, stage: str, run_id: str, sink, options=None, progress=None,
                tracker=None, step_offset: int = 0, schedule_slot: ScheduleSlot | None = None) -> StageResult:
    """Train one stage with the one training loop."""
    from stackrec_dist.train.loop import TrainLoop

    loop = TrainLoop(job, world, init_state, options, sink=sink, stage=stage, run_id=run_id, progress=progress,
                     tracker=tracker, step_offset=step_offset, schedule_slot=schedule_slot)
    try:
        summary = loop.fit()
        final = loop.full_model_state()
        best = loop.best_state
    finally:
        loop.close()
    return StageResult(final, best, summary)


# record(record, weights, model_cfg, info, best, wait) -> None; rank 0 only
RecordFn = Callable[[StageRecord, dict[str, torch.Tensor], ModelConfig, dict[str, Any], Any, bool], None]


def run_segment(cfg: JobConfig, start: SegmentStart, world, run_dir: Path, run_id: str, record: RecordFn,
                sink_for: Callable[[JobConfig, str], Any], stage_trainer: Callable[..., StageResult] = train_stage,
                options=None, progress=None, tracker=None) -> None:
    """Run the segment's stages in this worker group, growing in place between them."""
    weights, model_cfg, parent = start.weights, start.model_cfg, start.parent
    step_offset, last_step_end_t = start.step_offset, start.last_step_end_t
    seed = cfg.train.seed
    mark = time.time()  # the wall-clock of each stage includes the pause before it
    for position in start.positions:
        stage = cfg.plan[position]
        stage_dir = run_dir / stage.name
        info = {"plan_position": position, "seed": seed, "parent": parent}
        if stage.action == "train":
            job = stage_job_config(cfg, stage, model_cfg, stage_dir)
            slot = plan_schedule_slot(cfg, position, _steps_per_epoch_fn(options))
            result = stage_trainer(job, world, weights, stage.name, run_id, sink_for(job, stage.name),
                                   options=options, progress=progress, tracker=tracker, step_offset=step_offset,
                                   schedule_slot=slot)
            maybe_crash("after_train", stage.name)
            weights = result.final_state
            metrics = {**result.summary, "data_path": job.data.path, "num_items": model_cfg.num_items,
                       "device": world.choice.kind, "precision": "bf16" if world.choice.use_gpu else "fp32",
                       "world_size": world.world_size}
            first = result.summary.get("first_step_start_t", 0.0)
            if tracker is not None and last_step_end_t and first:
                tracker.log_scalars(step_offset + 1, {"growth/pause_s": first - last_step_end_t})
            step_offset += int(result.summary.get("steps", 0))
            last_step_end_t = result.summary.get("last_step_end_t", 0.0) or last_step_end_t
            output, best, wait = stage_dir / "final", result.best_state, True
        elif stage.action == "grow":
            maybe_crash("snapshot", stage.name)
            if weights is None:
                raise ValueError(f"plan stage {stage.name!r}: grow needs a trained model before it")
            maybe_crash("stacking", stage.name)
            grow_t0 = time.perf_counter()
            weights, model_cfg = grow_state(weights, model_cfg, cfg.growth, seed)
            metrics = {"grow_s": time.perf_counter() - grow_t0, "num_items": model_cfg.num_items}
            output, best, wait = stage_dir / "grown", None, False
            info["parent_blocks"] = model_cfg.num_blocks // 2
        elif stage.action == "new_head":
            from stackrec_dist.train.data_info import dataset_num_items

            if weights is None:
                raise ValueError(f"plan stage {stage.name!r}: new_head needs a trained model before it")
            target = dataclasses.replace(cfg.data, path=stage.data_path or cfg.data.path)
            weights, model_cfg = new_head_state(weights, model_cfg, dataset_num_items(target), seed)
            metrics = {"num_items": model_cfg.num_items}
            output, best, wait = stage_dir / "new_head", None, False
        else:  # pragma: no cover - the config refuses other actions
            raise ValueError(f"unknown plan action {stage.action!r}")
        now = time.time()
        if world.is_main:
            rec = StageRecord(stage.name, stage.action, str(output), model_cfg.num_blocks, now - mark, metrics)
            record(rec, weights, model_cfg, info, best, wait)
        maybe_wipe_scratch(stage.name)
        mark, parent = now, str(output)



def resume_point(cfg: JobConfig, ledger: PlanLedger, segment: list[int]) -> SegmentStart | None:
    """Where a segment (re)starts from what the ledger has recorded: its first stage not done,
    with the weights of the stage before it; None when the whole segment is done. The driver asks
    before starting a worker group, and a worker group that Ray restarted asks again."""
    done = ledger.done()
    todo = [p for p in segment if cfg.plan[p].name not in done]
    if not todo:
        return None
    if todo[0] == 0:
        return SegmentStart(todo, initial_model_config(cfg, cfg.plan[0]))
    from stackrec_dist.train.checkpoint import open_checkpoint

    previous = done[cfg.plan[todo[0] - 1].name]
    checkpoint = open_checkpoint(previous.output)
    trained = [r for r in ledger.state.done if r.action == "train"]
    return SegmentStart(todo, checkpoint.model_config, checkpoint.model_state(), previous.output,
                        step_offset=sum(int(r.metrics.get("steps", 0)) for r in trained),
                        last_step_end_t=float(trained[-1].metrics.get("last_step_end_t", 0.0)) if trained else 0.0)
