"""Growth coordinator: runs a plan of stages (train, grow, new_head) crash-safely, growing in place.

The plan is cut into segments (``growth/segment.py``); each segment runs in one worker group, in
this process for a single-process plan or on Ray workers (``train/ray_job.py``), which grow in
place between the segment's stages. Between segments the worker group is restarted inside the same
Ray session.

Crash safety: every finished stage is recorded by the :class:`~stackrec_dist.growth.ledger.PlanLedger`
(weights written atomically, manifest last, then the plan state). A train stage is recorded
before the group moves on, so its final weights survive the stage's own Ray checkpoints being
rotated away; a grow is recorded asynchronously (it is redone identically if lost). Rerunning the
same command after a crash anywhere resumes at the first stage not recorded: a train stage from
its own last checkpoint, a grow from its parent's recorded weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from stackrec_dist.config import JobConfig
from stackrec_dist.growth.ledger import PlanLedger, PlanState
from stackrec_dist.growth.segment import (
    SegmentStart,
    StageResult,
    plan_segments,
    resume_point,
    run_segment,
    stage_workers,
    train_stage,
)


class Coordinator:
    """Runs ``cfg.plan`` into ``run_dir``: segment by segment, in this process or on Ray."""

    def __init__(self, cfg: JobConfig, run_dir: str | Path, stage_trainer: Callable[..., StageResult] | None = None,
                 options=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir).resolve()
        self.stage_trainer = stage_trainer or train_stage
        self.options = options  # LoopOptions: run-time switches of every stage's loop (tests, benchmarks)

    def run(self) -> PlanState:
        cfg = self.cfg
        ledger = PlanLedger(self.run_dir, [s.name for s in cfg.plan])
        for segment in plan_segments(cfg):
            if all(cfg.plan[p].name in ledger.done() for p in segment):
                continue
            workers, _ = stage_workers(cfg, cfg.plan[segment[0]])
            before = len(ledger.state.done)
            t0 = time.time()
            if workers == 0:
                self._run_local(resume_point(cfg, ledger, segment), ledger)
            else:
                from stackrec_dist.train.ray_job import run_segment_on_ray

                run_segment_on_ray(cfg, segment, self.run_dir, ledger, self.options)
                ledger.reload()
            self._account_startup(ledger, before, time.time() - t0)
        return ledger.state

    def _run_local(self, start: SegmentStart, ledger: PlanLedger) -> None:
        from stackrec_dist.train.device import resolve_device
        from stackrec_dist.train.loop import LocalSink, World, open_tracker

        choice = resolve_device(self.cfg.train.device)
        print(f"stackrec: {self.cfg.name}: {choice.describe()}", flush=True)
        world = World(choice)

        def record(rec, weights, model_cfg, info, best, wait):
            ledger.record(rec, weights, model_cfg, info, best)

        with open_tracker(self.cfg, world.rank) as tracker:
            run_segment(self.cfg, start, world, self.run_dir, ledger.run_id, record,
                        lambda job, stage: LocalSink(job.train.checkpoint_dir, resume=True), self.stage_trainer,
                        options=self.options, tracker=tracker)

    @staticmethod
    def _account_startup(ledger: PlanLedger, before: int, segment_s: float) -> None:
        """Charge what the segment cost beyond its stages (worker group and engine start-up) to its
        first stage, so that the plan's wall-clock adds up."""
        new = ledger.state.done[before:]
        if not new:
            return
        startup = max(0.0, segment_s - sum(r.elapsed_s for r in new))
        first = new[0]
        ledger.amend(first.name, elapsed_s=first.elapsed_s + startup,
                     metrics={**first.metrics, "startup_s": startup})
