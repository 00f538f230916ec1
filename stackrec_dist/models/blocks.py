"""Residual blocks with a learnable residual scale: ``x + alpha * F(x)``, alpha initialised to 0.

StackRec's point: with alpha = 0 every block starts as the identity, so very deep stacks train
stably and a stacked (grown) model can start out computing exactly its parent's function.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from stackrec_dist.kernels import residual_block


class _AlphaResidual(nn.Module):
    """Holds the residual scale; ``alpha`` is None when the ablation turns it off."""

    def _init_alpha(self, use_alpha: bool, alpha_init: float) -> None:
        if use_alpha:
            self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        else:
            self.register_parameter("alpha", None)


class NextItNetBlock(_AlphaResidual):
    """NextItNet residual block ("b" variant): conv(d) -> LN -> ReLU -> conv(2d) -> LN -> ReLU.

    x: (B, L, C), mask: (B, L) -> (B, L, C). Convs are causal: position t sees t, t-d, t-2d.
    """

    def __init__(self, dim: int, dilation: int, kernel_size: int = 3, eps: float = 1e-5,
                 use_alpha: bool = True, alpha_init: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.dilation = dilation
        self.eps = eps
        self.impl = impl
        self.conv1 = nn.Conv1d(dim, dim, kernel_size)
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self._init_alpha(use_alpha, alpha_init)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return residual_block(
            x, mask,
            self.conv1.weight, self.conv1.bias, self.ln1.weight, self.ln1.bias,
            self.conv2.weight, self.conv2.bias, self.ln2.weight, self.ln2.bias,
            self.alpha, self.dilation, self.eps, impl=self.impl,
        )


class SASRecBlock(_AlphaResidual):
    """Causal self-attention block (pre-LN) with the same alpha-scaled residuals.

    x: (B, L, C), mask: (B, L) -> (B, L, C). Two residual branches (attention, feed-forward)
    share the block's single alpha, so one scalar per block mutes the whole block as in StackRec.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, eps: float = 1e-5,
                 use_alpha: bool = True, alpha_init: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)
        self._init_alpha(use_alpha, alpha_init)

    def _scale(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.alpha is None else self.alpha * h

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, l, c = x.shape
        m = mask.to(x.dtype).unsqueeze(-1)
        q, k, v = self.qkv(self.ln1(x)).view(b, l, 3, self.num_heads, c // self.num_heads).unbind(2)
        # Keys at pad positions are excluded; causal on top. A query at a pad position would then
        # see no key at all when it is the leftmost, so pads may attend to themselves (the result
        # is zeroed by the mask anyway).
        causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
        allowed = causal & (mask.bool()[:, None, :] | torch.eye(l, dtype=torch.bool, device=x.device))
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self._scale(self.proj(attn.transpose(1, 2).reshape(b, l, c))) * m
        h = self.ff2(F.dropout(F.gelu(self.ff1(self.ln2(x))), self.dropout, self.training))
        return x + self._scale(h) * m
