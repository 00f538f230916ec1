"""Sequential recommender: item embedding -> residual blocks -> softmax head at every position."""

from __future__ import annotations

import torch
from torch import nn

from stackrec_dist.config import ModelConfig
from stackrec_dist.models.blocks import NextItNetBlock, SASRecBlock

PAD_ID = 0


class SequentialRecommender(nn.Module):
    """Position i of the output predicts item i+1 of the input (autoregressive, causal).

    forward: item_ids (B, L) int64, 0 = pad -> hidden (B, L, C), zero at pad positions.
    logits: hidden (..., C) -> (..., V).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_items < 2:
            raise ValueError(
                f"model.num_items must be >= 2 (pad + at least one item), got {cfg.num_items}; "
                "set it or let the trainer take it from the dataset manifest"
            )
        self.cfg = cfg
        self.item_embedding = nn.Embedding(cfg.num_items, cfg.dim, padding_idx=PAD_ID)
        if cfg.backbone == "sasrec":
            self.position_embedding = nn.Embedding(cfg.max_len, cfg.dim)
            blocks = [
                SASRecBlock(cfg.dim, cfg.num_heads, cfg.dropout, cfg.layer_norm_eps, cfg.use_alpha, cfg.alpha_init)
                for _ in range(cfg.num_blocks)
            ]
            self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        else:
            blocks = [
                NextItNetBlock(cfg.dim, cfg.block_dilation(i), cfg.kernel_size,
                               cfg.layer_norm_eps, cfg.use_alpha, cfg.alpha_init, cfg.impl)
                for i in range(cfg.num_blocks)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(cfg.dim, cfg.num_items)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small embedding init as in NextItNet's code (truncated normal, std 0.02).
        nn.init.trunc_normal_(self.item_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[PAD_ID].zero_()
        if hasattr(self, "position_embedding"):
            nn.init.trunc_normal_(self.position_embedding.weight, std=0.02)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        mask = item_ids != PAD_ID
        x = self.item_embedding(item_ids)
        if hasattr(self, "position_embedding"):
            # Positions count from the right so that left padding does not shift them.
            length = item_ids.shape[1]
            pos = torch.arange(length - 1, -1, -1, device=item_ids.device).clamp(max=self.cfg.max_len - 1)
            x = (x + self.position_embedding(pos)) * mask.unsqueeze(-1).to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        if hasattr(self, "final_norm"):
            x = self.final_norm(x) * mask.unsqueeze(-1).to(x.dtype)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)
