"""Parity of every residual-block implementation with ``kernels/reference.py``.

The Triton kernels run in Triton's CPU interpreter, which needs ``TRITON_INTERPRET=1`` set
*before triton is first imported*: ``@triton.jit`` picks interpreter vs compiler when it decorates,
and Triton's own ``tl.zeros``/``tl.sum`` helpers are decorated at ``import triton``. In a full test
session something else (DeepSpeed, inductor) may already have imported triton, so the interpreter
tests run in a child pytest process started with the variable set (``test_triton_interpreter_suite``);
in this process they are skipped. ``TRITON_INTERPRET=1 pytest tests/kernels`` runs them in-process.

Tolerances (stated once, used below):
- fp32 Triton vs reference: forward atol=rtol=1e-5; gradients atol=rtol=1e-4 (sums over B*L rows
  reorder fp32 additions; observed max abs diff ~2e-5 on dalpha).
- bf16 Triton: its error against the fp32 truth must stay within 2x the error of the eager bf16
  reference against the same truth, plus 1e-2 of the tensor's scale.
- CPU variants vs reference, fp32: atol=rtol=1e-5 forward, 1e-4 gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stackrec_dist.kernels as kernels
from stackrec_dist.kernels import residual_block, resolve_impl
from stackrec_dist.kernels.cpu_block import residual_block_gemm, residual_block_shifted
from stackrec_dist.kernels.reference import residual_block_reference

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # fixed at process start, see docstring
HAS_TRITON = kernels.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def interpret():
    if not IN_INTERPRETER:
        pytest.skip("runs in the TRITON_INTERPRET=1 child process (test_triton_interpreter_suite)")


@pytest.mark.slow  # over 5 s on 2 cores
@needs_triton
@pytest.mark.skipif(IN_INTERPRETER, reason="already in the interpreter process")
def test_triton_interpreter_suite():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).relative_to(REPO)), "-q", "-p", "no:cacheprovider",
         "-k", "triton and not interpreter_suite"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    summary = tail.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


def make_case(b, seq, c, pads, dtype=torch.float32, with_mask=True, with_alpha=True, seed=0):
    """x (B, L, C) zero at pads (as the embedding makes it), mask (B, L), 8 params, alpha.

    pads[i] = number of left pad positions of sequence i.
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, seq)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    x = torch.randn(b, seq, c, generator=g) * mask[..., None]
    shapes = [(c, c, 3), (c,), (c,), (c,), (c, c, 3), (c,), (c,), (c,)]
    params = [torch.randn(*s, generator=g) for s in shapes]
    params[0] *= 0.3
    params[4] *= 0.3
    params[1] *= 0.1
    params[5] *= 0.1
    params[2] = 1 + 0.1 * params[2]  # LN gains near 1, biases small: a realistic, non-degenerate LN
    params[6] = 1 + 0.1 * params[6]
    params[3] *= 0.1
    params[7] *= 0.1
    params = [p.to(dtype).requires_grad_() for p in params]
    alpha = torch.tensor(0.7, dtype=dtype, requires_grad=True) if with_alpha else None
    return x.to(dtype).requires_grad_(), (mask if with_mask else None), params, alpha


def run_with_grads(fn, x, mask, params, alpha, dilation, seed=1):
    y = fn(x, mask, *params, alpha, dilation)
    # Drawn on the CPU (same values on every device), then moved to y: autograd wants them together.
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(device=y.device, dtype=y.dtype)
    inputs = [x, *params] + ([alpha] if alpha is not None else [])
    grads = torch.autograd.grad(y, inputs, gy)
    return y, grads


GRAD_NAMES = ["x", "conv1.w", "conv1.b", "ln1.w", "ln1.b", "conv2.w", "conv2.b", "ln2.w", "ln2.b", "alpha"]

# (B, L, C, dilation, left pads, mask?, alpha?): odd L, C not a power of two, taps that reach past
# the start (2d*2 = 16 > L = 7), more rows than one program tile (B*L = 78 > 64), no mask, no alpha.
CASES = [
    (2, 7, 24, 1, [0, 3], True, True),
    (3, 13, 40, 2, [0, 5, 12], True, True),
    (2, 13, 16, 4, [2, 0], True, False),
    (2, 7, 24, 4, [1, 0], True, True),
    (6, 13, 24, 1, [0, 1, 2, 3, 6, 9], True, True),
    (2, 9, 40, 3, [0, 0], False, True),
]


@needs_triton
@pytest.mark.parametrize("b,seq,c,d,pads,with_mask,with_alpha", CASES)
def test_triton_fp32_matches_reference(interpret, b, seq, c, d, pads, with_mask, with_alpha):
    from stackrec_dist.kernels.triton_block import residual_block_triton

    case = make_case(b, seq, c, pads, with_mask=with_mask, with_alpha=with_alpha)
    y, grads = run_with_grads(residual_block_triton, *case, d)
    y_ref, grads_ref = run_with_grads(residual_block_reference, *case, d)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def _scaled_err(a, b):
    return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)


@needs_triton
@pytest.mark.parametrize("b,seq,c,d,pads", [(2, 13, 40, 2, [0, 4]), (3, 7, 24, 1, [0, 2, 6])])
def test_triton_bf16_within_eager_bf16_error(interpret, b, seq, c, d, pads):
    from stackrec_dist.kernels.triton_block import residual_block_triton

    x, mask, params, alpha = make_case(b, seq, c, pads, dtype=torch.bfloat16)
    y, grads = run_with_grads(residual_block_triton, x, mask, params, alpha, d)
    y_bf, grads_bf = run_with_grads(residual_block_reference, x, mask, params, alpha, d)
    up = lambda t: t.detach().float().requires_grad_()  # noqa: E731 - fp32 truth on the same bf16 values
    y_32, grads_32 = run_with_grads(residual_block_reference, up(x), mask, [up(p) for p in params], up(alpha), d)
    assert y.dtype == torch.bfloat16
    assert _scaled_err(y, y_32) <= 2 * _scaled_err(y_bf, y_32) + 1e-2
    for name, g, g_bf, g_32 in zip(GRAD_NAMES, grads, grads_bf, grads_32):
        assert g.dtype == torch.bfloat16, name
        assert _scaled_err(g, g_32) <= 2 * _scaled_err(g_bf, g_32) + 1e-2, name


@pytest.mark.parametrize("variant", [residual_block_shifted, residual_block_gemm])
@pytest.mark.parametrize("b,seq,c,d,pads,with_mask,with_alpha", CASES)
def test_cpu_variants_match_reference(variant, b, seq, c, d, pads, with_mask, with_alpha):
    case = make_case(b, seq, c, pads, with_mask=with_mask, with_alpha=with_alpha)
    y, grads = run_with_grads(variant, *case, d)
    y_ref, grads_ref = run_with_grads(residual_block_reference, *case, d)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("fn", [residual_block_reference, residual_block_shifted], ids=["reference", "shifted"])
@pytest.mark.parametrize("d", [1, 2])
def test_gradcheck_float64(fn, d):
    x, mask, params, alpha = make_case(2, 6, 4, [0, 2], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, *rest: fn(x, mask, *rest[:8], rest[8], d), (x, *params, alpha), eps=1e-6, atol=1e-5)


def _padding_invariance(fn, extra=5, d=2):
    x, mask, params, alpha = make_case(1, 9, 24, [2])
    y = fn(x, mask, *params, alpha, d)
    xp = torch.cat([torch.zeros(1, extra, 24), x.detach()], dim=1)
    mp = torch.cat([torch.zeros(1, extra), mask], dim=1)
    yp = fn(xp, mp, *params, alpha, d)
    real = mask[0].bool()
    torch.testing.assert_close(yp[0, extra:][real], y[0][real], atol=1e-5, rtol=1e-5)
    assert torch.equal(yp[0, :extra], torch.zeros(extra, 24))  # pads stay zero (x + alpha*0)


@pytest.mark.parametrize("fn", [residual_block_reference, residual_block_shifted, residual_block_gemm],
                         ids=["reference", "shifted", "gemm"])
def test_padding_invariance_torch(fn):
    _padding_invariance(fn)


@needs_triton
def test_padding_invariance_triton(interpret):
    from stackrec_dist.kernels.triton_block import residual_block_triton

    _padding_invariance(residual_block_triton)


def test_resolve_impl_cpu():
    expected = "torch" if kernels.CPU_IMPL == "reference" else kernels.CPU_IMPL
    assert resolve_impl("auto", "cpu") == expected
    assert resolve_impl("torch", "cpu") == expected
    assert resolve_impl("reference", "cpu") == "torch"
    assert resolve_impl("shifted", "cpu") == "shifted"
    assert resolve_impl("compiled", "cpu") == "compiled"  # opt-in only; not run here (compile is slow)
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("cuda-graphs", "cpu")


def test_resolve_impl_cuda_without_touching_cuda(monkeypatch):
    # torch.device("cuda") is only a name: resolving never initialises CUDA.
    assert resolve_impl("torch", "cuda") == "torch"
    assert resolve_impl("auto", "cuda", torch.float64) == "torch"
    assert resolve_impl("auto", "cuda", torch.bfloat16) == ("triton" if HAS_TRITON else "torch")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert resolve_impl("auto", "cuda", torch.bfloat16) == "torch"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        resolve_impl("triton", "cuda")


@needs_triton
def test_resolve_impl_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", "cpu") == "triton"


@needs_triton
def test_dispatch_runs_triton_in_interpreter(interpret):
    x, mask, params, alpha = make_case(2, 7, 24, [0, 3])
    y = residual_block(x, mask, *params, alpha, 1, impl="triton")
    torch.testing.assert_close(y, residual_block_reference(x, mask, *params, alpha, 1), atol=1e-5, rtol=1e-5)
    # auto on CPU never picks Triton, even in interpreter mode.
    assert resolve_impl("auto", "cpu") != "triton"


def test_import_has_no_triton_or_cuda_side_effects():
    code = ("import sys, torch, stackrec_dist.kernels as k\n"
            "k.residual_block(*[torch.zeros(1, 3, 4)], None, *[torch.ones(4, 4, 3), torch.zeros(4), torch.ones(4),"
            " torch.zeros(4)] * 2, None, 1)\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@needs_triton
@pytest.mark.skipif(IN_INTERPRETER, reason="needs a process where triton was imported without the interpreter")
def test_interpreter_set_too_late_is_a_clear_error(monkeypatch):
    from stackrec_dist.kernels.triton_block import residual_block_triton

    import triton  # noqa: F401 - imported without TRITON_INTERPRET, as in a normal session

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, mask, params, alpha = make_case(1, 3, 16, [0])
    with pytest.raises(RuntimeError, match="before triton is first imported"):
        residual_block_triton(x, mask, *params, alpha, 1)
