"""What performs the optimizer step behind the one training loop (``train/loop.py``).

* :class:`TorchEngine`: a plain PyTorch optimizer in one process (CPU or one GPU): the
  single-process run is the world-size-1 case of the loop, with no DeepSpeed in the way.
* :class:`DeepSpeedEngine`: a DeepSpeed engine at ZeRO 0-3 on any world size (Ray workers, or a
  1-process group for benchmarks).

Both take the same calls from the loop: ``engine(inputs, targets) -> loss`` for one micro-batch,
``backward(loss)``, ``step()`` (the optimizer and LR schedule advance at the accumulation
boundary), ``full_model_state()`` (CPU copy of the whole model; a collective under ZeRO-3),
``save(dir)`` / ``load(dir, meta)`` of their own named checkpoint parts. Loss scaling follows
DeepSpeed's convention (``backward`` divides by the accumulation steps, gradients are averaged over
ranks) so that the loop's re-weighting gives the global token-mean gradient on either engine.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from stackrec_dist.config import JobConfig
from stackrec_dist.errors import CheckpointError, safe_torch_load
from stackrec_dist.train import distributed as D
from stackrec_dist.train.device import DeviceChoice

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class TorchEngine:
    """One process, plain ``torch.optim`` optimizer + ``LambdaLR``; bf16 autocast on CUDA."""

    kind = "torch"
    zero_stage = 0

    def __init__(self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, job: JobConfig,
                 choice: DeviceChoice):
        # Accumulation exists to fit a global batch over workers' memory; one process takes it whole.
        self.accum = 1
        self.module, self.optimizer, self.scheduler = objective, optimizer, scheduler
        self.model = objective.model
        self.grad_clip = float(job.optim.grad_clip)
        self.amp_dtype = choice.amp_dtype
        self.device_type = choice.kind

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            return self.module(inputs, targets)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def full_model_state(self) -> dict[str, torch.Tensor]:
        return _cpu_copy(self.model.state_dict())

    def eval_model(self) -> torch.nn.Module:
        return self.model

    def save(self, directory: Path, rank: int) -> dict[str, Any]:
        torch.save(self.model.state_dict(), directory / MODEL_FILE)
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        torch.save(self.scheduler.state_dict(), directory / SCHEDULER_FILE)
        return {"kind": self.kind, "zero_stage": 0, "world_size": 1}

    def load(self, directory: Path, meta: dict[str, Any]) -> None:
        if meta.get("kind") != self.kind:
            raise CheckpointError(
                f"{directory} holds a {meta.get('kind')} engine state; a single-process run resumes only "
                f"its own checkpoints (start a new run from it with `stackrec train --init {directory}`)")
        self.model.load_state_dict(safe_torch_load(directory / MODEL_FILE))
        self.optimizer.load_state_dict(safe_torch_load(directory / OPTIMIZER_FILE))
        self.scheduler.load_state_dict(safe_torch_load(directory / SCHEDULER_FILE))


class DeepSpeedEngine:
    """A DeepSpeed engine (ZeRO 0-3) on the process group of :func:`distributed.init_worker`."""

    kind = "deepspeed"

    def __init__(self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, job: JobConfig,
                 ctx: D.DistContext):
        from stackrec_dist.train.deepspeed_config import build_deepspeed_config, client_clip_norm

        dist_cfg, choice = job.distributed, ctx.choice
        self.zero_stage = dist_cfg.zero_stage
        self.accum = dist_cfg.gradient_accumulation_steps
        self.use_gpu = choice.use_gpu
        self.world_size = ctx.world_size
        if self.zero_stage == 3:
            # The loss reads head.weight/bias directly (not via head.forward).
            model = objective.model
            D.register_external_parameters(objective, [model.head.weight, model.head.bias], self.use_gpu)
        ds_config = build_deepspeed_config(dist_cfg, job.optim, job.data, self.use_gpu, ctx.world_size)
        self.client_clip = client_clip_norm(dist_cfg, job.optim, self.use_gpu)
        self.engine, self.scheduler = D.deepspeed_initialize(objective, optimizer, scheduler, ds_config, self.use_gpu)
        self.module = self.engine.module
        self.model = self.engine.module.model
        self.model_cfg = self.model.cfg
        self.device = ctx.device

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.engine(inputs, targets)

    def train(self) -> None:
        self.engine.train()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if self.client_clip > 0 and self.engine.is_gradient_accumulation_boundary():
            torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), self.client_clip)

    def step(self) -> None:
        self.engine.step()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """CPU copy of the full model weights on every rank (a collective under ZeRO-3)."""
        params = list(self.model.parameters())
        with D.gathered_parameters(params, self.zero_stage == 3, self.use_gpu):
            return _cpu_copy(self.model.state_dict())

    def eval_model(self) -> torch.nn.Module:
        if self.zero_stage != 3:
            return self.model
        # Partitioned weights: evaluate a local full copy, so that ranks with different numbers
        # of rows never wait on each other's parameter all-gathers.
        from stackrec_dist.models import build_model

        local = build_model(self.model_cfg).to(self.device)
        local.load_state_dict(self.full_model_state())
        return local

    def save(self, directory: Path, rank: int) -> dict[str, Any]:
        tag = "engine"
        self.engine.save_checkpoint(str(directory), tag=tag)
        return {"kind": self.kind, "zero_stage": self.zero_stage, "world_size": self.world_size, "tag": tag}

    def load(self, directory: Path, meta: dict[str, Any]) -> None:
        if meta.get("kind") != self.kind:
            raise CheckpointError(f"{directory} holds a {meta.get('kind')} engine state, not a DeepSpeed one")
        if meta.get("world_size") != self.world_size or meta.get("zero_stage") != self.zero_stage:
            raise CheckpointError(
                f"{directory} was written by {meta.get('world_size')} workers at ZeRO-{meta.get('zero_stage')}; "
                f"this run has {self.world_size} at ZeRO-{self.zero_stage}: start a new run from its weights "
                f"(`stackrec train --init {directory}`) instead of resuming it")
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=meta["tag"])
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint {meta['tag']} in {directory}")


def build_engine(objective: torch.nn.Module, optimizer, scheduler, job: JobConfig, ctx: D.DistContext | None,
                 choice: DeviceChoice):
    """DeepSpeed when the run has Ray workers (or a process group), else the plain engine."""
    if ctx is None:
        return TorchEngine(objective, optimizer, scheduler, job, choice)
    return DeepSpeedEngine(objective, optimizer, scheduler, job, ctx)
