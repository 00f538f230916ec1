"""Losses: full vs hand cross-entropy, chunked == full (value and all gradients, bounded memory),
sampled softmax converging to the full softmax under log-Q correction and biased without it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from stackrec_dist.config import LossConfig
from stackrec_dist.losses import (
    chunked_softmax_loss,
    full_softmax_loss,
    sampled_softmax_loss,
    sequence_loss,
    uniform_log_q,
    unigram_log_q,
)


def _problem(B=3, L=5, C=8, V=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, C, generator=g, dtype=dtype)
    weight = torch.randn(V, C, generator=g, dtype=dtype) * 0.5
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(1, V, (B, L), generator=g)
    targets[0, :2] = 0  # left padding
    targets[-1, 0] = 0
    return hidden, targets, weight, bias


def _value_and_grads(fn, hidden, targets, weight, bias):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    loss = fn(leaves[0], targets, leaves[1], leaves[2])
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def test_full_matches_hand_cross_entropy():
    hidden, targets, weight, bias = _problem(dtype=torch.float64)
    loss = full_softmax_loss(hidden, targets, weight, bias)
    # By hand: softmax over items 1..V-1 only, at the non-pad targets only.
    total, n = 0.0, 0
    for b in range(targets.shape[0]):
        for i in range(targets.shape[1]):
            t = int(targets[b, i])
            if t == 0:
                continue
            logits = hidden[b, i] @ weight[1:].T + bias[1:]
            total += float(torch.logsumexp(logits, 0) - logits[t - 1])
            n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-12)
    # Same thing via F.cross_entropy on the non-pad rows with the pad column dropped.
    keep = targets.reshape(-1) != 0
    logits = hidden.reshape(-1, hidden.shape[-1])[keep] @ weight[1:].T + bias[1:]
    ref = F.cross_entropy(logits, targets.reshape(-1)[keep] - 1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)


def test_pad_column_gets_no_gradient():
    hidden, targets, weight, bias = _problem()
    for fn in (full_softmax_loss, lambda h, t, w, b: chunked_softmax_loss(h, t, w, b, 5)):
        _, (gh, gw, gb) = _value_and_grads(fn, hidden, targets, weight, bias)
        assert torch.all(gw[0] == 0) and gb[0] == 0
        # Pad target positions contribute nothing to the hidden gradient.
        assert torch.all(gh[0, :2] == 0) and torch.all(gh[-1, 0] == 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("chunk", [1, 5, 16, 36, 37, 1000])  # 36 = V - 1: the whole real catalogue
def test_chunked_equals_full(dtype, tol, chunk):
    hidden, targets, weight, bias = _problem(V=37, dtype=dtype)  # V - 1 = 36 not a multiple of 5 or 16
    full_value, full_grads = _value_and_grads(full_softmax_loss, hidden, targets, weight, bias)
    value, grads = _value_and_grads(
        lambda h, t, w, b: chunked_softmax_loss(h, t, w, b, chunk), hidden, targets, weight, bias
    )
    assert value.dtype == dtype
    torch.testing.assert_close(value, full_value, rtol=tol, atol=tol)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, full_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"grad {name} (chunk={chunk})")


def test_chunked_large_logits_are_stable():
    # float32 logits around 1e3: a naive exp would overflow; the online logsumexp must not. The
    # reference is float64 (at this scale float32 rounding of the logits alone is ~1e-4).
    hidden, targets, weight, bias = _problem(dtype=torch.float64)
    hidden = hidden * 300
    full_value, full_grads = _value_and_grads(full_softmax_loss, hidden, targets, weight, bias)
    value, grads = _value_and_grads(
        lambda h, t, w, b: chunked_softmax_loss(h, t, w, b, 7),
        hidden.float(), targets, weight.float(), bias.float(),
    )
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double(), full_value, rtol=1e-5, atol=1e-3)
    for got, want in zip(grads, full_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.max_numel = max(self.max_numel, x.numel())
        return out


def test_chunked_never_builds_n_by_v():
    B, L, C, V, chunk = 8, 32, 8, 5001, 128
    hidden, targets, weight, bias = _problem(B, L, C, V)
    n = int((targets != 0).sum())
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with _LargestTensor() as probe:
        loss = chunked_softmax_loss(leaves[0], targets, leaves[1], leaves[2], chunk)
        loss.backward()
    # Largest temporaries: an (N, chunk) block and the (V, C) weight gradient; never (N, V).
    assert probe.max_numel <= max(n * chunk, V * C, B * L * C)
    assert probe.max_numel < n * V // 10
    with _LargestTensor() as probe_full:
        full_softmax_loss(*[x.clone().requires_grad_() if x.is_floating_point() else x
                            for x in (hidden, targets, weight, bias)]).backward()
    assert probe_full.max_numel >= n * (V - 1)  # the probe does see the full logits (pad column excluded)


@pytest.mark.slow  # over 5 s on 2 cores
def test_chunked_runs_where_full_logits_would_exceed_1gb():
    # N * V * 4 bytes = 1000 * 270_001 * 4 ~ 1.08 GB; measured in a fresh process so that the
    # peak RSS reflects this computation alone.
    script = textwrap.dedent(
        """
        import resource, torch
        from stackrec_dist.losses import chunked_softmax_loss
        torch.manual_seed(0)
        N, C, V = 1000, 8, 270_001
        hidden = torch.randn(1, N, C, requires_grad=True)
        weight = (torch.randn(V, C) * 0.1).requires_grad_()
        bias = torch.zeros(V, requires_grad=True)
        targets = torch.randint(1, V, (1, N))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = chunked_softmax_loss(hidden, targets, weight, bias, 2048)
        loss.backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(loss) and weight.grad is not None
        print((after - before) * 1024)  # ru_maxrss is in KiB on Linux
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    extra_peak = int(out.stdout.strip().splitlines()[-1])
    # The full logits alone would be 1.08 GB; the chunked temporaries are a few (N, 2048) blocks.
    assert extra_peak < 400 * 2**20, f"chunked loss raised peak RSS by {extra_peak / 2**20:.0f} MiB"


def test_all_pad_batch_gives_zero_loss_and_zero_grads():
    hidden, _, weight, bias = _problem()
    targets = torch.zeros(hidden.shape[:2], dtype=torch.long)
    for kind in ("full", "chunked", "sampled"):
        value, grads = _value_and_grads(
            lambda h, t, w, b: sequence_loss(h, t, w, b, LossConfig(kind=kind, chunk_size=4, num_samples=8)),
            hidden, targets, weight, bias,
        )
        assert value.item() == 0.0
        assert all(torch.all(g == 0) for g in grads)


def test_sequence_loss_dispatch():
    hidden, targets, weight, bias = _problem()
    full = sequence_loss(hidden, targets, weight, bias, LossConfig(kind="full"))
    chunked = sequence_loss(hidden, targets, weight, bias, LossConfig(kind="chunked", chunk_size=6))
    torch.testing.assert_close(chunked, full)
    torch.manual_seed(0)
    sampled = sequence_loss(hidden, targets, weight, bias, LossConfig(kind="sampled", num_samples=16))
    assert torch.isfinite(sampled)
    with pytest.raises(ValueError, match="unigram"):
        sequence_loss(hidden, targets, weight, bias, LossConfig(kind="sampled", sampler="unigram"))
    log_q = unigram_log_q(torch.arange(weight.shape[0]).float())
    assert torch.isfinite(sequence_loss(hidden, targets, weight, bias,
                                         LossConfig(kind="sampled", sampler="unigram"), log_q=log_q))


def test_proposals():
    lq = uniform_log_q(5)
    assert lq[0] == float("-inf")
    torch.testing.assert_close(lq[1:].exp(), torch.full((4,), 0.25))
    counts = torch.tensor([7.0, 0.0, 3.0, 15.0])  # pad count ignored; the unseen item stays sampleable
    lq = unigram_log_q(counts, power=0.75)
    want = torch.tensor([1.0, 4.0, 16.0]) ** 0.75
    torch.testing.assert_close(lq[1:].exp(), want / want.sum())
    assert lq[0] == float("-inf")


def test_sampled_masks_accidental_hits_and_never_samples_pad():
    hidden, targets, weight, bias = _problem(V=4)
    # Q puts all mass on item 2: every negative is item 2, so rows whose target is 2 have only
    # masked negatives (loss exactly 0) and the pad id 0 is never drawn.
    log_q = torch.tensor([float("-inf"), float("-inf"), 0.0, float("-inf")])
    t = torch.full_like(targets, 2)
    t[0, :2] = 0
    loss = sampled_softmax_loss(hidden, t, weight, bias, 32, log_q)
    assert loss.item() == 0.0


# Toy problem for the consistency check: V = 11 (10 real items), C = 4, 6 target rows, float64,
# random logits of order 1 (so the targets' probabilities are not tiny), and a strongly
# non-uniform unigram proposal (counts 100, 50, 30, 20, 10, 5, 3, 2, 1, 1 -> Q from 0.27 to 0.02).
# We average the gradient w.r.t. (hidden, weight, bias) over 1000 draws and compare it with the
# full softmax gradient: relative error ||mean - full|| / ||full||. Measured with these seeds:
# log-Q on negatives 0.14 at S = 50 and 0.009 at S = 500 (an O(1/S) bias; standard error of the
# mean ~0.004); no correction 0.65; positive corrected too (TensorFlow's convention) 0.23, and
# that one does not shrink with S (0.25 / 0.28 / 0.32 at S = 20 / 100 / 500 on a similar toy).
def _sampled_gradient_error(correction, num_samples, draws=1000):
    hidden, _, weight, bias = _problem(B=1, L=6, C=4, V=11, dtype=torch.float64, seed=1)
    targets = torch.randint(1, 11, (1, 6), generator=torch.Generator().manual_seed(2))
    log_q = unigram_log_q(torch.tensor([0, 100, 50, 30, 20, 10, 5, 3, 2, 1, 1.0])).double()
    _, full = _value_and_grads(full_softmax_loss, hidden, targets, weight, bias)
    full = torch.cat([g.reshape(-1) for g in full])
    gen = torch.Generator().manual_seed(3)
    total = torch.zeros_like(full)
    for _ in range(draws):
        _, grads = _value_and_grads(
            lambda h, t, w, b: sampled_softmax_loss(h, t, w, b, num_samples, log_q, generator=gen, correction=correction),
            hidden, targets, weight, bias,
        )
        total += torch.cat([g.reshape(-1) for g in grads])
    return float((total / draws - full).norm() / full.norm())


def test_sampled_softmax_with_log_q_converges_to_full_softmax():
    small, large = _sampled_gradient_error("negatives", 50), _sampled_gradient_error("negatives", 500)
    assert large < 0.03
    assert large < small / 3  # the bias shrinks with more samples
    # Without correction the same Q gives a gradient that stays far from the full softmax's.
    assert _sampled_gradient_error("none", 500) > 0.3
    # Correcting the positive too (with accidental hits removed) drops the target's own softmax
    # mass in the limit: it does not converge either. This is why it is not the default.
    assert _sampled_gradient_error("all", 500) > 0.15


def test_sampled_loss_value_approaches_full_loss():
    hidden, targets, weight, bias = _problem(V=21, dtype=torch.float64)
    full = full_softmax_loss(hidden, targets, weight, bias).item()
    log_q = unigram_log_q(torch.arange(21.0) ** 2)
    gen = torch.Generator().manual_seed(0)
    values = [sampled_softmax_loss(hidden, targets, weight, bias, 2000, log_q, generator=gen).item()
              for _ in range(50)]
    assert sum(values) / len(values) == pytest.approx(full, rel=0.01)
