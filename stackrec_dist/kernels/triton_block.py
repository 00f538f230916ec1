"""Fused Triton kernels for the NextItNet residual block (forward and backward).

Semantics are exactly ``reference.residual_block_reference``; shapes: x ``(B, L, C)``, mask
``(B, L)``, conv weights ``(C, C, K)`` as ``nn.Conv1d``, alpha a 0-dim tensor or None. Rows are
the flattened ``N = B * L`` positions; a program owns a tile of rows and *all* C channels so that
LayerNorm statistics are reduced in registers (``BLOCK_C = next_power_of_2(C)``, masked).

What is fused
-------------
Forward (2 launches):
  1. ``_fwd_kernel``: causal dilated conv(d) as an implicit GEMM over the K taps (shifted rows are
     read with masked loads: no padded copy, no im2col) + bias + LayerNorm + ReLU + pad mask.
     It stores only the pre-LN conv output ``z1`` and the LN statistics (mean, rstd).
  2. ``_fwd_kernel`` again for conv(2d), whose *prologue* rebuilds ``h1 = mask*relu(LN1(z1))``
     while loading its input tiles (elementwise, from the stored stats), and whose epilogue does
     LN2 + ReLU + mask + ``x + alpha * h2``. It stores ``z2``, LN2 stats and the output.
Backward (5 Triton launches + a few tiny torch reductions of per-program partial sums):
  1. ``_ln_bwd_kernel``: ``dz2`` from ``dout`` through (alpha, mask, ReLU, LN2), plus per-program
     partial sums of dgamma2, dbeta2, dbias2 and dalpha.
  2. ``_bwd_data_kernel``: transposed conv(2d) of ``dz2`` (anti-causal shifted loads) with the
     LN1 backward fused in its epilogue -> ``dz1`` (+ partials of dgamma1, dbeta1, dbias1).
  3. ``_wgrad_kernel``: dW2 = sum over rows of ``dz2^T @ shift(h1)``, h1 recomputed on load from
     ``z1`` (same prologue as forward 2), split over row chunks into fp32 partials.
  4. ``_bwd_data_kernel``: transposed conv(d) of ``dz1`` + the residual ``dout`` -> dx.
  5. ``_wgrad_kernel``: dW1 from ``dz1`` and shifted x.
  The only torch ops in the backward are ``.sum(0)`` over the partial buffers (deterministic,
  unlike atomics) and weight re-packing/casting.

What is stored vs recomputed (why)
----------------------------------
Saved for backward: x, ``z1``, ``z2`` (activation dtype) and 4 fp32 row statistics. Everything
else (normalized values, ReLU masks, ``h1``, ``h2``) is an elementwise function of ``z`` and the
stats, so it is recomputed inside the kernels that need it: that costs a few FLOPs per element
against an extra ``N x C`` write + read per tensor. The block does ~36*N*C^2 FLOPs (fwd+bwd) for
~19*N*C activation elements moved, i.e. ~C FLOP/byte in bf16: below the H100 ridge (~300) for
C <= 256, so memory traffic, not FLOPs, is what to save. Recomputing ``z`` itself would need the
conv GEMM again, so ``z`` is stored.
Eager autograd keeps about 6 ``N x C`` tensors per block (conv/LN/ReLU/mask outputs); this keeps
3, one of them x, which the caller holds anyway.

Precision: accumulation is fp32; ``z`` and ``dz`` are rounded to the activation dtype (as eager
does); LN stats are computed from the rounded ``z`` so forward and backward see the same values.
fp32 GEMMs use ``input_precision="ieee"`` (exact parity) - pass ``allow_tf32=True`` to trade it.

Triton is imported lazily (inside ``_kernels``), so this module imports on machines without it
and makes no CUDA call at import. ``@triton.jit`` decides interpreter vs compiled from
``TRITON_INTERPRET`` at decoration time - for Triton's own ``tl.*`` helpers that is when triton is
first imported - so the variable must be set before that, and kernels are built per mode.
"""

from __future__ import annotations

import functools
import os

import torch

_NUM_SMS_FALLBACK = 132  # H100 SXM; only used to size the weight-grad split when no device query


def interpret_mode() -> bool:
    """True when Triton should run kernels in its CPU interpreter (env TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """Load the kernel module once per interpreter mode (triton.jit reads TRITON_INTERPRET when
    the module executes, so each mode gets its own fresh module object)."""
    import importlib.util

    if interpret:
        import triton.language as tl

        # Triton's own library functions (tl.zeros, tl.sum, ...) are decorated when triton is
        # first imported; if that happened before TRITON_INTERPRET=1 was set they stay compiled
        # functions and every interpreted kernel fails with an obscure error deep inside.
        if type(tl.zeros).__name__ != "InterpretedFunction":
            raise RuntimeError("TRITON_INTERPRET=1 must be set before triton is first imported in "
                               "this process (run interpreter work in a fresh process)")
    name = "stackrec_dist.kernels._triton_kernels"
    spec = importlib.util.find_spec(name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _tiles(c: int):
    """(BLOCK_M, BLOCK_K, BLOCK_C, num_warps) for a program that owns BLOCK_M rows x all C.

    Picked from sm_90 ptxas reports (registers / spills, compiled ahead of time without a GPU), not
    from timings: e.g. C=64 with 64x64 tiles spilled ~400 B/thread where 32x32 tiles need 128 regs,
    and C=128 needs 8 warps to stay under 255 regs.
    Larger C gets fewer rows so the fp32 accumulator plus the LN epilogue stay in registers.
    """
    block_c = max(16, _next_pow2(c))
    if block_c <= 64:
        block_m, warps = 32, 4
    elif block_c <= 256:
        block_m, warps = 32, 8
    else:
        block_m, warps = 16, 8
    return block_m, min(block_c, 32), block_c, warps


def _precision(dt: torch.dtype, allow_tf32: bool) -> int:
    """The ``PREC`` constexpr of the kernels' dot products (see ``_triton_kernels._mma``)."""
    if interpret_mode():
        return 1 if dt == torch.float32 else 2
    return 0 if (dt != torch.float32 or allow_tf32) else 1


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS_FALLBACK


class _FusedBlock(torch.autograd.Function):
    """Autograd wrapper. Not autocast-aware: it computes in x's dtype (params are cast to it)."""

    @staticmethod
    def forward(ctx, x, mask, w1, b1, g1, be1, w2, b2, g2, be2, alpha, dilation, eps, allow_tf32):
        k = _kernels(interpret_mode())
        bsz, seq, c = x.shape
        kk = w1.shape[-1]
        n = bsz * seq
        dt = x.dtype
        dev = x.device
        xf = x.contiguous().view(n, c)
        has_mask = mask is not None
        has_alpha = alpha is not None
        m = mask.reshape(n).to(torch.float32).contiguous() if has_mask else xf.new_empty(1, dtype=torch.float32)
        a = alpha.reshape(1).contiguous() if has_alpha else xf.new_empty(1, dtype=torch.float32)
        # (K, C_in, C_out): tile loads of one tap are then row-major (reduction x output).
        w1p = w1.permute(2, 1, 0).to(dt).contiguous()
        w2p = w2.permute(2, 1, 0).to(dt).contiguous()
        z1 = torch.empty_like(xf)
        z2 = torch.empty_like(xf)
        out = torch.empty_like(xf)
        st = torch.empty(4, n, device=dev, dtype=torch.float32)  # mean1, rstd1, mean2, rstd2
        bm, bk, bc, warps = _tiles(c)
        prec = _precision(dt, allow_tf32)
        grid = (triton_cdiv(n, bm),)
        common = dict(K=kk, HAS_MASK=has_mask, HAS_ALPHA=has_alpha, PREC=prec,
                      BLOCK_M=bm, BLOCK_K=bk, BLOCK_C=bc, num_warps=warps)
        k._fwd_kernel[grid](xf, w1p, b1, g1, be1, m, st[0], st[1], g1, be1,
                            z1, st[0], st[1], xf, a, out, n, seq, c, dilation, eps,
                            PROLOGUE_LN=False, RESIDUAL=False, **common)
        # conv2 reads h1 = mask*relu(LN1(z1)) rebuilt on load from z1 and the LN1 stats.
        k._fwd_kernel[grid](z1, w2p, b2, g2, be2, m, st[0], st[1], g1, be1,
                            z2, st[2], st[3], xf, a, out, n, seq, c, 2 * dilation, eps,
                            PROLOGUE_LN=True, RESIDUAL=True, **common)
        ctx.save_for_backward(xf, m, w1, b1, g1, be1, w2, b2, g2, be2, a, z1, z2, st)
        ctx.cfg = (bsz, seq, c, kk, dilation, has_mask, has_alpha, prec)
        ctx.alpha_dtype = alpha.dtype if has_alpha else None
        return out.view(bsz, seq, c)

    @staticmethod
    def backward(ctx, dout):
        k = _kernels(interpret_mode())
        xf, m, w1, b1, g1, be1, w2, b2, g2, be2, a, z1, z2, st = ctx.saved_tensors
        bsz, seq, c, kk, dilation, has_mask, has_alpha, prec = ctx.cfg
        n = bsz * seq
        dt = xf.dtype
        dev = xf.device
        do = dout.contiguous().view(n, c).to(dt)
        bm, bk, bc, warps = _tiles(c)
        nprog = triton_cdiv(n, bm)
        grid = (nprog,)

        dz2 = torch.empty_like(xf)
        part2 = torch.empty(nprog, 3, c, device=dev, dtype=torch.float32)
        apart = torch.zeros(nprog, device=dev, dtype=torch.float32)
        k._ln_bwd_kernel[grid](do, z2, st[2], st[3], g2, be2, m, a, dz2, part2, apart, n, c,
                               HAS_MASK=has_mask, HAS_ALPHA=has_alpha, BLOCK_M=bm, BLOCK_C=bc, num_warps=warps)

        # (K, C_out, C_in): the transposed conv reduces over C_out.
        w1t = w1.permute(2, 0, 1).to(dt).contiguous()
        w2t = w2.permute(2, 0, 1).to(dt).contiguous()
        common = dict(K=kk, HAS_MASK=has_mask, PREC=prec, BLOCK_M=bm, BLOCK_K=bk, BLOCK_C=bc, num_warps=warps)
        dz1 = torch.empty_like(xf)
        part1 = torch.empty(nprog, 3, c, device=dev, dtype=torch.float32)
        k._bwd_data_kernel[grid](dz2, w2t, z1, st[0], st[1], g1, be1, m, xf, dz1, part1, n, seq, c, 2 * dilation,
                                 LN_EPILOGUE=True, **common)

        dw2 = _wgrad(k, dz2, z1, st[0], st[1], g1, be1, m, n, seq, c, kk, 2 * dilation, True, has_mask, prec)
        dx = torch.empty_like(xf)
        k._bwd_data_kernel[grid](dz1, w1t, z1, st[0], st[1], g1, be1, m, do, dx, part1, n, seq, c, dilation,
                                 LN_EPILOGUE=False, **common)
        dw1 = _wgrad(k, dz1, xf, st[0], st[1], g1, be1, m, n, seq, c, kk, dilation, False, has_mask, prec)

        p1 = part1.sum(0)
        p2 = part2.sum(0)
        dalpha = apart.sum().reshape(()).to(ctx.alpha_dtype) if has_alpha else None
        return (dx.view(bsz, seq, c), None,
                dw1.to(w1.dtype), p1[2].to(b1.dtype), p1[0].to(g1.dtype), p1[1].to(be1.dtype),
                dw2.to(w2.dtype), p2[2].to(b2.dtype), p2[0].to(g2.dtype), p2[1].to(be2.dtype),
                dalpha, None, None, None)


def _wgrad(k, dz, src, mean, rstd, g, b, m, n, seq, c, kk, dilation, prologue_ln, has_mask, prec):
    """Weight grad (C_out, C_in, K) in fp32; the row reduction is split so small C still fills the GPU."""
    bo = bi = min(64, max(16, _next_pow2(c)))
    br = 32
    tiles = triton_cdiv(c, bo) * triton_cdiv(c, bi) * kk
    target = 4 * _num_sms(dz.device)
    n_split = max(1, min(triton_cdiv(target, tiles), triton_cdiv(n, br)))
    rows_per_split = triton_cdiv(triton_cdiv(n, n_split), br) * br
    n_split = triton_cdiv(n, rows_per_split)
    part = torch.empty(n_split, kk, c, c, device=dz.device, dtype=torch.float32)
    grid = (triton_cdiv(c, bo), triton_cdiv(c, bi), kk * n_split)
    k._wgrad_kernel[grid](dz, src, mean, rstd, g, b, m, part, n, seq, c, dilation, rows_per_split,
                          K=kk, PROLOGUE_LN=prologue_ln, HAS_MASK=has_mask, PREC=prec,
                          BLOCK_R=br, BLOCK_O=bo, BLOCK_I=bi, num_warps=4)
    return part.sum(0).permute(1, 2, 0)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def residual_block_triton(x, mask, conv1_weight, conv1_bias, ln1_weight, ln1_bias, conv2_weight, conv2_bias,
                          ln2_weight, ln2_bias, alpha, dilation, eps=1e-5, allow_tf32=False):
    """Fused block; same signature and semantics as ``residual_block_reference``.

    x: (B, L, C) fp32 or bf16 (CUDA, or CPU under TRITON_INTERPRET=1); mask: (B, L) or None;
    conv weights (C, C, K); biases / LN params (C,); alpha 0-dim tensor or None -> (B, L, C).
    """
    if x.dim() != 3 or conv1_weight.shape[0] != x.shape[-1] or conv1_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"expected x (B, L, C) and weights (C, C, K); got {tuple(x.shape)}, {tuple(conv1_weight.shape)}")
    if x.numel() >= 2**31:
        raise ValueError("the kernels index with int32: B*L*C must stay below 2**31")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the fused block supports float32 and bfloat16 activations, got {x.dtype}")
    return _FusedBlock.apply(x, mask, conv1_weight, conv1_bias, ln1_weight, ln1_bias,
                             conv2_weight, conv2_bias, ln2_weight, ln2_bias, alpha, int(dilation), float(eps),
                             bool(allow_tf32))
