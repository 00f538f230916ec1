"""The training objective as a module, shared by the single-process trainer and DeepSpeed workers.

The loss reads the head's weight directly (chunked and sampled softmax never call ``head.forward``),
so the objective is one module whose ``forward`` covers every parameter use: that is what DeepSpeed
ZeRO-3 needs to gather partitioned parameters (the head is registered as an external parameter
of this wrapper by the distributed code).
"""

from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

from stackrec_dist.config import DataConfig, LossConfig
from stackrec_dist.losses import sequence_loss, unigram_log_q


STEP_TIMES_ENV = "STACKREC_STEP_TIMES_FILE"
_probe_handle = None


def _install_step_probe() -> None:
    """Opt-in benchmark probe (``benchmarks/scale.py``): with ``$STACKREC_STEP_TIMES_FILE`` set,
    every optimizer step of this process appends ``{"pid", "step", "time"}`` (wall clock) to that
    file, through torch's global optimizer post-step hook (it fires inside DeepSpeed's step too).
    Unset (the default), nothing is installed."""
    global _probe_handle
    path = os.environ.get(STEP_TIMES_ENV)
    if not path or _probe_handle is not None:
        return
    count = [0]

    def hook(optimizer, args, kwargs) -> None:
        count[0] += 1
        with open(path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": count[0], "time": time.time()}) + "\n")

    from torch.optim.optimizer import register_optimizer_step_post_hook

    _probe_handle = register_optimizer_step_post_hook(hook)


def remove_step_probe() -> None:
    """Undo :func:`_install_step_probe` (tests)."""
    global _probe_handle
    if _probe_handle is not None:
        _probe_handle.remove()
        _probe_handle = None


def _head_items(model: nn.Module) -> int:
    """Rows of the output head: its full size even when ZeRO-3 holds only a partition of it."""
    weight = model.head.weight
    return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]


class RecommenderLoss(nn.Module):
    """forward(inputs (B, L), targets (B, L), 0 = no target) -> mean loss over real targets.

    ``loss.kind=sampled`` with ``loss.sampler=unigram`` needs ``item_counts`` ((V,) training-set
    occurrences per item id, ``train.data_info.item_counts``): the proposal is
    Q(j) ~ (count_j + 1) ** 0.75 (``losses.unigram_log_q``), log-Q corrected like the uniform one.
    ``log_q`` (V,) passes any proposal directly (it wins over ``item_counts``).
    """

    def __init__(self, model: nn.Module, loss_cfg: LossConfig, log_q: torch.Tensor | None = None, *,
                 item_counts: torch.Tensor | None = None):
        super().__init__()
        _install_step_probe()
        self.model = model
        self.loss_cfg = loss_cfg
        if log_q is None and loss_cfg.kind == "sampled" and loss_cfg.sampler == "unigram":
            if item_counts is None:
                raise ValueError("loss.sampler=unigram needs item_counts (train.data_info.item_counts(data_cfg)); "
                                 "RecommenderLoss.for_data(model, loss_cfg, data_cfg) reads them")
            num_items = _head_items(model)
            if item_counts.shape != (num_items,):
                raise ValueError(f"item_counts has shape {tuple(item_counts.shape)}, the head has {num_items} items")
            log_q = unigram_log_q(item_counts)
        self.register_buffer("log_q", log_q, persistent=False)

    @classmethod
    def for_data(cls, model: nn.Module, loss_cfg: LossConfig, data_cfg: DataConfig | None) -> "RecommenderLoss":
        """The objective with the proposal ``loss_cfg`` asks for, reading the item counts from
        ``data_cfg``'s manifest when it is the unigram one (``data_cfg=None``: no dataset)."""
        from stackrec_dist.train.data_info import proposal_item_counts

        counts = proposal_item_counts(data_cfg, loss_cfg)
        num_items = _head_items(model)
        if counts is not None and len(counts) < num_items:
            # A model catalogue larger than the dataset's (model.num_items set explicitly, e.g. one
            # catalogue for several data sizes): the ids past the dataset's never occur, count 0.
            counts = torch.cat([counts, counts.new_zeros(num_items - len(counts))])
        return cls(model, loss_cfg, item_counts=counts)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs)
        head = self.model.head
        return sequence_loss(hidden, targets, head.weight, head.bias, self.loss_cfg, log_q=self.log_q)
