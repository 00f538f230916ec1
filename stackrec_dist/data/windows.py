"""Windows: cutting sequences into the fixed-length (inputs, targets) rows the model trains on.

A sequence of ``n`` items has ``n - 1`` next-item transitions. It is cut from the end into windows
of ``L + 1`` items overlapping by one item, so each window holds ``L`` transitions and the first
(shortest) is left-padded with 0 (targets 0 = ignored). Each such window is a *piece*, numbered
within its row group; a piece is the atom of exactly-once accounting (``cursor.py``).
With a stride ``S < L`` (``data.window_stride``) the pieces end every ``S`` transitions from the
end instead of every ``L``: each window still holds the ``L + 1`` items ending there, but only its
last ``S`` transitions are targets (the earlier ones are 0, they belong to the next piece), so a
transition is still a target exactly once, now with at least ``L - S + 1`` items of history.
``S = L`` is the non-overlapping layout above.
``pack="concat"`` packs the short pieces of a row group together into full windows. Evaluation
rows are cut once: the last L items before the target (``history_windows``). Pure NumPy.
"""

from __future__ import annotations

import numpy as np


def pieces_per_row(lengths: np.ndarray, S: int) -> np.ndarray:
    """Windows (pieces) of each row for stride S (= L without overlap): a row with n items has
    ceil((n-1)/S) of them (0 when n < 2)."""
    trans = np.maximum(lengths - 1, 0)
    return (trans + S - 1) // S


def pairs_per_row(lengths: np.ndarray, L: int, S: int) -> np.ndarray:
    """(input, target) pairs (non-pad positions) of each row's windows: piece k of a row with
    t = n - 1 transitions holds min(L, t - k*S) pairs; t when S = L, up to about t * L / S."""
    t = np.maximum(np.asarray(lengths, np.int64) - 1, 0)
    K = (t + S - 1) // S
    full = np.where(t >= L, (t - L) // S + 1, 0)  # pieces with L + 1 items
    short = (K - full) * t - S * (K * (K - 1) // 2 - full * (full - 1) // 2)  # sum of t - k*S, k >= full
    return full * L + short


def row_pieces(lengths: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, k) of every piece: row r with n items has ceil((n-1)/S) pieces, k counted from the end."""
    per_row = pieces_per_row(lengths, S)
    total = int(per_row.sum())
    row = np.repeat(np.arange(len(lengths)), per_row)
    first = np.cumsum(per_row) - per_row
    k = np.arange(total) - first[row]
    return row, k


def piece_bounds(offsets: np.ndarray, lengths: np.ndarray, row: np.ndarray, k: np.ndarray, L: int,
                 S: int | None = None):
    """(start, end) value indices of pieces: end exclusive (k * S before the row's end, S = L by
    default), at most L + 1 items."""
    end = offsets[row] + lengths[row] - k * (S or L)
    start = np.maximum(offsets[row], end - (L + 1))
    return start, end


def pad_windows(values: np.ndarray, start: np.ndarray, end: np.ndarray, L: int,
                S: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded windows of pieces: inputs ``w[:-1]``, targets ``w[1:]``; targets 0 under pads
    and, for a stride S < L, at the first L - S positions (the next piece's targets)."""
    idx = end[:, None] - (L + 1) + np.arange(L + 1)
    valid = idx >= start[:, None]
    w = np.where(valid, values[np.maximum(idx, 0)], 0)
    inputs = w[:, :-1]
    targets = w[:, 1:].copy()
    targets[~valid[:, :-1]] = 0  # the first real item has no predecessor inside the window
    targets[:, :L - (S or L)] = 0
    return inputs, targets


def concat_windows(values: np.ndarray, start: np.ndarray, end: np.ndarray, piece_ids: np.ndarray, L: int,
                   S: int | None = None):
    """Pack short pieces (fewer than L transitions) into windows, in the given order.

    The (input, target) pairs of consecutive pieces are laid side by side, right-aligned, the
    rest left-padded. No pair crosses a boundary (the last item of a piece is never an input
    whose target is the next piece's first item, i.e. the boundary target is 0/absent), but the
    causal conv does see the previous piece's items as context. With a stride S < L only the
    last S pairs of each piece keep their target (the earlier ones are the targets of the same
    row's next piece, itself packed somewhere). Returns inputs, targets (nwin, L) and the
    (nwin, L) piece ids of each window (-1 = unused slot).
    """
    m = (end - start - 1).astype(np.int64)
    n = len(m)
    if n == 0:
        z = np.zeros((0, L), np.int64)
        return z, z.copy(), np.full((0, L), -1, np.int64)
    win = np.empty(n, np.int64)
    off = np.empty(n, np.int64)
    w = fill = 0
    for i, mi in enumerate(m.tolist()):  # greedy first fit in order; pieces stay whole
        if fill + mi > L:
            w += 1
            fill = 0
        win[i] = w
        off[i] = fill
        fill += mi
    nwin = w + 1
    fills = np.bincount(win, weights=m, minlength=nwin).astype(np.int64)
    pos0 = L - fills[win] + off
    rep = np.repeat(np.arange(n), m)
    j = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
    col = pos0[rep] + j
    src = start[rep] + j
    inputs = np.zeros((nwin, L), np.int64)
    targets = np.zeros((nwin, L), np.int64)
    inputs[win[rep], col] = values[src]
    own = j >= m[rep] - (S or L)  # the piece's own (last S) transitions
    targets[win[rep[own]], col[own]] = values[src[own] + 1]
    first_in_win = np.searchsorted(win, np.arange(nwin))
    slot = np.arange(n) - first_in_win[win]
    pieces = np.full((nwin, L), -1, np.int64)
    pieces[win, slot] = piece_ids
    return inputs, targets, pieces


def unit_windows(values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, received: np.ndarray | None,
                 L: int, pack: str, rng: np.random.Generator, shuffle: bool, S: int | None = None):
    """(inputs, targets, pieces (n, K)) of the pieces of one row group not yet ``received``.

    ``values``/``offsets``/``lengths``: the row group's items, rows concatenated; ``received``: bool
    per piece (None = none yet). ``K`` is 1 for ``pack="pad"`` (one piece a window) and ``L`` for
    ``"concat"`` (-1 = unused slot); with ``shuffle`` the short pieces are packed in random order.
    ``S``: the stride between pieces (None = L, no overlap).
    """
    S = S or L
    row, k = row_pieces(lengths, S)
    ids = np.arange(len(row))
    if received is not None:
        keep = ~received
        row, k, ids = row[keep], k[keep], ids[keep]
    start, end = piece_bounds(offsets, lengths, row, k, L, S)
    if pack == "pad":
        inputs, targets = pad_windows(values, start, end, L, S)
        return inputs, targets, ids[:, None]
    full = (end - start) == L + 1
    fi, ft = pad_windows(values, start[full], end[full], L, S)
    fp = np.full((int(full.sum()), L), -1, np.int64)
    fp[:, 0] = ids[full]
    short = np.flatnonzero(~full)
    short = short[rng.permutation(len(short))] if shuffle else short
    si, st, sp = concat_windows(values, start[short], end[short], ids[short], L, S)
    return np.concatenate([fi, si]), np.concatenate([ft, st]), np.concatenate([fp, sp])


def history_windows(values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, L: int):
    """Evaluation rows of a row group: (inputs (m, L), targets (m,)) for the m rows with >= 2 items.

    ``inputs`` = the last L items before each row's last item, left-padded with 0; ``targets`` =
    the last item.
    """
    mine = np.flatnonzero(lengths >= 2)
    last = offsets[mine] + lengths[mine] - 1  # index of the target
    start = np.maximum(offsets[mine], last - L)
    idx = last[:, None] - L + np.arange(L)
    hist = np.where(idx >= start[:, None], values[np.maximum(idx, 0)], 0)
    return hist, values[last]
