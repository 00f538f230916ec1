"""CPU variants of the residual block, written as plain matmuls over time-shifted rows.

Same semantics and signature as ``reference.residual_block_reference``; x ``(B, L, C)``, conv
weights ``(C_out, C_in, K)``. They exist to be measured against ``F.conv1d`` on CPU (see
``benchmarks/kernels.py --cpu`` and docs/kernels.md for the figures and the decision).

- ``causal_conv_shifted``: K matmuls ``x[:, :L-s] @ W_j^T`` added into ``out[:, s:]`` (shift
  ``s = (K-1-j)*d``): no padded copy of x, each GEMM only over the rows it reaches.
- ``causal_conv_gemm``: one ``(B*L, C_in) x (C_in, K*C_out)`` GEMM, then the K slabs are added with
  their shifts: one large GEMM instead of K smaller ones, at the cost of a K-times wider product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stackrec_dist.kernels.reference import residual_block_with_conv


def causal_conv_shifted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """x: (B, L, C_in); weight: (C_out, C_in, K) -> (B, L, C_out), as ``reference.causal_conv``."""
    k = weight.shape[-1]
    seq = x.shape[1]
    # The unshifted tap covers every row, so it initialises the output (and carries the bias).
    out = F.linear(x, weight[:, :, k - 1], bias)
    for j in range(k - 1):
        s = (k - 1 - j) * dilation
        if s < seq:
            out[:, s:] += F.linear(x[:, : seq - s], weight[:, :, j])
    return out


def causal_conv_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """x: (B, L, C_in); weight: (C_out, C_in, K) -> (B, L, C_out), one wide GEMM for all taps."""
    c_out, _, k = weight.shape
    seq = x.shape[1]
    # (K*C_out, C_in): row block j is tap j.
    w = weight.permute(2, 0, 1).reshape(k * c_out, -1)
    p = F.linear(x, w).unflatten(-1, (k, c_out))  # (B, L, K, C_out)
    # A fresh tensor (not a view of p) so the shifted adds below do not write into p.
    out = p[:, :, k - 1].clone() if bias is None else p[:, :, k - 1] + bias
    for j in range(k - 1):
        s = (k - 1 - j) * dilation
        if s < seq:
            out[:, s:] += p[:, : seq - s, j]
    return out


def residual_block_shifted(x, mask, conv1_weight, conv1_bias, ln1_weight, ln1_bias, conv2_weight, conv2_bias,
                           ln2_weight, ln2_bias, alpha, dilation, eps=1e-5):
    """The block with ``causal_conv_shifted``; x (B, L, C), mask (B, L) or None -> (B, L, C)."""
    return residual_block_with_conv(causal_conv_shifted, x, mask, conv1_weight, conv1_bias, ln1_weight, ln1_bias,
                                     conv2_weight, conv2_bias, ln2_weight, ln2_bias, alpha, dilation, eps)


def residual_block_gemm(x, mask, conv1_weight, conv1_bias, ln1_weight, ln1_bias, conv2_weight, conv2_bias,
                        ln2_weight, ln2_bias, alpha, dilation, eps=1e-5):
    """The block with ``causal_conv_gemm``; x (B, L, C), mask (B, L) or None -> (B, L, C)."""
    return residual_block_with_conv(causal_conv_gemm, x, mask, conv1_weight, conv1_bias, ln1_weight, ln1_bias,
                                     conv2_weight, conv2_bias, ln2_weight, ln2_bias, alpha, dilation, eps)
