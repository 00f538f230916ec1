"""Triton kernel bodies of the fused residual block; see ``triton_block`` for the design.

Imported only lazily by ``triton_block._kernels`` (this module imports triton at its top, and
``@triton.jit`` picks interpreter vs compiled mode from ``TRITON_INTERPRET`` when it runs). The
kernels live at module level because Triton resolves called jit functions through the module
globals, not through closures.
"""

import triton
import triton.language as tl


@triton.jit
def _src_tile(src_ptr, rows, t, off, cols, N, L, C,
              p_mean_ptr, p_rstd_ptr, p_g_ptr, p_b_ptr, mask_ptr,
              PROLOGUE_LN: tl.constexpr, HAS_MASK: tl.constexpr):
    # Rows whose shifted time leaves [0, L) read zero: that is the causal zero padding,
    # and it also keeps a row from reading across a sequence boundary.
    ts = t + off
    rvalid = (rows < N) & (ts >= 0) & (ts < L)
    srow = tl.where(rvalid, rows + off, 0)
    cvalid = cols < C
    m2 = rvalid[:, None] & cvalid[None, :]
    a = tl.load(src_ptr + srow[:, None] * C + cols[None, :], mask=m2, other=0.0)
    if PROLOGUE_LN:
        mu = tl.load(p_mean_ptr + srow, mask=rvalid, other=0.0)
        rs = tl.load(p_rstd_ptr + srow, mask=rvalid, other=0.0)
        g = tl.load(p_g_ptr + cols, mask=cvalid, other=0.0).to(tl.float32)
        b = tl.load(p_b_ptr + cols, mask=cvalid, other=0.0).to(tl.float32)
        y = (a.to(tl.float32) - mu[:, None]) * rs[:, None] * g[None, :] + b[None, :]
        y = tl.maximum(y, 0.0)
        if HAS_MASK:
            mk = tl.load(mask_ptr + srow, mask=rvalid, other=0.0)
            y = y * mk[:, None]
        y = tl.where(m2, y, 0.0)
        a = y.to(src_ptr.dtype.element_ty)
    return a

@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    # PREC 0: native tensor-core dot (bf16, or tf32 for fp32); 1: exact fp32 ("ieee");
    # 2: upcast to fp32 first - the interpreter's bf16 tl.dot returns garbage (checked with
    # triton 3.9), so bf16 runs there take this path to still test the rest of the kernel.
    if PREC == 2:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PREC == 1:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _conv_acc(src_ptr, w_ptr, rows, t, N, L, C, dilation,
              p_mean_ptr, p_rstd_ptr, p_g_ptr, p_b_ptr, mask_ptr,
              K: tl.constexpr, SIGN: tl.constexpr, PROLOGUE_LN: tl.constexpr,
              HAS_MASK: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    # Implicit GEMM: out[r] = sum_j src[r + SIGN*(K-1-j)*d] @ W[j], W packed (K, C_red, C_out).
    cols_out = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(K):
        off = SIGN * (K - 1 - j) * dilation
        for k0 in range(0, C, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            a = _src_tile(src_ptr, rows, t, off, cols, N, L, C,
                          p_mean_ptr, p_rstd_ptr, p_g_ptr, p_b_ptr, mask_ptr,
                          PROLOGUE_LN, HAS_MASK)
            wmask = (cols[:, None] < C) & (cols_out[None, :] < C)
            w = tl.load(w_ptr + j * C * C + cols[:, None] * C + cols_out[None, :], mask=wmask, other=0.0)
            acc = _mma(a, w, acc, PREC)
    return acc

@triton.jit
def _ln_relu_bwd(gup, z, mu, rs, g, b, mk, cmask, C, HAS_MASK: tl.constexpr):
    # gup: grad w.r.t. h = mask * relu(LN(z)); returns dz and the pieces of the param grads.
    xhat = tl.where(cmask[None, :], (z - mu[:, None]) * rs[:, None], 0.0)
    y = xhat * g[None, :] + b[None, :]
    dy = tl.where(y > 0, gup, 0.0)
    if HAS_MASK:
        dy = dy * mk[:, None]
    dy = tl.where(cmask[None, :], dy, 0.0)
    dxhat = dy * g[None, :]
    c1 = tl.sum(dxhat * xhat, axis=1) / C
    c2 = tl.sum(dxhat, axis=1) / C
    dz = (dxhat - xhat * c1[:, None] - c2[:, None]) * rs[:, None]
    return dz, dy * xhat, dy

@triton.jit
def _fwd_kernel(src_ptr, w_ptr, bias_ptr, g_ptr, b_ptr, mask_ptr,
                p_mean_ptr, p_rstd_ptr, p_g_ptr, p_b_ptr,
                z_ptr, mean_ptr, rstd_ptr, res_ptr, alpha_ptr, out_ptr,
                N, L, C, dilation, eps,
                K: tl.constexpr, PROLOGUE_LN: tl.constexpr, RESIDUAL: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_ALPHA: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows % L
    acc = _conv_acc(src_ptr, w_ptr, rows, t, N, L, C, dilation,
                    p_mean_ptr, p_rstd_ptr, p_g_ptr, p_b_ptr, mask_ptr,
                    K, -1, PROLOGUE_LN, HAS_MASK, PREC, BLOCK_M, BLOCK_K, BLOCK_C)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    rmask = rows < N
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    zq = (acc + bias[None, :]).to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + offs, zq, mask=m2)
    # Stats of the *rounded* z: the backward recomputes xhat from the stored z.
    z = tl.where(cmask[None, :], zq.to(tl.float32), 0.0)
    mu = tl.sum(z, axis=1) / C
    diff = tl.where(cmask[None, :], z - mu[:, None], 0.0)
    rs = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    tl.store(mean_ptr + rows, mu, mask=rmask)
    tl.store(rstd_ptr + rows, rs, mask=rmask)
    if RESIDUAL:
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        h = tl.maximum(diff * rs[:, None] * g[None, :] + b[None, :], 0.0)
        if HAS_MASK:
            mk = tl.load(mask_ptr + rows, mask=rmask, other=0.0)
            h = h * mk[:, None]
        if HAS_ALPHA:
            h = h * tl.load(alpha_ptr).to(tl.float32)
        xres = tl.load(res_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (xres + h).to(out_ptr.dtype.element_ty), mask=m2)

@triton.jit
def _ln_bwd_kernel(dout_ptr, z_ptr, mean_ptr, rstd_ptr, g_ptr, b_ptr, mask_ptr, alpha_ptr,
                   dz_ptr, part_ptr, apart_ptr, N, C,
                   HAS_MASK: tl.constexpr, HAS_ALPHA: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    dout = tl.load(dout_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rs = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_MASK:
        mk = tl.load(mask_ptr + rows, mask=rmask, other=0.0)
    else:
        mk = rs
    gup = dout
    if HAS_ALPHA:
        a = tl.load(alpha_ptr).to(tl.float32)
        gup = dout * a
        # dalpha = sum(dout * h2); h2 rebuilt from z2 and the stats.
        xhat = tl.where(cmask[None, :], (z - mu[:, None]) * rs[:, None], 0.0)
        h = tl.maximum(xhat * g[None, :] + b[None, :], 0.0)
        if HAS_MASK:
            h = h * mk[:, None]
        h = tl.where(m2, h, 0.0)
        tl.store(apart_ptr + pid, tl.sum(tl.sum(dout * h, axis=1), axis=0))
    dz, dgp, dbp = _ln_relu_bwd(gup, z, mu, rs, g, b, mk, cmask, C, HAS_MASK)
    dzq = dz.to(dz_ptr.dtype.element_ty)
    tl.store(dz_ptr + offs, dzq, mask=m2)
    pbase = part_ptr + pid * 3 * C
    tl.store(pbase + cols, tl.sum(dgp, axis=0), mask=cmask)
    tl.store(pbase + C + cols, tl.sum(dbp, axis=0), mask=cmask)
    tl.store(pbase + 2 * C + cols, tl.sum(tl.where(m2, dzq.to(tl.float32), 0.0), axis=0), mask=cmask)

@triton.jit
def _bwd_data_kernel(dz_ptr, w_ptr, z_ptr, mean_ptr, rstd_ptr, g_ptr, b_ptr, mask_ptr,
                     res_ptr, out_ptr, part_ptr, N, L, C, dilation,
                     K: tl.constexpr, LN_EPILOGUE: tl.constexpr, HAS_MASK: tl.constexpr,
                     PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    # Transposed causal conv: d_in[r] = sum_j dz[r + (K-1-j)*d] @ W[j]^T (W packed (K, C_out, C_in)).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows % L
    acc = _conv_acc(dz_ptr, w_ptr, rows, t, N, L, C, dilation,
                    mean_ptr, rstd_ptr, g_ptr, b_ptr, mask_ptr,
                    K, 1, False, False, PREC, BLOCK_M, BLOCK_K, BLOCK_C)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cols < C
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    if LN_EPILOGUE:
        z = tl.load(z_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rs = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_MASK:
            mk = tl.load(mask_ptr + rows, mask=rmask, other=0.0)
        else:
            mk = rs
        dz, dgp, dbp = _ln_relu_bwd(acc, z, mu, rs, g, b, mk, cmask, C, HAS_MASK)
        dzq = dz.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, dzq, mask=m2)
        pbase = part_ptr + pid * 3 * C
        tl.store(pbase + cols, tl.sum(dgp, axis=0), mask=cmask)
        tl.store(pbase + C + cols, tl.sum(dbp, axis=0), mask=cmask)
        tl.store(pbase + 2 * C + cols, tl.sum(tl.where(m2, dzq.to(tl.float32), 0.0), axis=0), mask=cmask)
    else:
        res = tl.load(res_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (acc + res).to(out_ptr.dtype.element_ty), mask=m2)

@triton.jit
def _wgrad_kernel(dz_ptr, src_ptr, p_mean_ptr, p_rstd_ptr, p_g_ptr, p_b_ptr, mask_ptr, part_ptr,
                  N, L, C, dilation, rows_per_split,
                  K: tl.constexpr, PROLOGUE_LN: tl.constexpr, HAS_MASK: tl.constexpr,
                  PREC: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    # dW[j][co, ci] = sum_r dz[r, co] * src[r - (K-1-j)*d, ci]; one program per
    # (co tile, ci tile, tap, row split); splits are summed on the host (deterministic).
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    j = pid_s % K
    split = pid_s // K
    off = -(K - 1 - j) * dilation
    co = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ci = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    r_start = split * rows_per_split
    for r0 in range(0, rows_per_split, BLOCK_R):
        rows = r_start + r0 + tl.arange(0, BLOCK_R)
        t = rows % L
        rmask = rows < N
        d = tl.load(dz_ptr + rows[:, None] * C + co[None, :],
                    mask=rmask[:, None] & (co[None, :] < C), other=0.0)
        s = _src_tile(src_ptr, rows, t, off, ci, N, L, C,
                      p_mean_ptr, p_rstd_ptr, p_g_ptr, p_b_ptr, mask_ptr,
                      PROLOGUE_LN, HAS_MASK)
        acc = _mma(tl.trans(d), s, acc, PREC)
    omask = (co[:, None] < C) & (ci[None, :] < C)
    tl.store(part_ptr + (split * K + j) * C * C + co[:, None] * C + ci[None, :], acc, mask=omask)
