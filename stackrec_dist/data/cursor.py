"""The cursor: what the consumer of a training stream has received, for exact resume.

Every emitted batch carries, per window, its unit and piece ids (``windows.py``). The loader in
the consumer's process records the pieces it *received* (not what workers prefetched) as a bitmap
per unit in flight and a bitmap of finished units. A resumed reader skips finished units and the
received pieces of unfinished ones: nothing is lost or repeated, whatever the shuffle buffer held.
Cursors of several ranks merge by union (``merge_cursors``), so a run can resume on another world
size: the union of the remaining units is restrided. Piece ids depend on the window layout
(``data.max_len`` and ``data.window_stride``), which the state records and a resume must match
(``check_window_layout``). States are plain types (checkpoints are loaded with
``weights_only=True``).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from .read_stats import ReadStats

CURSOR_VERSION = 1


def _pack(bits: np.ndarray) -> str:
    return base64.b64encode(np.packbits(bits.astype(np.bool_)).tobytes()).decode()


def _unpack(text: str, n: int) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(raw, count=n).astype(np.bool_) if n else np.zeros(0, np.bool_)


class Cursor:
    """What the consumer has received in the current epoch, per rank (or merged over ranks).

    ``done``: bool per unit, finished units. ``partial``: unit -> (total pieces, received bitmap).
    ``base``: units in the assignment pool of this layout (None = all); ``layout``: (world_size,
    workers) the pool was strided over. ``complete``: this rank's share of the epoch is done.
    """

    def __init__(self, num_units: int, epoch: int = 0) -> None:
        self.num_units = num_units
        self.epoch = epoch
        self.done = np.zeros(num_units, np.bool_)
        self.partial: dict[int, tuple[int, np.ndarray]] = {}
        self.base: np.ndarray | None = None
        self.layout: tuple[int, int] | None = None
        self.complete = False
        self.merged = False
        self.stats = ReadStats()

    def new_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.done[:] = False
        self.partial.clear()
        self.base = None
        self.layout = None
        self.complete = False
        self.merged = False
        self.stats = ReadStats()

    def seen(self, unit: int) -> bool:
        return bool(self.done[unit]) or unit in self.partial

    def record(self, meta: dict[str, Any]) -> None:
        """Account one received batch (its ``_cursor`` metadata); fails on a repeated piece."""
        for unit, total, bad_rows, bad_rg in meta["units"].tolist():
            if self.seen(unit):
                continue  # re-read after a resume: counted the first time
            self.stats.add_unit(bad_rows, bad_rg)
            if total == 0:
                self.done[unit] = True
            else:
                self.partial[unit] = (total, np.zeros(total, np.bool_))
        self.stats.add_quarantine(meta.get("quarantine", []))
        units = meta["unit"].numpy()
        pieces = meta["pieces"].numpy()
        if len(units) == 0:
            return
        self.stats.add_batch(len(units))
        k = pieces.shape[1]
        flat_units = np.repeat(units, k)
        flat_pieces = pieces.reshape(-1)
        keep = flat_pieces >= 0
        flat_units, flat_pieces = flat_units[keep], flat_pieces[keep]
        for unit in np.unique(flat_units).tolist():
            ids = flat_pieces[flat_units == unit]
            if self.done[unit] or unit not in self.partial:
                raise RuntimeError(f"reader bug: unit {unit} delivered after it was finished")
            total, bits = self.partial[unit]
            if bits[ids].any() or len(np.unique(ids)) != len(ids):
                raise RuntimeError(f"reader bug: unit {unit} pieces delivered twice")
            bits[ids] = True
            if bits.all():
                del self.partial[unit]
                self.done[unit] = True

    def state_dict(self, rank: int, world_size: int, dataset: str, split: str, seed: int,
                   max_len: int | None, window_stride: int | None) -> dict[str, Any]:
        return {
            "version": CURSOR_VERSION,
            "dataset": dataset,
            "split": split,
            "seed": seed,
            "max_len": max_len,
            "window_stride": window_stride,
            "epoch": self.epoch,
            "num_units": self.num_units,
            "rank": rank,
            "world_size": world_size,
            "merged": self.merged,
            "complete": self.complete,
            "done": _pack(self.done),
            "partial": {str(u): [t, _pack(b)] for u, (t, b) in sorted(self.partial.items())},
            "base": None if self.base is None else _pack(self.base),
            "layout": None if self.layout is None else list(self.layout),
            "stats": self.stats.counts(),
            "quarantine_files": list(self.stats.quarantine_files),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Cursor":
        n = int(state["num_units"])
        c = cls(n, int(state["epoch"]))
        c.done = _unpack(state["done"], n)
        c.partial = {int(u): (int(t), _unpack(b, int(t))) for u, (t, b) in state["partial"].items()}
        c.base = None if state.get("base") is None else _unpack(state["base"], n)
        c.layout = None if state.get("layout") is None else tuple(state["layout"])
        c.complete = bool(state.get("complete", False))
        c.merged = bool(state.get("merged", False))
        c.stats = ReadStats.from_counts(state.get("stats", {}), state.get("quarantine_files", []))
        return c


def merge_cursors(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Union of the cursors of all ranks of one run at one step: the global progress.

    All must come from the same dataset, split, seed and epoch (a checkpoint taken at one
    synchronized step). The result is ``merged``: loading it restrides the remaining units over
    the loading run's ranks and workers, whatever their number.
    """
    if not states:
        raise ValueError("merge_cursors needs at least one cursor")
    first = states[0]
    for key in ("version", "dataset", "split", "seed", "epoch", "num_units", "max_len", "window_stride"):
        values = {s.get(key) for s in states}
        if len(values) != 1:
            raise ValueError(f"cursors disagree on {key}: {sorted(map(str, values))}; they must come "
                             "from the ranks of one run saved at the same step")
    ranks = sorted(s["rank"] for s in states if not s["merged"])
    sizes = {s["world_size"] for s in states if not s["merged"]}
    if len(sizes) > 1:
        raise ValueError(f"cursors come from runs of different world sizes {sorted(sizes)}")
    if sizes and not any(s["merged"] for s in states):
        ws = sizes.pop()
        if ranks != list(range(ws)):
            raise ValueError(f"need the cursors of all {ws} ranks to merge, got ranks {ranks}")
    merged = Cursor(int(first["num_units"]), int(first["epoch"]))
    for s in states:
        c = Cursor.from_state(s)
        merged.done |= c.done
        merged.stats.merge(c.stats)
        for u, (t, bits) in c.partial.items():
            if u in merged.partial:
                merged.partial[u][1][:] |= bits
            else:
                merged.partial[u] = (t, bits.copy())
    for u in list(merged.partial):
        if merged.done[u] or merged.partial[u][1].all():
            merged.done[u] = True
            del merged.partial[u]
    merged.merged = True
    merged.complete = bool(merged.done.all())
    out = merged.state_dict(0, 1, first["dataset"], first["split"], int(first["seed"]), first.get("max_len"),
                            first.get("window_stride"))
    out["world_size"] = None
    out["rank"] = None
    return out


def check_window_layout(state: dict[str, Any], max_len: int, stride: int) -> None:
    """Refuse a cursor whose pieces were cut with another window layout: piece ids are positions in
    the pieces of ``data.max_len`` / ``data.window_stride`` (``windows.py``), so a cursor saved with
    one layout would skip or repeat windows of another. A cursor written before the layout was
    recorded was cut with stride = its max_len (unknown, taken as this reader's)."""
    saved_len = state.get("max_len") or max_len
    saved_stride = state.get("window_stride") or saved_len
    for field, saved, mine in (("data.max_len", saved_len, max_len), ("data.window_stride", saved_stride, stride)):
        if saved != mine:
            raise ValueError(f"data cursor was saved with {field}={saved}, this reader has {field}={mine}: "
                             "its pieces are cut differently; resume with the saved value or start the "
                             "stage afresh")
