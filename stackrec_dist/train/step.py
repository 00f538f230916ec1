"""The training objective as a module, shared by the single-process trainer and DeepSpeed workers.

The loss reads the head's weight directly (chunked and sampled softmax never call ``head.forward``),
so the objective is one module whose ``forward`` covers every parameter use: that is what DeepSpeed
ZeRO-3 needs to gather partitioned parameters (the head is registered as an external parameter
of this wrapper by the distributed code).
"""

from __future__ import annotations

import torch
from torch import nn

from stackrec_dist.config import LossConfig
from stackrec_dist.losses import sequence_loss


class RecommenderLoss(nn.Module):
    """forward(inputs (B, L), targets (B, L), 0 = no target) -> mean loss over real targets."""

    def __init__(self, model: nn.Module, loss_cfg: LossConfig, log_q: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg
        self.register_buffer("log_q", log_q, persistent=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs)
        head = self.model.head
        return sequence_loss(hidden, targets, head.weight, head.bias, self.loss_cfg, log_q=self.log_q)
