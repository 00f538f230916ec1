"""Compiled Triton kernels vs the PyTorch reference on a CUDA device (``-m gpu``; skipped without one).

The CPU suite (``test_block_parity.py``) runs the same kernels in Triton's interpreter, which
cannot show what only the compiled code does: native bf16 ``tl.dot``, real tile scheduling, the
row-split weight-gradient reduction over many programs, and C up to 512. Here: the interpreter
cases plus C in {64, 256, 512} x L in {50, 200}, fp32 and bf16, forward and all 10 gradients.
Run by ``scripts/gpu_check.sh`` (step "parity"); the helpers are the CPU suite's.

Truth: ``reference.py`` in float64 on the GPU, on the very values the tested dtype holds (bf16
inputs are upcast, not re-drawn). "eager": ``reference.py`` in the tested dtype on the GPU (cuDNN
conv; TF32 switched off, so fp32 eager is true fp32).

Tolerances, why:
- fp32, every output and gradient: ``max|g - g64| / max|g64|`` (``_scaled_err``) <= 2x eager's +
  1e-4. The kernels accumulate in fp32 with ``input_precision="ieee"``; only the summation order
  differs from cuDNN (tiles, per-program partial sums), so the error tracks eager's and the rule
  scales with the shape. 1e-4 is the interpreter suite's gradient tolerance (observed ~2e-5);
  a wrong tap, mask or LN term gives >= 1e-2. This is the check of the kernels' logic: bf16 runs
  the same code with other operand types.
- bf16: per-element comparisons are dominated by ReLU flips, not by the kernels: an element whose
  pre-ReLU value is within bf16 rounding (2**-8) of 0 switches its gradient on or off, so one flip
  moves a bias / LN gradient by a whole term. Measured in the interpreter against float64 (B*L = 14
  .. 1600, C = 16 .. 64, 4 seeds): max-abs errors up to 0.8 (fused) and 0.85 (eager bf16) at the
  tiny shapes, 0.1 for both at B*L = 1600. So bf16 uses the normwise error ``|g - g64|_2 /
  |g64|_2`` (``_norm_err``), observed <= 7e-3 forward and <= 0.1 on gradients (fused and eager
  alike), and checks (a) every output <= 2e-2 forward / 0.2 per gradient: a bf16-path bug (a
  missing cast, a wrong operand layout in the native bf16 ``tl.dot``) gives errors of order 1;
  (b) at the GRID shapes (B*L = 1600, where flips average out: fused mean 3.7e-2 vs eager 3.3e-2
  over the 10 gradients), the fused mean <= 2x eager's mean + 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from stackrec_dist.kernels import residual_block, resolve_impl
from stackrec_dist.kernels.reference import residual_block_reference
from tests.kernels.test_block_parity import (CASES, GRAD_NAMES, HAS_TRITON, _padding_invariance, _scaled_err,
                                             make_case, run_with_grads)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs a CUDA device and triton"),
]

# (B, L, C, dilation): every C of the issue with both L; B*L = 1600 rows (25 row tiles of 64);
# dilations up to 8, so that conv(2d) reaches (K-1)*2d = 32 positions back, across many left pads.
GRID = [(32, 50, 64, 1), (8, 200, 64, 8), (32, 50, 256, 2), (8, 200, 256, 4), (32, 50, 512, 4), (8, 200, 512, 2)]
SHAPES = (list(CASES) + [(b, seq, c, d, [(7 * i) % (seq // 2) for i in range(b)], True, True) for b, seq, c, d in GRID])
BF16_FWD_CAP, BF16_GRAD_CAP = 2e-2, 0.2  # normwise, see the module docstring


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    # cuDNN convs default to TF32 on Ampere+: fp32 eager would then be a 10-bit-mantissa bar.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _on_cuda(case, dtype=None):
    x, mask, params, alpha = case
    to = lambda t: None if t is None else t.detach().to("cuda", dtype or t.dtype).requires_grad_()  # noqa: E731
    return to(x), (None if mask is None else mask.cuda()), [to(p) for p in params], to(alpha)


def _norm_err(a, truth):
    return ((a.double() - truth).norm() / truth.norm().clamp_min(1e-12)).item()


def _check_fp32(label, got, eager, truth):
    err, err_eager = _scaled_err(got, truth), _scaled_err(eager, truth)
    assert err <= 2 * err_eager + 1e-4, f"{label}: fused error {err:.2e} > 2 x eager {err_eager:.2e} + 1e-4"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,seq,c,d,pads,with_mask,with_alpha", SHAPES,
                         ids=[f"B{s[0]}-L{s[1]}-C{s[2]}-d{s[3]}" + ("" if s[5] else "-nomask")
                              + ("" if s[6] else "-noalpha") for s in SHAPES])
def test_compiled_triton_matches_reference(dtype, b, seq, c, d, pads, with_mask, with_alpha):
    from stackrec_dist.kernels.triton_block import residual_block_triton

    case = _on_cuda(make_case(b, seq, c, pads, dtype=dtype, with_mask=with_mask, with_alpha=with_alpha))
    y, grads = run_with_grads(residual_block_triton, *case, d)
    y_eager, grads_eager = run_with_grads(residual_block_reference, *case, d)
    y64, grads64 = run_with_grads(residual_block_reference, *_on_cuda(case, torch.float64), d)
    assert y.dtype == dtype and y.is_cuda and torch.isfinite(y).all()
    assert all(g.dtype == dtype for g in grads)
    if dtype == torch.float32:
        _check_fp32("forward", y, y_eager, y64)
        for name, g, g_eager, g64 in zip(GRAD_NAMES, grads, grads_eager, grads64):
            _check_fp32(f"grad {name}", g, g_eager, g64)
        return
    errs = {name: (_norm_err(g, g64), _norm_err(g_eager, g64))
            for name, g, g_eager, g64 in zip(GRAD_NAMES, grads, grads_eager, grads64)}
    table = ", ".join(f"{n} {f:.1e}/{e:.1e}" for n, (f, e) in errs.items())
    assert _norm_err(y, y64) <= BF16_FWD_CAP, f"forward: fused {_norm_err(y, y64):.2e} > {BF16_FWD_CAP}"
    assert all(f <= BF16_GRAD_CAP for f, _ in errs.values()), f"a gradient over {BF16_GRAD_CAP} (fused/eager): {table}"
    if b * seq >= 1600:
        mean_f, mean_e = (sum(v[i] for v in errs.values()) / len(errs) for i in (0, 1))
        assert mean_f <= 2 * mean_e + 1e-2, f"mean fused {mean_f:.2e} > 2 x eager {mean_e:.2e} + 1e-2: {table}"


def test_padding_invariance_compiled():
    from stackrec_dist.kernels.triton_block import residual_block_triton

    def on_gpu(x, mask, *rest):  # the CPU helper builds CPU tensors: run them through the GPU kernels
        x, mask, params, alpha = _on_cuda((x, mask, list(rest[:8]), rest[8]))
        return residual_block_triton(x, mask, *params, alpha, rest[9]).detach().cpu()

    _padding_invariance(on_gpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_auto_dispatch_picks_compiled_triton(dtype):
    assert resolve_impl("auto", "cuda", dtype) == "triton"
    x, mask, params, alpha = _on_cuda(make_case(4, 50, 64, [0, 3, 10, 40], dtype=dtype))
    y = residual_block(x, mask, *params, alpha, 2, impl="auto")
    y_ref = residual_block_reference(x, mask, *params, alpha, 2)
    assert (_scaled_err(y, y_ref) <= 1e-4) if dtype == torch.float32 else (_norm_err(y, y_ref) <= BF16_FWD_CAP)
