"""Cutting sequences into windows with a stride (``data.window_stride``): every transition a target
exactly once, each with as much history as the stride promises; stride 0 / L is the old layout."""

from __future__ import annotations

import numpy as np
import pytest

from stackrec_dist.config import ConfigError, DataConfig, load_config
from stackrec_dist.data.manifest import SplitInfo
from stackrec_dist.data.windows import pad_windows, pairs_per_row, piece_bounds, pieces_per_row, row_pieces, unit_windows

# (L, S): S = 1 (every target its full history), S = L (no overlap), and in between.
LAYOUTS = [(2, 1), (2, 2), (4, 1), (4, 2), (5, 3), (8, 1), (8, 4), (8, 8), (10, 7), (16, 5)]


def _rows(rng, n_rows=40, hi=45):
    """A row group whose item ids are 1.. in order: value v sits at row ``row_of[v]``, position ``pos_of[v]``."""
    lengths = rng.integers(0, hi, size=n_rows)
    lengths[:4] = [0, 1, 2, 3]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.arange(1, offsets[-1] + 1, dtype=np.int64)
    row_of = np.concatenate([[-1], np.repeat(np.arange(n_rows), lengths)])
    pos_of = np.concatenate([[-1], values - 1 - offsets[:-1][row_of[1:]]])
    return values, offsets, lengths, row_of, pos_of


def _history(inputs, col, target, row_of, pos_of):
    """Items of the target's own sequence right before it in the window (its history in view)."""
    h = 0
    while col - h >= 0:
        v = inputs[col - h]
        if v == 0 or row_of[v] != row_of[target] or pos_of[v] != pos_of[target] - 1 - h:
            break
        h += 1
    return h


def _check(inputs, targets, values, offsets, lengths, row_of, pos_of, L, S, pack):
    expected = np.concatenate([values[o + 1:o + n] for o, n in zip(offsets[:-1], lengths) if n > 1])
    got = targets[targets > 0]
    assert sorted(got.tolist()) == expected.tolist()  # every transition a target exactly once
    for w, c in zip(*np.nonzero(targets)):
        t = targets[w, c]
        p = pos_of[t]  # items before the target in its sequence
        h = _history(inputs[w], c, t, row_of, pos_of)
        assert h >= min(L - S + 1, p)
        if pack == "pad":
            assert c >= L - S  # only the last S positions are targets
            assert h == min(c + 1, p)
        if S == 1:
            assert h == min(L, p)  # full history, as evaluation gives it


@pytest.mark.parametrize("L, S", LAYOUTS)
@pytest.mark.parametrize("pack", ["pad", "concat"])
def test_every_transition_once_with_its_history(L, S, pack):
    rng = np.random.default_rng([L, S])
    for _ in range(3):
        values, offsets, lengths, row_of, pos_of = _rows(rng)
        inputs, targets, pieces = unit_windows(values, offsets, lengths, None, L, pack, rng, True, S)
        _check(inputs, targets, values, offsets, lengths, row_of, pos_of, L, S, pack)
        # every piece is in exactly one window, and there are ceil((n-1)/S) of them per row
        ids = pieces[pieces >= 0]
        assert sorted(ids.tolist()) == list(range(int(pieces_per_row(lengths, S).sum())))
        if pack == "pad":
            assert len(inputs) == int(pieces_per_row(lengths, S).sum())
        # the (input, target) pairs laid out are what the manifest-side count says
        assert int((inputs > 0).sum()) == int(pairs_per_row(lengths, L, S).sum())


@pytest.mark.parametrize("L, S", LAYOUTS)
def test_partly_received_unit_gives_the_rest(L, S):
    """A resumed unit: the pieces not yet received give exactly their own targets (concat too)."""
    rng = np.random.default_rng([L, S, 1])
    values, offsets, lengths, _, _ = _rows(rng)
    n = int(pieces_per_row(lengths, S).sum())
    received = rng.random(n) < 0.5
    got = []
    for mask in (received, ~received):
        _, targets, pieces = unit_windows(values, offsets, lengths, mask, L, "concat", rng, True, S)
        assert not np.isin(pieces[pieces >= 0], np.flatnonzero(mask)).any()
        got += targets[targets > 0].tolist()
    expected = [v for o, m in zip(offsets[:-1], lengths) for v in values[o + 1:o + m]]
    assert sorted(got) == expected


def test_stride_layout_by_hand():
    L, S = 4, 2
    seq = np.arange(1, 11, dtype=np.int64)  # 10 items, 9 transitions -> ceil(9 / 2) = 5 pieces
    lengths, offsets = np.array([10]), np.array([0, 10])
    row, k = row_pieces(lengths, S)
    inputs, targets = pad_windows(seq, *piece_bounds(offsets, lengths, row, k, L, S), L, S)
    assert inputs.tolist() == [[6, 7, 8, 9], [4, 5, 6, 7], [2, 3, 4, 5], [0, 1, 2, 3], [0, 0, 0, 1]]
    assert targets.tolist() == [[0, 0, 9, 10], [0, 0, 7, 8], [0, 0, 5, 6], [0, 0, 3, 4], [0, 0, 0, 2]]


@pytest.mark.parametrize("pack", ["pad", "concat"])
@pytest.mark.parametrize("L", [2, 5, 10])
def test_stride_0_and_L_are_the_old_windows(pack, L):
    rng_data = np.random.default_rng(L)
    values, offsets, lengths, _, _ = _rows(rng_data)
    old = unit_windows(values, offsets, lengths, None, L, pack, np.random.default_rng(7), True)
    for S in (0, L):
        new = unit_windows(values, offsets, lengths, None, L, pack, np.random.default_rng(7), True, S)
        for a, b in zip(old, new):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert (pairs_per_row(lengths, L, L) == np.maximum(lengths - 1, 0)).all()


@pytest.mark.parametrize("L, S", LAYOUTS)
def test_manifest_counts_follow_the_stride(L, S):
    rng = np.random.default_rng([L, S, 2])
    lengths = rng.integers(0, 300, size=500)
    uniq, counts = np.unique(lengths, return_counts=True)
    info = SplitInfo(rows=len(lengths), length_histogram={"length": uniq.tolist(), "count": counts.tolist()})
    t = np.maximum(lengths - 1, 0)
    assert info.windows(L, S) == int(((t + S - 1) // S).sum())
    assert info.windows(L) == info.windows(L, L) == int(((t + L - 1) // L).sum())
    # pairs: piece k of a row holds min(L, t - k*S) of them, brute force
    assert info.pairs(L, S) == sum(min(L, n - k * S) for n in t.tolist() for k in range(-(-n // S)))
    assert info.pairs(L) == info.transitions()


def test_window_stride_is_validated():
    assert DataConfig(max_len=8).stride == 8 and DataConfig(max_len=8, window_stride=3).stride == 3
    for bad in (-1, 51):
        with pytest.raises(ConfigError, match=r"data\.window_stride must be in \[0, max_len=50\]"):
            load_config(None, [f"data.window_stride={bad}"])
    assert load_config(None, ["data.window_stride=50"]).data.stride == 50
