"""Model x evaluation stream -> full-ranking metrics of the next item after each history."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from stackrec_dist.eval.metrics import MetricAccumulator, rank_of_target


def evaluate_accumulator(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    ks: Sequence[int],
    device: torch.device | str,
    max_batches: int = 0,
) -> MetricAccumulator:
    """Like :func:`evaluate` but returns the raw accumulator (for an all_reduce across workers)."""
    acc = MetricAccumulator(ks)
    was_training = model.training
    model.eval()  # no dropout while ranking; the caller's mode is restored below
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches and i >= max_batches:
                    break
                inputs = batch["inputs"].to(device, non_blocking=True)  # (b, L), left-padded
                targets = batch["targets"].to(device, non_blocking=True)  # (b,)
                # The last position has seen the whole history (left padding), so it predicts the target.
                hidden = model(inputs)[:, -1]  # (b, C)
                scores = model.logits(hidden)  # (b, V)
                acc.update(rank_of_target(scores, targets))
    finally:
        model.train(was_training)
    return acc


def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    ks: Sequence[int],
    device: torch.device | str,
    max_batches: int = 0,
) -> dict[str, float]:
    """Full-ranking MRR/HR/NDCG@k of ``model`` over ``batches``.

    batches yield {"inputs": LongTensor (b, L) left-padded history, "targets": LongTensor (b,)};
    ``max_batches`` > 0 stops after that many. Returns {"mrr@k", "hr@k", "ndcg@k" for k in ks,
    "count": rows evaluated}. Metrics are NaN when no row was evaluated.
    """
    acc = evaluate_accumulator(model, batches, ks, device, max_batches)
    return {**acc.compute(), "count": acc.count}


def evaluate_split(model: nn.Module, data_cfg, split: str, eval_cfg, device: torch.device | str,
                   max_batches: int | None = None) -> dict[str, float]:
    """:func:`evaluate` over every row of ``split`` of ``data_cfg``'s dataset (one process);
    ``max_batches`` defaults to ``eval_cfg.max_batches``. A split with no row is a DataError, not NaNs."""
    from stackrec_dist.data.errors import DataError
    from stackrec_dist.data.eval_stream import iter_eval_batches

    batches = iter_eval_batches(data_cfg, split, eval_cfg.batch_size)
    limit = eval_cfg.max_batches if max_batches is None else max_batches
    metrics = evaluate(model.to(device), batches, eval_cfg.ks, device, max_batches=limit)
    if metrics["count"] == 0:
        raise DataError(f"split {split!r} has no row to evaluate", path=data_cfg.path)
    return metrics
