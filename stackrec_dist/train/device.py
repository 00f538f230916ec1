"""Where a run computes, from the one field ``train.device``: ``auto | cpu | cuda | cuda:N``.

``auto`` takes a GPU where there is one: in a single process, when this machine has CUDA; in a
Ray run, when the cluster offers ``GPU`` resources (the driver may sit on a CPU-only head node,
so the driver's own CUDA says nothing about the workers). A GPU run is one GPU per worker, nccl,
bf16 autocast with fp32 master weights and the Triton kernels (``model.impl=auto``); a CPU run is
gloo and fp32. The driver resolves ``auto`` once and hands workers the concrete choice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stackrec_dist.errors import DeviceError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class DeviceChoice:
    kind: str  # "cpu" or "cuda"
    index: int | None = None  # cuda:N in a single process; workers use their local rank

    @property
    def use_gpu(self) -> bool:
        return self.kind == "cuda"

    @property
    def backend(self) -> str:
        """Collective backend: nccl across GPUs, gloo on CPU (no oneCCL on these machines)."""
        return "nccl" if self.use_gpu else "gloo"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.use_gpu else None

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    def torch_device(self, local_rank: int = 0) -> torch.device:
        if not self.use_gpu:
            return torch.device("cpu")
        return torch.device("cuda", self.index if self.index is not None else local_rank)

    def describe(self) -> str:
        """One line for the console: device, compute dtype, kernel implementation."""
        from stackrec_dist.kernels import triton_available

        dtype = "bf16 autocast, fp32 master weights" if self.use_gpu else "fp32"
        kernels = "Triton fused blocks" if self.use_gpu and triton_available() else "PyTorch reference blocks"
        return f"device {self.name}, {dtype}, {kernels}"


def parse_device(name: str) -> tuple[str, int | None]:
    match = _DEVICE_RE.match(name.strip())
    if match is None:
        raise DeviceError(f"train.device must be auto, cpu, cuda or cuda:N (got {name!r})")
    return match.group(1), int(match.group(2)) if match.group(2) is not None else None


def resolve_device(name: str, cuda_count: Callable[[], int] | None = None) -> DeviceChoice:
    """The device of this process. ``cuda_count`` (default: torch's) is injectable for tests."""
    kind, index = parse_device(name)
    count = (cuda_count or _torch_cuda_count)()
    if kind == "auto":
        return DeviceChoice("cuda", index) if count > 0 else DeviceChoice("cpu")
    if kind == "cuda":
        if count == 0:
            raise DeviceError(f"train.device={name} but this machine has no CUDA device; use auto or cpu")
        if index is not None and index >= count:
            raise DeviceError(f"train.device={name} but this machine has {count} CUDA device(s)")
    return DeviceChoice(kind, index)


def resolve_cluster_device(name: str, cluster_gpus: float) -> DeviceChoice:
    """The device of every Ray worker, decided by the driver from the cluster's GPU resources."""
    kind, _ = parse_device(name)
    if kind == "auto":
        return DeviceChoice("cuda") if cluster_gpus > 0 else DeviceChoice("cpu")
    if kind == "cuda" and cluster_gpus <= 0:
        raise DeviceError(f"train.device={name} but the Ray cluster offers no GPU resources")
    return DeviceChoice(kind)  # a worker uses the GPU Ray assigned to it, whatever the index


def _torch_cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
