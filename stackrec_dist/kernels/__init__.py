"""Residual-block implementations behind one switch: ``residual_block(..., impl=...)``.

``impl``:
- ``"auto"``: the fused Triton kernels for CUDA fp32/bf16 tensors when Triton imports; otherwise
  the PyTorch path (on CPU: ``CPU_IMPL``, the fastest CPU variant measured, see docs/kernels.md).
- ``"torch"``: the PyTorch path (``reference.py`` on CUDA, ``CPU_IMPL`` on CPU).
- ``"triton"``: the fused kernels; on CPU tensors only under ``TRITON_INTERPRET=1`` (slow, for tests).
- ``"reference"``, ``"shifted"``, ``"gemm"``: one named PyTorch variant, for tests and benchmarks.
- ``"compiled"``: ``torch.compile`` of the reference (opt-in, never picked by auto: 1.2-1.5x less
  CPU time once compiled, but 11-27 s of cold compile per shape and per dilation).

Nothing here imports Triton or touches CUDA at import time; Triton availability is probed once,
on first need, and cached.
"""

from __future__ import annotations

import functools

import torch

from stackrec_dist.kernels.cpu_block import residual_block_gemm, residual_block_shifted
from stackrec_dist.kernels.reference import residual_block_reference

__all__ = ["residual_block", "resolve_impl", "triton_available", "CPU_IMPL", "IMPLS"]

# Decided by `python benchmarks/kernels.py --cpu` (figures in docs/benchmarks.md, reasoning in
# docs/kernels.md): the shifted-matmul and one-GEMM variants do not beat F.conv1d consistently, and
# torch.compile's 1.2-1.5x costs 11-27 s of cold compile per (shape, dilation): the reference stays.
CPU_IMPL = "reference"

_TORCH_VARIANTS = {
    "reference": residual_block_reference,
    "shifted": residual_block_shifted,
    "gemm": residual_block_gemm,
}
IMPLS = ("auto", "torch", "triton", "compiled", *_TORCH_VARIANTS)
_TRITON_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _compiled_reference():
    # Built on first use only: torch.compile at import would be a side effect (and slow).
    return torch.compile(residual_block_reference, dynamic=False)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works here (probed once; no CUDA call)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (missing libs) is as good as none
        return False
    return True


def resolve_impl(impl: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """Name of the implementation ``residual_block`` will run: ``"triton"``, ``"torch"`` (the
    reference) or a CPU variant name. Raises with a usable message when ``impl`` cannot run."""
    device = torch.device(device)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in _TORCH_VARIANTS:
        return "torch" if impl == "reference" else impl
    if impl == "compiled":
        return impl
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package (pip install 'stackrec-dist[triton]')")
        if device.type != "cuda":
            from stackrec_dist.kernels.triton_block import interpret_mode

            if not interpret_mode():
                raise RuntimeError(
                    f"impl='triton' on a {device.type} tensor runs only in Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before the first Triton call (tests), or use impl='auto'/'torch'")
        return "triton"
    if device.type == "cuda":
        if impl == "auto" and triton_available() and (dtype is None or dtype in _TRITON_DTYPES):
            return "triton"
        return "torch"
    return "torch" if CPU_IMPL == "reference" else CPU_IMPL


def residual_block(x, mask, conv1_weight, conv1_bias, ln1_weight, ln1_bias, conv2_weight, conv2_bias,
                   ln2_weight, ln2_bias, alpha, dilation, eps=1e-5, impl="auto"):
    """NextItNet residual block ``x + alpha * F(x)``, semantics of ``reference.residual_block_reference``.

    x: (B, L, C); mask: (B, L) (1 real, 0 pad) or None; conv weights (C, C, K) as ``nn.Conv1d``;
    biases and LN params (C,); alpha: 0-dim tensor or None -> (B, L, C).
    """
    name = resolve_impl(impl, x.device, x.dtype)
    args = (x, mask, conv1_weight, conv1_bias, ln1_weight, ln1_bias, conv2_weight, conv2_bias,
            ln2_weight, ln2_bias, alpha, dilation, eps)
    if name == "triton":
        from stackrec_dist.kernels.triton_block import residual_block_triton

        return residual_block_triton(*args)
    if name == "compiled":
        return _compiled_reference()(*args)
    return _TORCH_VARIANTS["reference" if name == "torch" else name](*args)
