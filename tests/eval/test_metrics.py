"""Ranks and MRR/HR/NDCG@N against hand-computed cases; accumulator merge == single pass."""

from __future__ import annotations

import math

import pytest
import torch

from stackrec_dist.eval.metrics import MetricAccumulator, metrics_from_ranks, rank_of_target


def test_rank_hand_cases_ties_and_pad():
    scores = torch.tensor([
        # pad col 0 scores highest everywhere: it must never count.
        [100.0, 0.5, 0.9, 0.1, 0.9],  # target 2 (0.9) ties item 4: pessimistic rank 2
        [100.0, 0.5, 0.9, 0.1, 0.8],  # target 2 strictly best: rank 1
        [100.0, 0.5, 0.9, 0.1, 0.8],  # target 3 worst of the 4 real items: rank 4
        [100.0, 0.7, 0.7, 0.7, 0.7],  # all tied: worst rank, V - 1 = 4
        [100.0, 0.2, 0.9, 0.2, 0.1],  # target 1 ties item 3, below item 2: rank 3
    ])
    targets = torch.tensor([2, 2, 3, 4, 1])
    ranks = rank_of_target(scores, targets)
    assert ranks.dtype == torch.int64
    assert ranks.tolist() == [2, 1, 4, 4, 3]


def test_constant_scores_earn_nothing():
    scores = torch.zeros(6, 101)
    targets = torch.arange(1, 7)
    ranks = rank_of_target(scores, targets)
    assert ranks.tolist() == [100] * 6
    m = metrics_from_ranks(ranks, [5, 20])
    assert all(v == 0.0 for v in m.values())


def test_rank_rejects_pad_or_out_of_range_targets_and_nan_is_worst():
    scores = torch.randn(2, 5)
    with pytest.raises(ValueError, match="real item"):
        rank_of_target(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="real item"):
        rank_of_target(scores, torch.tensor([5, 1]))
    scores[0, 3] = float("nan")
    assert rank_of_target(scores, torch.tensor([3, 1]))[0].item() == 4


def test_metrics_hand_values_and_rank_n_boundary():
    ranks = torch.tensor([1, 2, 5, 6])
    m = metrics_from_ranks(ranks, [5, 1])
    assert set(m) == {"mrr@5", "hr@5", "ndcg@5", "mrr@1", "hr@1", "ndcg@1"}
    # Rank exactly 5 counts at N = 5; rank 6 does not.
    assert m["hr@5"] == pytest.approx(3 / 4)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 4)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert m["hr@1"] == m["mrr@1"] == m["ndcg@1"] == pytest.approx(1 / 4)


def test_accumulator_merge_and_reduced_state_equal_single_pass():
    ks = [1, 5, 10, 20]
    ranks = torch.randint(1, 40, (1000,), generator=torch.Generator().manual_seed(0))
    single = MetricAccumulator(ks)
    for part in ranks.split(64):
        single.update(part)
    assert single.count == 1000
    assert single.compute() == pytest.approx(metrics_from_ranks(ranks, ks), rel=1e-12)

    # Three "workers" with uneven shards; all_reduce(SUM) of their states is a plain sum.
    shards = [ranks[:100], ranks[100:650], ranks[650:]]
    workers = [MetricAccumulator(ks) for _ in shards]
    for acc, shard in zip(workers, shards):
        acc.update(shard)
    reduced = sum(acc.state() for acc in workers)
    assert reduced.dtype == torch.float64
    from_state = MetricAccumulator.from_state(reduced, ks).compute()
    merged = workers[0].merge(workers[1]).merge(workers[2]).compute()
    want = single.compute()
    for key in want:
        assert from_state[key] == pytest.approx(want[key], rel=1e-14, abs=0)
        assert merged[key] == pytest.approx(want[key], rel=1e-14, abs=0)
        if key.startswith("hr@"):
            assert from_state[key] == want[key]  # integer sums: exact


def test_accumulator_state_is_a_copy_and_empty_is_nan():
    acc = MetricAccumulator([5])
    state = acc.state()
    state += 1
    assert acc.count == 0
    assert all(math.isnan(v) for v in acc.compute().values())
    with pytest.raises(ValueError):
        MetricAccumulator.from_state(torch.zeros(3, dtype=torch.float64), [5])
    with pytest.raises(ValueError):
        acc.merge(MetricAccumulator([10]))
