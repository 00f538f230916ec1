"""Full-ranking MRR@N, HR@N and NDCG@N of the true next item (pure torch, no model).

One evaluation row has one target, so NDCG@N has a single relevant item and its ideal DCG is 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PAD_ID = 0
METRICS = ("mrr", "hr", "ndcg")


def rank_of_target(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (N, V) over the catalogue incl. the pad column 0, targets (N,) in 1..V-1 -> ranks (N,) int64.

    The rank is 1-based among the V - 1 real items; the pad column never competes. Ties are
    counted pessimistically: every other real item scoring at least as high as the target ranks
    ahead of it,

        rank = 1 + #{j != t, j != 0 : s_j > s_t} + #{j != t, j != 0 : s_j == s_t},

    so a model that cannot separate items (e.g. constant scores) gets rank V - 1 and earns
    nothing, instead of being rewarded by an optimistic or arbitrary tie-break. A NaN target score
    also gets the worst rank, V - 1.
    """
    if scores.dim() != 2 or targets.dim() != 1 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"expected scores (N, V) and targets (N,), got {tuple(scores.shape)} and {tuple(targets.shape)}")
    vocab = scores.shape[1]
    targets = targets.to(device=scores.device, dtype=torch.long)
    if targets.numel() and (targets.min() <= PAD_ID or targets.max() >= vocab):
        raise ValueError(f"targets must be real item ids in 1..{vocab - 1} (pad id {PAD_ID} is never a target)")
    target_score = scores.gather(1, targets[:, None])  # (N, 1)
    # Over real columns only; the target's own column satisfies >= and supplies the "1 +".
    ranks = (scores[:, PAD_ID + 1:] >= target_score).sum(dim=1)
    return torch.where(torch.isnan(target_score[:, 0]), torch.full_like(ranks, vocab - 1), ranks)


class MetricAccumulator:
    """Running sums of MRR/HR/NDCG@N over evaluation rows; reducible across workers.

    ``state()`` is a float64 vector [mrr@k1, hr@k1, ndcg@k1, mrr@k2, ..., count]: sums, not
    means, so ``dist.all_reduce(state, op=SUM)`` followed by ``MetricAccumulator.from_state``
    gives the single-process numbers (HR sums and the count are integers, exact in float64; the
    reciprocal sums differ only by float64 summation order).
    """

    def __init__(self, ks: Sequence[int]):
        ks = [int(k) for k in ks]
        if not ks or any(k <= 0 for k in ks):
            raise ValueError(f"ks must be positive ints, got {ks}")
        self.ks = ks
        self._sums = torch.zeros(len(METRICS) * len(ks) + 1, dtype=torch.float64)

    def update(self, ranks: torch.Tensor) -> None:
        """Add a batch of 1-based ranks (n,). Stays on the ranks' device (no host sync per batch)."""
        r = ranks.detach().reshape(-1).to(torch.float64)
        parts = []
        for k in self.ks:
            hit = r <= k
            parts.append(torch.where(hit, 1.0 / r, 0.0).sum())
            parts.append(hit.sum(dtype=torch.float64))
            parts.append(torch.where(hit, 1.0 / torch.log2(r + 1.0), 0.0).sum())
        parts.append(torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device))
        self._sums = self._sums.to(r.device) + torch.stack(parts)

    def state(self) -> torch.Tensor:
        """Float64 (3 * len(ks) + 1,) sums then count; a copy, safe to all_reduce in place."""
        return self._sums.clone()

    @classmethod
    def from_state(cls, state: torch.Tensor, ks: Sequence[int]) -> MetricAccumulator:
        acc = cls(ks)
        if state.shape != acc._sums.shape:
            raise ValueError(f"state has shape {tuple(state.shape)}, expected {tuple(acc._sums.shape)} for ks={acc.ks}")
        acc._sums = state.detach().to(torch.float64).clone()
        return acc

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add another accumulator's sums (same ks) into this one; returns self."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge accumulators with ks {other.ks} and {self.ks}")
        self._sums = self._sums + other._sums.to(self._sums.device)
        return self

    @property
    def count(self) -> int:
        return int(self._sums[-1].item())

    def compute(self) -> dict[str, float]:
        """Means {"mrr@k", "hr@k", "ndcg@k"} over all rows seen; NaN when no row was seen
        (nothing was measured, which a 0 would hide)."""
        sums = self._sums.cpu().tolist()
        count = sums[-1]
        out = {}
        for i, k in enumerate(self.ks):
            for j, name in enumerate(METRICS):
                out[f"{name}@{k}"] = sums[i * len(METRICS) + j] / count if count else float("nan")
        return out


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """ranks (N,) 1-based -> {"mrr@k": ..., "hr@k": ..., "ndcg@k": ...} averaged over rows, for each k.

    MRR@k = 1/rank if rank <= k else 0; HR@k = [rank <= k]; NDCG@k = 1/log2(rank + 1) if rank <= k else 0.
    """
    acc = MetricAccumulator(ks)
    acc.update(ranks)
    return acc.compute()
