"""evaluate(): last-position scores of a stand-in model -> full-ranking metrics; eval mode, no grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stackrec_dist.eval.evaluate import evaluate
from stackrec_dist.eval.metrics import metrics_from_ranks, rank_of_target


class TinyRecommender(nn.Module):
    """Same API as the project model: forward (B, L) -> (B, L, C) zero at pads; logits (..., C) -> (..., V).

    With ``perfect=True`` the hidden state is the one-hot of the item and the head maps item i to
    item i + 1 (wrapping within 1..V-1), so "next = last + 1" data is ranked first every time; the
    heavy dropout ruins that unless the model is in eval mode.
    """

    def __init__(self, num_items: int, perfect: bool = False):
        super().__init__()
        dim = num_items
        self.embedding = nn.Embedding(num_items, dim, padding_idx=0)
        self.head = nn.Linear(dim, num_items)
        self.dropout = nn.Dropout(0.9)
        self.calls: list[tuple[bool, bool]] = []  # (training, grad enabled) per forward
        if perfect:
            with torch.no_grad():
                self.embedding.weight.copy_(torch.eye(num_items))
                self.head.weight.zero_()
                self.head.bias.zero_()
                for i in range(1, num_items):
                    self.head.weight[i % (num_items - 1) + 1, i] = 1.0

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.dropout(self.embedding(item_ids)) * (item_ids != 0)[..., None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def _next_is_last_plus_one(num_items: int, batches: int, batch_size: int = 4, length: int = 6):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batches):
        last = torch.randint(1, num_items, (batch_size,), generator=gen)
        inputs = torch.randint(1, num_items, (batch_size, length), generator=gen)
        inputs[:, -1] = last
        inputs[0, :3] = 0  # left padding
        out.append({"inputs": inputs, "targets": last % (num_items - 1) + 1})
    return out


@pytest.mark.parametrize("start_training", [True, False])
def test_perfect_model_scores_one_in_eval_mode_and_mode_is_restored(start_training):
    model = TinyRecommender(12, perfect=True).train(start_training)
    result = evaluate(model, _next_is_last_plus_one(12, 3), [1, 5], "cpu")
    assert result["count"] == 12
    assert all(result[k] == 1.0 for k in ("mrr@1", "hr@1", "ndcg@1", "mrr@5", "hr@5", "ndcg@5"))
    assert model.training is start_training
    assert model.calls and all(call == (False, False) for call in model.calls)  # eval mode, no grad


def test_matches_manual_ranks_and_max_batches():
    torch.manual_seed(0)
    model = TinyRecommender(30)
    batches = _next_is_last_plus_one(30, 5)
    result = evaluate(model, batches, [5, 10], torch.device("cpu"), max_batches=3)
    assert result["count"] == 12
    assert len(model.calls) == 3
    model.eval()
    with torch.no_grad():
        ranks = torch.cat([
            rank_of_target(model.logits(model(b["inputs"])[:, -1]), b["targets"]) for b in batches[:3]
        ])
    want = metrics_from_ranks(ranks, [5, 10])
    assert {k: v for k, v in result.items() if k != "count"} == pytest.approx(want, rel=1e-12)


def test_model_error_still_restores_training_mode():
    class Broken(TinyRecommender):
        def logits(self, hidden):
            raise RuntimeError("boom")

    model = Broken(5).train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(model, _next_is_last_plus_one(5, 1), [5], "cpu")
    assert model.training
