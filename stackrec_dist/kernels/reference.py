"""PyTorch reference of the NextItNet residual block; the ground truth every fused kernel is tested against.

Layout is channels-last: activations are ``(B, L, C)``; conv weights are ``nn.Conv1d``'s
``(C_out, C_in, K)``. Tap ``j`` of a causal conv with dilation ``d`` reads position
``t - (K - 1 - j) * d``; positions before the start read zero.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """Causal dilated conv over time. x: (B, L, C_in); weight: (C_out, C_in, K) -> (B, L, C_out)."""
    k = weight.shape[-1]
    xt = F.pad(x.transpose(1, 2), ((k - 1) * dilation, 0))
    return F.conv1d(xt, weight, bias, dilation=dilation).transpose(1, 2)


def residual_block_with_conv(
    conv: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor],
    x: torch.Tensor,
    mask: torch.Tensor | None,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    ln1_weight: torch.Tensor,
    ln1_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    ln2_weight: torch.Tensor,
    ln2_bias: torch.Tensor,
    alpha: torch.Tensor | None,
    dilation: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The block with a pluggable causal conv ``conv(x, weight, bias, dilation)`` (CPU variants
    swap only the conv); semantics as :func:`residual_block_reference`."""
    c = x.shape[-1]
    m = None if mask is None else mask.to(x.dtype).unsqueeze(-1)
    h = conv(x, conv1_weight, conv1_bias, dilation)
    h = F.relu(F.layer_norm(h, (c,), ln1_weight, ln1_bias, eps))
    if m is not None:
        h = h * m
    h = conv(h, conv2_weight, conv2_bias, 2 * dilation)
    h = F.relu(F.layer_norm(h, (c,), ln2_weight, ln2_bias, eps))
    if m is not None:
        h = h * m
    return x + (h if alpha is None else alpha * h)


def residual_block_reference(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    ln1_weight: torch.Tensor,
    ln1_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    ln2_weight: torch.Tensor,
    ln2_bias: torch.Tensor,
    alpha: torch.Tensor | None,
    dilation: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``x + alpha * F(x)`` with F = conv(d) -> LN -> ReLU -> conv(2d) -> LN -> ReLU.

    x: (B, L, C). mask: (B, L) bool/float, 1 at real items, 0 at pads (None = all real).
    Each branch activation is zeroed at pad positions so that pads never leak into real
    positions through the next conv: the output is then independent of how much left padding
    a sequence has. alpha: scalar tensor, or None for a plain residual ``x + F(x)``.
    """
    return residual_block_with_conv(
        causal_conv, x, mask, conv1_weight, conv1_bias, ln1_weight, ln1_bias,
        conv2_weight, conv2_bias, ln2_weight, ln2_bias, alpha, dilation, eps,
    )
