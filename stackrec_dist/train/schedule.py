"""Learning-rate schedule: linear warm-up, then cosine or linear decay to a floor.

A growth plan either restarts the schedule in every train stage (``optim.schedule=stage``) or runs
one schedule over the whole plan (``optim.schedule=plan``): then each train stage is handed its
``ScheduleSlot``, the steps of the plan-wide curve that fall in its budget, so a grown model
continues at the rate the curve has reached instead of jumping back to the peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from stackrec_dist.config import OptimConfig, TrainConfig


@dataclass(frozen=True)
class ScheduleSlot:
    """One train stage's part of a plan-wide schedule."""

    start: int  # plan-wide step of the stage's first step: the budgets of the train stages before it
    total: int  # the plan-wide curve's length: the sum of every train stage's budget
    ramp: int = 0  # the stage's own linear ramp (grown stages: their AdamW moments start fresh)


def step_budget(train: TrainConfig, steps_per_epoch: Callable[[], int]) -> int:
    """Optimizer steps a train stage may take: its step cap, else its epochs of ``steps_per_epoch()``
    (called only then: it may read the dataset's manifest)."""
    return train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch()))


def _curve(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if cfg.decay == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1.0 - progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    return factor


def lr_lambda(cfg: OptimConfig, total_steps: int, slot: ScheduleSlot | None = None) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at the stage's optimizer step ``step`` (for ``LambdaLR``): the
    stage's own curve over ``total_steps``, or with ``slot`` the plan-wide curve from ``slot.start``."""
    if slot is None:
        return _curve(cfg, total_steps)
    plan_curve = _curve(cfg, slot.total)

    def factor(step: int) -> float:
        ramp = (step + 1) / slot.ramp if step < slot.ramp else 1.0
        return plan_curve(slot.start + step) * ramp

    return factor
