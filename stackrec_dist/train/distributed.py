"""The one place that touches the distributed world: process group, DeepSpeed comm, device.

Inside a Ray Train worker, Ray has already created the torch process group (``TorchConfig``
backend: gloo on CPU, nccl on GPU) and set RANK / LOCAL_RANK / WORLD_SIZE. DeepSpeed's
``init_distributed`` then finds ``torch.distributed`` initialised and wraps that same group
(``TorchBackend``), so there is exactly one process group and Ray owns its lifetime. Outside Ray
(a plain script, a benchmark, ``torchrun``) :func:`init_worker` creates the group itself from the
usual env vars, or a 1-process group on a free loopback port when none are set.

``DS_ACCELERATOR`` must be set *before* ``deepspeed`` is first imported (DeepSpeed picks its
accelerator once, at import): :func:`set_accelerator_env` is called before the lazy import.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stackrec_dist.config import DistributedConfig
from stackrec_dist.train.device import DeviceChoice

log = logging.getLogger(__name__)


def set_accelerator_env(use_gpu: bool) -> None:
    """Tell DeepSpeed which accelerator to use; must run before ``import deepspeed``."""
    if use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    else:
        os.environ["DS_ACCELERATOR"] = "cpu"


def worker_env(dist_cfg: DistributedConfig, use_gpu: bool) -> dict[str, str]:
    """Environment of every Ray worker process (set via RunConfig.worker_runtime_env)."""
    env = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}
    if not use_gpu:
        # One intra-op thread pool per worker sized to its CPU share, or workers oversubscribe.
        env["OMP_NUM_THREADS"] = str(max(1, int(dist_cfg.cpus_per_worker)))
    return env


def import_deepspeed(use_gpu: bool):
    """``import deepspeed`` with the accelerator chosen first (never at module import time)."""
    set_accelerator_env(use_gpu)
    import deepspeed

    return deepspeed


# DeepSpeed 0.19.8 fails on 0-dim parameters (our per-block ``alpha``): at initialisation it
# broadcasts ``p.data.view(torch.uint8)``, which raises "self.dim() cannot be 0 to view Float as
# Byte" (engine ``_broadcast_model`` at every ZeRO stage; ``Init._zero_init_param`` at ZeRO-3).


def _patch_engine_broadcast(deepspeed) -> None:
    """Stages 0-2: around ``_broadcast_model`` only, give each 0-dim parameter a 1-element view
    of its own storage (the broadcast writes into the real parameter), then put the 0-dim tensor
    back. Shapes seen by the optimizer, state dicts and checkpoints never change."""
    engine_cls = deepspeed.runtime.engine.DeepSpeedEngine
    original = engine_cls._broadcast_model
    if getattr(original, "_stackrec_scalar_safe", False):
        return

    def _broadcast_model(self):
        scalars = [(p, p.data) for p in self.module.parameters() if p.data.dim() == 0]
        for p, data in scalars:
            p.data = data.reshape(1)
        try:
            original(self)
        finally:
            for p, data in scalars:
                p.data = data

    _broadcast_model._stackrec_scalar_safe = True
    engine_cls._broadcast_model = _broadcast_model


@contextlib.contextmanager
def _zero3_scalar_params(module: torch.nn.Module):
    """Stage 3: partition 0-dim parameters as 1-element vectors, then record their true shape
    in ``ds_shape`` (what every later gather uses), so gathered parameters, state dicts and the
    checkpoint's ``param_shapes`` all say ``()`` again."""
    scalars = [p for p in module.parameters() if p.dim() == 0]
    for p in scalars:
        p.data = p.data.reshape(1)
    try:
        yield
    finally:
        for p in scalars:
            if hasattr(p, "ds_shape"):
                p.ds_shape = torch.Size([])
            else:
                p.data = p.data.reshape(())


def deepspeed_initialize(model: torch.nn.Module, optimizer, lr_scheduler, config: dict[str, Any], use_gpu: bool):
    """``deepspeed.initialize`` on the already-initialised process group -> (engine, scheduler)."""
    deepspeed = import_deepspeed(use_gpu)
    _patch_engine_broadcast(deepspeed)
    stage3 = config.get("zero_optimization", {}).get("stage", 0) == 3
    with _zero3_scalar_params(model) if stage3 else contextlib.nullcontext():
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config,
            dist_init_required=False,
        )
    return engine, scheduler


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool  # True when this module created the group (then teardown destroys it)
    choice: DeviceChoice | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_worker(choice: DeviceChoice, timeout_s: float = 600.0) -> DistContext:
    """Join (or create) the process group, initialise DeepSpeed comm on it, pick the device."""
    use_gpu = choice.use_gpu
    backend = choice.backend
    deepspeed = import_deepspeed(use_gpu)
    owns_group = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # A lone process (benchmark, script): a 1-process group on loopback.
            os.environ.update({
                "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            })
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        owns_group = True
    # Finds torch.distributed initialised and wraps the existing group; no second group. On CPU it
    # also loads its shared-memory op and print()s so; that line goes to the debug log.
    with contextlib.redirect_stdout(io.StringIO()) as said:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if said.getvalue().strip():
        log.debug("deepspeed.init_distributed: %s", said.getvalue().strip())
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choice.torch_device(local_rank)
    if use_gpu:
        torch.cuda.set_device(device)
    return DistContext(rank, world, local_rank, device, backend, owns_group, choice)


def teardown(ctx: DistContext | None) -> None:
    """Destroy the group only if we created it (Ray tears down its own at the end of a run)."""
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks; returns a new tensor on the input's device.

    The reduction runs on ``device`` (cuda for nccl, cpu for gloo); float64 sums stay float64,
    so metric sums reduce exactly (integer counts) or up to summation order.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.clone()
    work = tensor.detach().to(device or tensor.device).clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def register_external_parameters(module: torch.nn.Module, params: list[torch.nn.Parameter], use_gpu: bool) -> None:
    """ZeRO-3: parameters read by ``module.forward`` outside their own submodule's forward
    (the loss reads ``head.weight``) must be registered so DeepSpeed gathers them there."""
    deepspeed = import_deepspeed(use_gpu)
    for p in params:
        deepspeed.zero.register_external_parameter(module, p)


def gathered_parameters(params, enabled: bool, use_gpu: bool):
    """Context manager giving full parameters on every rank under ZeRO-3 (no-op otherwise)."""
    if not enabled:
        return contextlib.nullcontext()
    deepspeed = import_deepspeed(use_gpu)
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
