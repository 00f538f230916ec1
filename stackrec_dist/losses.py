"""Next-item cross-entropy over the catalogue: full, chunked (same numbers, less memory), sampled.

Shapes used throughout: hidden ``(B, L, C)``, targets ``(B, L)`` int64 with ``0`` = no target
(pad), output head ``head_weight (V, C)``, ``head_bias (V,)`` where ``V`` counts the pad id 0.
Every loss is the mean over the non-pad targets. Column 0 (pad) is never part of the softmax: it
can never be a target, so giving it probability mass would only teach the model to push it down.

A batch without any target gives a loss of exactly 0 that is still connected to the graph (so
``backward`` and DDP/ZeRO gradient hooks run as usual) instead of the NaN of a mean over nothing.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from stackrec_dist.config import LossConfig

PAD_ID = 0

__all__ = [
    "full_softmax_loss",
    "chunked_softmax_loss",
    "sampled_softmax_loss",
    "uniform_log_q",
    "unigram_log_q",
    "sequence_loss",
]


def _real_rows(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (..., C), targets (...) -> hidden rows (N, C) and targets (N,) of the non-pad targets.

    Gathering first means no logits are ever computed for pad positions (often most of a
    left-padded batch).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    flat_targets = targets.reshape(-1)
    keep = flat_targets != PAD_ID
    return hidden.reshape(-1, hidden.shape[-1])[keep], flat_targets[keep]


def _empty_loss(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor) -> torch.Tensor:
    # 0 * sum keeps every input in the graph, so all parameters get (zero) gradients.
    return (hidden.sum() + head_weight.sum() + head_bias.sum()) * 0.0


def full_softmax_loss(
    hidden: torch.Tensor, targets: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy over all real items; the reference the other two losses are tested against.

    hidden (B, L, C) (or any (..., C)), targets (B, L) int64 with 0 = ignore, head_weight (V, C),
    head_bias (V,) -> scalar mean over non-pad targets. Materialises (N, V) logits, N = #targets.
    """
    h, t = _real_rows(hidden, targets)
    if t.numel() == 0:
        return _empty_loss(hidden, head_weight, head_bias)
    # The pad column can never be a target: leave it out of the softmax by slicing it off the
    # head (no (N, V) mask pass; its weight row gets exactly zero gradient). Relies on PAD_ID == 0.
    logits = F.linear(h, head_weight[PAD_ID + 1:], head_bias[PAD_ID + 1:])  # (N, V - 1)
    return F.cross_entropy(logits, t - (PAD_ID + 1))


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """sum_i [logsumexp_j>=1 (h_i . w_j + b_j) - (h_i . w_t_i + b_t_i)] / N, streamed over chunks.

    forward: keep only a running logsumexp per row, merged chunk by chunk, so the largest
    temporary is (N, chunk). backward: recompute each chunk's logits, turn them into
    softmax probabilities with the saved logsumexp, and accumulate the three gradients from that
    chunk; the one-hot part of (softmax - onehot) is applied once, outside the loop, by index.
    Column 0 (pad) is skipped entirely: chunks cover items 1 .. V-1.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, t, chunk_size):  # h (N, C), weight (V, C), bias (V,), t (N,)
        n, vocab = h.shape[0], weight.shape[0]
        # Accumulate the softmax statistics in at least float32 even for half inputs.
        acc = torch.promote_types(h.dtype, torch.float32)
        lse = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
        for start in range(PAD_ID + 1, vocab, chunk_size):
            stop = min(start + chunk_size, vocab)
            logits = F.linear(h, weight[start:stop], bias[start:stop]).to(acc)  # (N, chunk)
            # Online logsumexp at chunk granularity: log(e^a + e^b) of the running value and the
            # chunk's own (stable) logsumexp; logaddexp(-inf, x) = x starts it without NaN.
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        target_logit = (h * weight[t]).sum(dim=1).to(acc) + bias[t].to(acc)
        ctx.save_for_backward(h, weight, bias, t, lse)
        ctx.chunk_size = chunk_size
        return ((lse - target_logit).sum() / n).to(h.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, weight, bias, t, lse = ctx.saved_tensors
        n, vocab = h.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = grad_out / n  # d(mean)/d(row loss)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for start in range(PAD_ID + 1, vocab, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, vocab)
            w_chunk = weight[start:stop]
            logits = F.linear(h, w_chunk, bias[start:stop]).to(lse.dtype)
            # softmax part of d(loss)/d(logits), (N, chunk); in place to keep one temporary.
            g = logits.sub_(lse[:, None]).exp_().mul_(scale).to(h.dtype)
            if need_h:
                grad_h.addmm_(g, w_chunk)
            if need_w:
                grad_w[start:stop] = g.t() @ h
            if need_b:
                grad_b[start:stop] = g.sum(dim=0)
        # The "- onehot" part: each row's target column gets -scale.
        minus = -scale.to(h.dtype)
        if need_h:
            grad_h.add_(weight[t] * minus)
        if need_w:
            grad_w.index_add_(0, t, h * minus)
        if need_b:
            grad_b.index_add_(0, t, minus.expand(n).contiguous())
        return grad_h, grad_w, grad_b, None, None


def chunked_softmax_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Same value and gradients as :func:`full_softmax_loss` without ever building (N, V) logits.

    hidden (B, L, C), targets (B, L) with 0 = ignore, head_weight (V, C), head_bias (V,) ->
    scalar. Peak extra memory is O(N * chunk_size) plus the (V, C) weight gradient; compute is
    about 1.5x the full loss (backward recomputes each chunk's logits). Not double-differentiable.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    h, t = _real_rows(hidden, targets)
    if t.numel() == 0:
        return _empty_loss(hidden, head_weight, head_bias)
    return _ChunkedSoftmaxCE.apply(h, head_weight, head_bias, t, chunk_size)


def uniform_log_q(num_items: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform proposal over real items: (V,) log-probabilities, -inf at the pad id 0."""
    if num_items < 2:
        raise ValueError(f"num_items must be >= 2 (pad + one item), got {num_items}")
    log_q = torch.full((num_items,), -math.log(num_items - 1), dtype=dtype, device=device)
    log_q[PAD_ID] = float("-inf")
    return log_q


def unigram_log_q(item_counts: torch.Tensor, power: float = 0.75, smoothing: float = 1.0) -> torch.Tensor:
    """Proposal Q(j) proportional to (count_j + smoothing) ** power over real items (word2vec-style).

    item_counts (V,) training-set occurrences per item id (index 0 ignored) -> (V,) float32
    log-probabilities, -inf at the pad id. ``smoothing`` > 0 keeps every real item sampleable:
    an item with Q = 0 would never appear as a negative, so its logit would never be pushed down
    and the log-Q estimate would stop converging to the full softmax.
    """
    counts = item_counts.detach().to(torch.float64).clamp(min=0) + smoothing
    weights = counts.pow(power)
    weights[PAD_ID] = 0.0
    total = weights.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError("unigram_log_q: item counts give no probability mass to any real item")
    return (weights / total).log().to(torch.float32)


def sampled_softmax_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    num_samples: int,
    log_q: torch.Tensor,
    generator: torch.Generator | None = None,
    correction: Literal["negatives", "all", "none"] = "negatives",
) -> torch.Tensor:
    """Sampled softmax with log-Q correction; negatives shared by the whole batch.

    hidden (B, L, C), targets (B, L) with 0 = ignore, head_weight (V, C), head_bias (V,),
    log_q (V,) log-probabilities of the proposal Q (-inf at pad) -> scalar.

    ``num_samples`` negatives are drawn from Q with replacement, once per call, and every row
    scores its true item plus those S negatives (logits (N, 1 + S)). A negative equal to the row's
    target (an accidental hit) is masked to -inf. ``correction``:

    - ``"negatives"`` (default): each negative's logit minus log(S * Q(j)), the log of its
      expected count. Then sum_k exp(logit'_k) is an unbiased estimate of the softmax
      denominator without the target, and the true logit (uncorrected) supplies the target's own
      term, so loss and gradients converge to the full softmax's as S grows (Blanc & Rendle,
      2018). The loss value is therefore comparable to the full cross-entropy.
    - ``"all"``: the true item's logit is corrected too (TensorFlow ``sampled_softmax_loss``).
      With accidental hits removed its denominator tends to exp(s_t)/(S Q(t)) + Z_-t, i.e. the
      target's own mass vanishes: the gradient tends to that of -s_t + log Z_-t, not of the full
      softmax (measurable when the target's probability is not tiny; see tests/test_losses.py).
    - ``"none"``: no correction; biased towards the items Q over-samples (ablation only).

    Every sampled-softmax gradient is biased for finite S (it is the gradient of a log of an
    estimate); the bias shrinks as O(1/S).
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    if correction not in ("negatives", "all", "none"):
        raise ValueError(f"correction must be 'negatives', 'all' or 'none', got {correction!r}")
    if log_q.shape != (head_weight.shape[0],):
        raise ValueError(f"log_q must have shape ({head_weight.shape[0]},), got {tuple(log_q.shape)}")
    h, t = _real_rows(hidden, targets)
    if t.numel() == 0:
        return _empty_loss(hidden, head_weight, head_bias)

    log_q = log_q.to(device=h.device)
    # multinomial needs (unnormalised) probabilities; the pad's -inf becomes 0 and is never drawn.
    probs = torch.exp(log_q.float() - log_q.float().max())
    neg = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # (S,)

    pos_logit = (h * head_weight[t]).sum(dim=1) + head_bias[t]  # (N,)
    neg_logit = F.linear(h, head_weight[neg], head_bias[neg])  # (N, S)
    log_expected = math.log(num_samples) + log_q.to(h.dtype)  # (V,) log(S * Q(j))
    if correction != "none":
        neg_logit = neg_logit - log_expected[neg]
    if correction == "all":
        pos_logit = pos_logit - log_expected[t]
    neg_logit = neg_logit.masked_fill(neg[None, :] == t[:, None], float("-inf"))

    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)  # (N, 1 + S); column 0 = truth
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def sequence_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    cfg: LossConfig,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss picked by ``cfg.kind``: hidden (B, L, C), targets (B, L) -> scalar.

    ``log_q`` (V,) is the sampled-softmax proposal; when it is None and ``cfg.sampler`` is
    uniform it is built here. A unigram proposal needs the item counts of the training data, so
    the caller must pass ``unigram_log_q(counts)``.
    """
    if cfg.kind == "full":
        return full_softmax_loss(hidden, targets, head_weight, head_bias)
    if cfg.kind == "chunked":
        return chunked_softmax_loss(hidden, targets, head_weight, head_bias, cfg.chunk_size)
    if cfg.kind == "sampled":
        if log_q is None:
            if cfg.sampler != "uniform":
                raise ValueError(
                    f"loss.sampler={cfg.sampler!r} needs log_q from the training item counts "
                    "(stackrec_dist.losses.unigram_log_q); only 'uniform' can be built here"
                )
            log_q = uniform_log_q(head_weight.shape[0], device=hidden.device)
        return sampled_softmax_loss(hidden, targets, head_weight, head_bias, cfg.num_samples, log_q)
    raise ValueError(f"unknown loss.kind {cfg.kind!r} (expected full, chunked or sampled)")
