"""Streaming reader of sequence Parquet: rank/worker striding, shuffle buffer, exact resume.

Read docs/data.md ("Streaming reader") for the design; in short:

* **Units.** The unit of work is one row group of one shard, numbered in manifest order
  (shard 0 row group 0 = unit 0, ...). Each epoch the units are permuted with a generator seeded
  by ``(seed, epoch)``, identical on every rank, and strided over the *global worker index*
  ``g = rank * W + worker_id`` of ``G = world_size * W`` workers (``W`` = DataLoader workers,
  at least 1). Data is never pre-split per world size.
* **Pieces.** A sequence of ``n`` items has ``n - 1`` next-item transitions. It is cut from the
  end into windows of ``L + 1`` items overlapping by one item, so each window holds ``L``
  transitions and the first (shortest) is left-padded with 0 (targets 0 = ignored). Each such
  window is a *piece*, numbered within its unit; a piece is the atom of exactly-once accounting.
  ``pack="concat"`` packs the short pieces of a row group together into full windows.
* **Cursor.** Every emitted batch carries, per window, its unit and piece ids. The
  :class:`StatefulLoader` in the consumer's process records the pieces it *received* (not what
  workers prefetched) as a bitmap per unit in flight and a bitmap of finished units. A resumed
  reader skips finished units and the received pieces of unfinished ones: nothing is lost or
  repeated, whatever the shuffle buffer held. Cursors of several ranks merge by union, so a run
  can resume on another world size: the union of the remaining units is restrided.
"""

from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stackrec_dist.config import DataConfig

from .errors import CorruptFileError, DataError, ManifestError, MissingShardError
from .manifest import Manifest, check_sequence_schema, file_digest, read_manifest
from .storage import StorageError, arrow_fs, display_path, is_local, is_s3, open_fs, retrying

CURSOR_VERSION = 1
QUARANTINE_DIR = "_quarantine"
_META = "_cursor"


# -- units and manifest ------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the reader's unit of work."""

    index: int  # position in manifest order over the split
    shard: int
    path: str  # full path inside the filesystem
    row_group: int


def _units(manifest: Manifest, root: str, split: str) -> list[Unit]:
    if split not in manifest.splits:
        raise ManifestError(
            f"split {split!r} not in the manifest (splits: {sorted(manifest.splits)})", path=root, field="splits"
        )
    units = []
    for s, shard in enumerate(manifest.splits[split].shards):
        path = posixpath.join(root, shard.path)
        for rg in range(shard.row_groups):
            units.append(Unit(len(units), s, path, rg))
    return units


def _fingerprint(manifest: Manifest, split: str) -> str:
    h = hashlib.sha1()
    for shard in manifest.splits[split].shards:
        h.update(f"{shard.path}:{shard.rows}:{shard.row_groups}:{shard.sha256};".encode())
    return h.hexdigest()[:16]


def epoch_order(num_units: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of units for ``epoch``: the same on every rank and worker."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_units)


# -- bitmaps in plain types (checkpoints are loaded with weights_only=True) -------------------


def _pack(bits: np.ndarray) -> str:
    return base64.b64encode(np.packbits(bits.astype(np.bool_)).tobytes()).decode()


def _unpack(text: str, n: int) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(raw, count=n).astype(np.bool_) if n else np.zeros(0, np.bool_)


# -- reading one unit --------------------------------------------------------------------------


@dataclass
class UnitData:
    """Decoded, validated item ids of one row group (bad rows already removed or raised)."""

    unit: Unit
    values: np.ndarray  # (total items,) int64, rows concatenated
    offsets: np.ndarray  # (rows + 1,) int64
    lengths: np.ndarray  # (rows,) int64; 0 for quarantined rows
    bad_rows: int = 0
    bad_row_group: bool = False
    quarantine_file: str | None = None


class _ShardReader:
    """Opens shards (an LRU of open files), checks them against the manifest, reads row groups.

    Used from one thread at a time (the read-ahead thread of a worker).
    """

    def __init__(self, fs: Any, root: str, manifest: Manifest, split: str, *, check_timestamps: bool,
                 verify_checksums: bool, max_open: int = 8, retry_s: float | None = None) -> None:
        self.fs = fs
        self.afs = arrow_fs(fs)
        self.root = root
        self.manifest = manifest
        self.split = split
        self.shards = manifest.splits[split].shards
        self.columns = ["item_ids", "timestamps"] if check_timestamps else ["item_ids"]
        self.verify_checksums = verify_checksums
        self.pre_buffer = is_s3(fs)
        self._open: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self.max_open = max_open
        self.retry_s = retry_s
        self._missing: dict[int, MissingShardError] = {}  # found missing after the retry budget

    def show(self, path: str) -> str:
        return display_path(self.fs, path)

    def _probe(self) -> None:
        """Called by ``retrying`` when a shard looks missing: raising means "outage, retry".

        Locally a missing file is missing if the manifest is still there. On an object store the
        shard was listed with its size when the reader started, and a store that is restarting
        answers 404 for objects it has not loaded yet (SeaweedFS does, while ``manifest.json``
        already answers): it is taken for an outage until ``data.storage_retry_s`` runs out, then
        reported as a missing shard.
        """
        if not is_local(self.fs):
            raise FileNotFoundError("listed in the manifest: retried as an outage")
        self.fs.info(posixpath.join(self.root, "manifest.json"))

    def parquet(self, shard: int, path: str) -> pq.ParquetFile:
        pf = self._open.get(shard)
        if pf is not None:
            self._open.move_to_end(shard)
            return pf
        if shard in self._missing:  # waited for once already: the next row groups fail at once
            raise self._missing[shard]
        shown = self.show(path)
        info = self.shards[shard]
        key = (shown, info.sha256, info.bytes)
        if self.verify_checksums and key not in _VERIFIED_SHARDS:
            digest, _ = retrying(lambda: file_digest(self.fs, path), shown, probe=self._probe,
                                 budget_s=self.retry_s)
            if digest != info.sha256:
                raise CorruptFileError(
                    f"sha256 {digest} != manifest {info.sha256}: the shard was changed after prepare "
                    "(prepare the dataset again)", path=shown)
            _VERIFIED_SHARDS.add(key)

        def _open() -> pq.ParquetFile:
            f = self.afs.open_input_file(path)
            try:
                return pq.ParquetFile(f, pre_buffer=self.pre_buffer)
            except Exception:
                f.close()
                raise

        try:
            pf = retrying(_open, shown, probe=self._probe, budget_s=self.retry_s)
        except StorageError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                self._missing[shard] = MissingShardError("shard listed in the manifest does not exist", path=shown)
                raise self._missing[shard] from err
            if _undecodable(err):
                raise CorruptFileError(f"not a readable Parquet file: {err.__cause__}", path=shown) from err
            raise
        except (pa.ArrowException, OSError, ValueError) as err:
            raise CorruptFileError(f"not a readable Parquet file: {err}", path=shown) from err
        check_sequence_schema(pf.schema_arrow, path=shown)
        md = pf.metadata
        if md.num_rows != info.rows:
            raise CorruptFileError(f"has {md.num_rows} rows, the manifest says {info.rows}", path=shown)
        if md.num_row_groups != info.row_groups:
            raise CorruptFileError(
                f"has {md.num_row_groups} row groups, the manifest says {info.row_groups}", path=shown
            )
        self._open[shard] = pf
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            try:
                old.close()
            except Exception:  # noqa: BLE001 - closing a read-only handle
                pass
        return pf

    def drop(self, shard: int) -> None:
        self._open.pop(shard, None)

    def read(self, unit: Unit) -> pa.Table:
        shown = self.show(unit.path)
        what = f"{shown} row group {unit.row_group}"

        def _read() -> pa.Table:
            pf = self.parquet(unit.shard, unit.path)
            try:
                return pf.read_row_group(unit.row_group, columns=self.columns)
            except Exception:
                self.drop(unit.shard)  # reopen on the next try (connection state, footer)
                raise

        try:
            return retrying(_read, what, probe=self._probe, budget_s=self.retry_s)
        except StorageError as err:
            if _undecodable(err):
                raise CorruptFileError(f"cannot decode: {err.__cause__}", path=shown, row_group=unit.row_group) from err
            raise
        except DataError:
            raise
        except (pa.ArrowException, OSError, ValueError) as err:
            raise CorruptFileError(f"cannot decode: {err}", path=shown, row_group=unit.row_group) from err

    def rows_in(self, unit: Unit) -> int:
        try:
            return self.parquet(unit.shard, unit.path).metadata.row_group(unit.row_group).num_rows
        except DataError:
            return 0


# Shards whose sha256 matched the manifest, and whose footer matched it, in this process:
# (shown path, sha256, bytes). Checked once per process (SequenceStream.verify_shards, or the
# first read with verify_at_start=False), not on every epoch or validation.
_VERIFIED_SHARDS: set[tuple[str, str, int]] = set()
_FOOTERS_OK: set[tuple[str, str, int]] = set()


def _undecodable(err: StorageError) -> bool:
    """A permanent failure raised by Arrow itself while decoding (not by the filesystem)."""
    cause = err.__cause__
    if err.transient or cause is None:
        return False
    return isinstance(cause, pa.ArrowException) or (type(cause) is OSError and cause.errno is None)


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values int64, lengths int64, row is null, offsets) of a list column; nulls have length 0."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    isnull = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(n, np.bool_)
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = col.flatten()
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return flat, lengths, isnull, offsets


def validate_rows(table: pa.Table, num_items: int, *, min_length: int, path: str, row_group: int,
                  field_check_timestamps: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str, str]]]:
    """Check every row of a row group; return (values, offsets, lengths, bad rows).

    ``bad rows`` is a list of ``(row, field, reason)``, sorted by row, one entry per bad row (the
    first problem found). ``values`` are int64 item ids with rows concatenated in order.
    """
    flat, lengths, isnull, offsets = _list_parts(table.column("item_ids"))
    n = len(lengths)
    problems: dict[int, tuple[str, str]] = {}

    def flag(rows: np.ndarray, field: str, reason_fn) -> None:
        for r in rows.tolist():
            if r not in problems:
                problems[r] = (field, reason_fn(r))

    flag(np.flatnonzero(isnull), "item_ids", lambda r: "null sequence")
    flag(np.flatnonzero(~isnull & (lengths == 0)), "item_ids", lambda r: "empty sequence")
    if min_length > 1:
        flag(np.flatnonzero(~isnull & (lengths > 0) & (lengths < min_length)), "item_ids",
             lambda r: f"{lengths[r]} item(s); an evaluation row needs history + target (>= {min_length})")
    if flat.null_count:
        nulls = np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))
        rows = np.searchsorted(offsets, nulls, side="right") - 1
        flag(np.unique(rows), "item_ids", lambda r: "null item id inside the sequence")
        flat = flat.fill_null(0)
    values = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    bad_vals = (values < 1) | (values >= num_items)
    if bad_vals.any():
        pos = np.flatnonzero(bad_vals)
        rows = np.searchsorted(offsets, pos, side="right") - 1
        first_pos = {}
        for p, r in zip(pos.tolist(), rows.tolist()):
            first_pos.setdefault(r, p)

        def why(r: int) -> str:
            p = first_pos[r]
            v = int(values[p])
            k = p - int(offsets[r])
            if v < 1:
                return f"item id {v} at position {k} < 1 (0 is the pad id; real ids are 1..{num_items - 1})"
            return f"item id {v} at position {k} >= num_items {num_items}"

        flag(np.array(sorted(first_pos)), "item_ids", why)
    if field_check_timestamps and "timestamps" in table.column_names:
        _, ts_len, ts_null, _ = _list_parts(table.column("timestamps"))
        flag(np.flatnonzero(ts_null & ~isnull), "timestamps", lambda r: "null timestamps")
        mismatch = np.flatnonzero((ts_len != lengths) & ~ts_null & ~isnull)
        flag(mismatch, "timestamps",
             lambda r: f"{ts_len[r]} timestamps for {lengths[r]} item ids (lengths must match)")
    bad = sorted((r, f, why) for r, (f, why) in problems.items())
    if bad:
        lengths = lengths.copy()
        lengths[[r for r, _, _ in bad]] = 0
    return values, offsets, lengths, bad


# -- windows -----------------------------------------------------------------------------------


def pieces_per_row(lengths: np.ndarray, L: int) -> np.ndarray:
    """Windows (pieces) of each row: a row with n items has ceil((n-1)/L) of them (0 when n < 2)."""
    trans = np.maximum(lengths - 1, 0)
    return (trans + L - 1) // L


def row_pieces(lengths: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, k) of every piece: row r with n items has ceil((n-1)/L) pieces, k counted from the end."""
    per_row = pieces_per_row(lengths, L)
    total = int(per_row.sum())
    row = np.repeat(np.arange(len(lengths)), per_row)
    first = np.cumsum(per_row) - per_row
    k = np.arange(total) - first[row]
    return row, k


def piece_bounds(offsets: np.ndarray, lengths: np.ndarray, row: np.ndarray, k: np.ndarray, L: int):
    """(start, end) value indices of pieces: end exclusive, at most L + 1 items."""
    end = offsets[row] + lengths[row] - k * L
    start = np.maximum(offsets[row], end - (L + 1))
    return start, end


def pad_windows(values: np.ndarray, start: np.ndarray, end: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded windows of pieces: inputs ``w[:-1]``, targets ``w[1:]``; targets 0 under pads."""
    idx = end[:, None] - (L + 1) + np.arange(L + 1)
    valid = idx >= start[:, None]
    w = np.where(valid, values[np.maximum(idx, 0)], 0)
    inputs = w[:, :-1]
    targets = w[:, 1:].copy()
    targets[~valid[:, :-1]] = 0  # the first real item has no predecessor inside the window
    return inputs, targets


def concat_windows(values: np.ndarray, start: np.ndarray, end: np.ndarray, piece_ids: np.ndarray, L: int):
    """Pack short pieces (fewer than L transitions) into windows, in the given order.

    The (input, target) pairs of consecutive pieces are laid side by side, right-aligned, the
    rest left-padded. No pair crosses a boundary (the last item of a piece is never an input
    whose target is the next piece's first item, i.e. the boundary target is 0/absent), but the
    causal conv does see the previous piece's items as context. Returns inputs, targets (nwin, L)
    and the (nwin, L) piece ids of each window (-1 = unused slot).
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
    targets[win[rep], col] = values[src + 1]
    first_in_win = np.searchsorted(win, np.arange(nwin))
    slot = np.arange(n) - first_in_win[win]
    pieces = np.full((nwin, L), -1, np.int64)
    pieces[win, slot] = piece_ids
    return inputs, targets, pieces


# -- the cursor --------------------------------------------------------------------------------


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
        self.stats = {"bad_rows": 0, "bad_row_groups": 0, "windows": 0, "batches": 0}
        self.quarantine_files: list[str] = []

    def new_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.done[:] = False
        self.partial.clear()
        self.base = None
        self.layout = None
        self.complete = False
        self.merged = False
        self.stats = {k: 0 for k in self.stats}
        self.quarantine_files = []

    def seen(self, unit: int) -> bool:
        return bool(self.done[unit]) or unit in self.partial

    def record(self, meta: dict[str, Any]) -> None:
        """Account one received batch (its ``_cursor`` metadata); fails on a repeated piece."""
        for unit, total, bad_rows, bad_rg in meta["units"].tolist():
            if self.seen(unit):
                continue  # re-read after a resume: counted the first time
            self.stats["bad_rows"] += bad_rows
            self.stats["bad_row_groups"] += bad_rg
            if total == 0:
                self.done[unit] = True
            else:
                self.partial[unit] = (total, np.zeros(total, np.bool_))
        self.quarantine_files.extend(f for f in meta.get("quarantine", []) if f not in self.quarantine_files)
        units = meta["unit"].numpy()
        pieces = meta["pieces"].numpy()
        if len(units) == 0:
            return
        self.stats["windows"] += len(units)
        self.stats["batches"] += 1
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

    def state_dict(self, rank: int, world_size: int, dataset: str, split: str, seed: int) -> dict[str, Any]:
        return {
            "version": CURSOR_VERSION,
            "dataset": dataset,
            "split": split,
            "seed": seed,
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
            "stats": dict(self.stats),
            "quarantine_files": list(self.quarantine_files),
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
        c.stats.update(state.get("stats", {}))
        c.quarantine_files = list(state.get("quarantine_files", []))
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
    for key in ("version", "dataset", "split", "seed", "epoch", "num_units"):
        values = {s[key] for s in states}
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
        for k, v in c.stats.items():
            merged.stats[k] = merged.stats.get(k, 0) + v
        merged.quarantine_files += [f for f in c.quarantine_files if f not in merged.quarantine_files]
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
    out = merged.state_dict(0, 1, first["dataset"], first["split"], int(first["seed"]))
    out["world_size"] = None
    out["rank"] = None
    return out


# -- the dataset -------------------------------------------------------------------------------


class SequenceStream(IterableDataset):
    """Training windows of one split, as collated batches ``{"inputs", "targets"}`` of (b, L) int64.

    ``b = data_cfg.batch_size // world_size`` (the global batch is split over ranks); every
    worker emits its last partial batch. Iterating yields the rest of the epoch described by the
    cursor set with :meth:`set_cursor` (a fresh epoch 0 by default). Use it through
    :class:`StatefulLoader` (``build_train_loader``), which owns the cursor; batches from this
    class carry an extra ``"_cursor"`` entry with their unit/piece ids that the loader strips.

    ``stats`` (in-process iteration): bad rows / row groups met, windows and batches emitted.
    """

    def __init__(self, data_cfg: DataConfig, split: str = "train", rank: int = 0, world_size: int = 1, *,
                 check_timestamps: bool = True, verify_checksums: bool | None = None, prefetch: int = 2,
                 quarantine_dir: str | None = None, verify_at_start: bool = True) -> None:
        super().__init__()
        data_cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if data_cfg.batch_size < world_size:
            raise ValueError(f"data.batch_size {data_cfg.batch_size} < world size {world_size}: "
                             "each rank needs at least one sequence per step")
        self.cfg = data_cfg
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.batch_size = data_cfg.batch_size // world_size
        self.L = data_cfg.max_len
        self.check_timestamps = check_timestamps
        self.verify_checksums = data_cfg.verify_checksums if verify_checksums is None else verify_checksums
        self.prefetch = max(0, prefetch)
        fs, root = open_fs(data_cfg.path, data_cfg.storage_options)
        self.root = root
        self.shown_root = display_path(fs, root)
        # Validate before training: manifest fields, every shard exists with its recorded size.
        self.manifest = _read_manifest(fs, root, data_cfg.storage_retry_s)
        self.units = _units(self.manifest, root, split)
        self.num_items = self.manifest.num_items
        self.fingerprint = _fingerprint(self.manifest, split)
        self.quarantine_dir = quarantine_dir or posixpath.join(root, QUARANTINE_DIR, split)
        self.cursor = Cursor(len(self.units))
        self.stats = {"bad_rows": 0, "bad_row_groups": 0, "windows": 0, "batches": 0}
        self._fs = fs
        self._fs_pid = os.getpid()
        self.verified_at_start = verify_at_start
        if verify_at_start:
            self.verify_shards()

    def verify_shards(self) -> None:
        """Check every shard of the split before any batch: sha256 against the manifest (when
        ``verify_checksums``; reads each shard once), then the footer: decodable, schema, row and
        row group counts as in the manifest. Raises CorruptFileError / SchemaError naming the shard.
        Done once per shard and process (evaluation builds a stream per validation)."""
        reader = _ShardReader(self._fs, self.root, self.manifest, self.split, check_timestamps=False,
                              verify_checksums=self.verify_checksums, max_open=1,
                              retry_s=self.cfg.storage_retry_s)
        for s, shard in enumerate(self.manifest.splits[self.split].shards):
            path = posixpath.join(self.root, shard.path)
            key = (reader.show(path), shard.sha256, shard.bytes)
            if key not in _FOOTERS_OK or (self.verify_checksums and key not in _VERIFIED_SHARDS):
                reader.parquet(s, path)
                reader.drop(s)
                _FOOTERS_OK.add(key)

    # fs objects hold event loops and sockets: rebuild them in each process.
    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_fs"] = None
        return d

    @property
    def fs(self) -> Any:
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, _ = open_fs(self.cfg.path, self.cfg.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def set_cursor(self, cursor: Cursor) -> None:
        self.cursor = cursor

    # -- assignment ---------------------------------------------------------------------------

    def layout_units(self, cursor: Cursor, workers: int) -> list[list[int]]:
        """Units of every global worker ``g`` under ``cursor``'s pool, in epoch order."""
        G = self.world_size * workers
        order = epoch_order(len(self.units), self.cfg.seed, cursor.epoch)
        pool = order if cursor.base is None else order[cursor.base[order]]
        return [pool[g::G].tolist() for g in range(G)]

    def worker_units(self, cursor: Cursor, worker_id: int, workers: int) -> list[int]:
        g = self.rank * workers + worker_id
        mine = self.layout_units(cursor, workers)[g]
        return [u for u in mine if not cursor.done[u]]

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cursor = self.cursor
        if cursor.layout is None:
            cursor.layout = (self.world_size, workers)
            if cursor.base is None:
                cursor.base = ~cursor.done
        if tuple(cursor.layout) != (self.world_size, workers):
            raise ValueError(f"cursor layout {cursor.layout} != (world_size, workers) "
                             f"({self.world_size}, {workers}); load a merged cursor to change it")
        units = self.worker_units(cursor, worker_id, workers)
        g = self.rank * workers + worker_id
        rng = np.random.default_rng([self.cfg.seed, cursor.epoch, g, 0xB0F])
        if info is None:
            yield from self._batches(units, cursor, rng, g)
            return
        try:
            yield from self._batches(units, cursor, rng, g)
        except (DataError, StorageError) as err:
            # Hand the error itself to the main process: the DataLoader would re-raise only its
            # type and text, losing path / row_group / row / field.
            yield {_META: {"error": err}}

    def _reader(self) -> _ShardReader:
        return _ShardReader(self.fs, self.root, self.manifest, self.split,
                            check_timestamps=self.check_timestamps,
                            verify_checksums=self.verify_checksums and not self.verified_at_start,
                            retry_s=self.cfg.storage_retry_s)

    def _load_unit(self, reader: _ShardReader, unit: Unit, min_length: int = 1) -> UnitData:
        """Read + validate one unit; bad rows raise, or are quarantined when configured."""
        shown = reader.show(unit.path)
        try:
            table = reader.read(unit)
        except CorruptFileError as err:
            # Only an undecodable row group is quarantined; a file that disagrees with the
            # manifest (rows, checksum) or cannot be opened fails the run.
            if not self.cfg.quarantine or err.row_group is None:
                raise
            rows = reader.rows_in(unit)
            qfile = self._quarantine(unit, shown, [(-1, "*", str(err))], None, None)
            empty = np.zeros(0, np.int64)
            return UnitData(unit, empty, np.zeros(1, np.int64), empty, bad_rows=rows, bad_row_group=True,
                            quarantine_file=qfile)
        values, offsets, lengths, bad = validate_rows(
            table, self.num_items, min_length=min_length, path=shown, row_group=unit.row_group
        )
        data = UnitData(unit, values, offsets, lengths)
        if bad:
            if not self.cfg.quarantine:
                row, field, why = bad[0]
                extra = f" (and {len(bad) - 1} more bad rows in this row group)" if len(bad) > 1 else ""
                raise DataError(why + extra, path=shown, row_group=unit.row_group, row=row, field=field)
            data.bad_rows = len(bad)
            data.quarantine_file = self._quarantine(unit, shown, bad, table, offsets)
        return data

    def _quarantine(self, unit: Unit, shown: str, bad: list[tuple[int, str, str]], table: pa.Table | None,
                    offsets: np.ndarray | None) -> str:
        """Write the bad rows of a unit aside; one file per unit, so a re-read rewrites it identically."""
        items: list[Any] = [None] * len(bad)
        stamps: list[Any] = [None] * len(bad)
        if table is not None:
            rows = [r for r, _, _ in bad]
            items = table.column("item_ids").take(rows).to_pylist()
            if "timestamps" in table.column_names:
                stamps = table.column("timestamps").take(rows).to_pylist()
        out = pa.table({
            "source": pa.array([shown] * len(bad), pa.string()),
            "row_group": pa.array([unit.row_group] * len(bad), pa.int32()),
            "row": pa.array([r for r, _, _ in bad], pa.int64()),
            "field": pa.array([f for _, f, _ in bad], pa.string()),
            "reason": pa.array([w for _, _, w in bad], pa.string()),
            "item_ids": pa.array(items, pa.list_(pa.int64())),
            "timestamps": pa.array(stamps, pa.list_(pa.int64())),
        })
        name = f"shard{unit.shard:05d}-rg{unit.row_group:05d}.parquet"
        path = posixpath.join(self.quarantine_dir, name)
        fs = self.fs

        def _write() -> None:
            fs.makedirs(self.quarantine_dir, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with fs.open(tmp, "wb") as f:
                pq.write_table(out, f)
            fs.mv(tmp, path)

        retrying(_write, display_path(fs, path), budget_s=self.cfg.storage_retry_s)
        return display_path(fs, path)

    def _read_ahead(self, units: list[int], min_length: int = 1) -> Iterator[UnitData]:
        """Decoded units in order; the next ``prefetch`` are read in a background thread."""
        reader = self._reader()
        if self.prefetch == 0:
            for u in units:
                yield self._load_unit(reader, self.units[u], min_length)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stackrec-read")
        pending: list[Future] = []
        try:
            it = iter(units)
            for u in it:
                pending.append(pool.submit(self._load_unit, reader, self.units[u], min_length))
                if len(pending) > self.prefetch:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _unit_windows(self, data: UnitData, cursor: Cursor, rng: np.random.Generator):
        """(inputs, targets, pieces (n, K)) of the not-yet-received pieces of one unit."""
        L = self.L
        row, k = row_pieces(data.lengths, L)
        ids = np.arange(len(row))
        if data.unit.index in cursor.partial:
            _, got = cursor.partial[data.unit.index]
            keep = ~got
            row, k, ids = row[keep], k[keep], ids[keep]
        start, end = piece_bounds(data.offsets, data.lengths, row, k, L)
        if self.cfg.pack == "pad":
            inputs, targets = pad_windows(data.values, start, end, L)
            return inputs, targets, ids[:, None]
        full = (end - start) == L + 1
        fi, ft = pad_windows(data.values, start[full], end[full], L)
        fp = np.full((int(full.sum()), L), -1, np.int64)
        fp[:, 0] = ids[full]
        short = np.flatnonzero(~full)
        short = short[rng.permutation(len(short))] if self.cfg.shuffle_buffer > 1 else short
        si, st, sp = concat_windows(data.values, start[short], end[short], ids[short], L)
        return np.concatenate([fi, si]), np.concatenate([ft, st]), np.concatenate([fp, sp])

    def _batches(self, units: list[int], cursor: Cursor, rng: np.random.Generator, g: int):
        L, b = self.L, self.batch_size
        K = 1 if self.cfg.pack == "pad" else L
        S = self.cfg.shuffle_buffer
        buf_i = np.zeros((0, L), np.int64)
        buf_t = np.zeros((0, L), np.int64)
        buf_p = np.zeros((0, K), np.int64)
        buf_u = np.zeros(0, np.int64)
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        out_n = 0
        new_units: list[list[int]] = []
        qfiles: list[str] = []

        def batch(n: int) -> dict[str, Any]:
            nonlocal out, out_n
            cat = [np.concatenate([o[j] for o in out]) if out else np.zeros((0,) + ((L,) if j < 2 else (K,) if j == 2 else ()), np.int64) for j in range(4)]
            take = [a[:n] for a in cat]
            rest = [a[n:] for a in cat]
            out = [tuple(rest)] if len(rest[0]) else []
            out_n = len(rest[0])
            meta = {
                "unit": torch.from_numpy(np.ascontiguousarray(take[3])),
                "pieces": torch.from_numpy(np.ascontiguousarray(take[2])),
                "units": torch.tensor(new_units, dtype=torch.int64).reshape(-1, 4),
                "quarantine": list(qfiles),
                "worker": g,
            }
            new_units.clear()
            qfiles.clear()
            self.stats["windows"] += n
            self.stats["batches"] += 1 if n else 0
            return {
                "inputs": torch.from_numpy(np.ascontiguousarray(take[0])),
                "targets": torch.from_numpy(np.ascontiguousarray(take[1])),
                _META: meta,
            }

        for data in self._read_ahead(units):
            u = data.unit.index
            total = int(row_pieces(data.lengths, L)[0].shape[0])
            new_units.append([u, total, data.bad_rows, int(data.bad_row_group)])
            if not cursor.seen(u):
                self.stats["bad_rows"] += data.bad_rows
                self.stats["bad_row_groups"] += int(data.bad_row_group)
            if data.quarantine_file:
                qfiles.append(data.quarantine_file)
            inputs, targets, pieces = self._unit_windows(data, cursor, rng)
            unit_col = np.full(len(inputs), u, np.int64)
            if S > 1:
                buf_i = np.concatenate([buf_i, inputs])
                buf_t = np.concatenate([buf_t, targets])
                buf_p = np.concatenate([buf_p, pieces])
                buf_u = np.concatenate([buf_u, unit_col])
                excess = len(buf_i) - S
                if excess > 0:
                    perm = rng.permutation(len(buf_i))
                    emit, keep = perm[:excess], perm[excess:]
                    out.append((buf_i[emit], buf_t[emit], buf_p[emit], buf_u[emit]))
                    out_n += excess
                    buf_i, buf_t, buf_p, buf_u = buf_i[keep], buf_t[keep], buf_p[keep], buf_u[keep]
            else:
                out.append((inputs, targets, pieces, unit_col))
                out_n += len(inputs)
            while out_n >= b:
                yield batch(b)
        if len(buf_i):
            perm = rng.permutation(len(buf_i))
            out.append((buf_i[perm], buf_t[perm], buf_p[perm], buf_u[perm]))
            out_n += len(buf_i)
        while out_n >= b:
            yield batch(b)
        if out_n or new_units or qfiles:
            yield batch(out_n)  # the last partial batch, or metadata only (units without windows)


# -- the loader --------------------------------------------------------------------------------


class StatefulLoader:
    """Iterates a :class:`SequenceStream` through a DataLoader and owns its cursor.

    ``for batch in loader`` yields the rest of the current epoch: ``{"inputs", "targets"}``,
    (b, L) int64. When an epoch has been read to its end, the next iteration starts the next
    epoch. ``state_dict()`` describes exactly the batches this process has received, whatever the
    DataLoader workers have prefetched; ``load_state_dict`` continues from it.

    With several ranks, ``state_dict()`` is this rank's cursor. A checkpoint can store either
    ``global_state_dict()`` (all ranks' cursors merged; gathers over torch.distributed when it
    is initialised) and load it on any world size, or every rank's own ``state_dict()`` and load
    it on the same world size and workers; ``load_state_dict([s0, s1, ...])`` merges a list.
    """

    def __init__(self, dataset: SequenceStream, num_workers: int | None = None,
                 prefetch_factor: int = 4, multiprocessing_context: str | None = None) -> None:
        self.dataset = dataset
        self.num_workers = dataset.cfg.num_workers if num_workers is None else num_workers
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.cursor = Cursor(len(dataset.units))
        self._gen: Iterator | None = None

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    @property
    def stats(self) -> dict[str, Any]:
        return {**self.cursor.stats, "quarantine_files": list(self.cursor.quarantine_files)}

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless the cursor is already inside it."""
        if epoch != self.cursor.epoch:
            self._close()
            self.cursor.new_epoch(epoch)

    def _workers(self) -> int:
        return max(1, self.num_workers)

    def _close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def close(self) -> None:
        """Stop the DataLoader workers of an unfinished iteration (the cursor is kept)."""
        self._close()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._close()
        # A module-level generator holding no reference to ``self``: dropping the loader
        # finalises it at once (no reference cycle left for the GC, whose late shutdown of
        # DataLoader workers takes seconds).
        self._gen = _run_epoch(self.dataset, self.cursor, self.num_workers, self.prefetch_factor,
                               self.multiprocessing_context)
        return self._gen

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return self.cursor.state_dict(d.rank, d.world_size, d.fingerprint, d.split, d.cfg.seed)

    def global_state_dict(self) -> dict[str, Any]:
        """The merged cursor of all ranks (every rank gets the same); local when not distributed."""
        state = self.state_dict()
        if self.dataset.world_size == 1:
            return merge_cursors([state])
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("global_state_dict with world_size > 1 needs torch.distributed initialised; "
                               "or save every rank's state_dict() and pass them all to load_state_dict")
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, state)
        return merge_cursors(gathered)

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        if isinstance(state, (list, tuple)):
            state = merge_cursors(list(state))
        d = self.dataset
        if state.get("version") != CURSOR_VERSION:
            raise ValueError(f"data cursor version {state.get('version')} != {CURSOR_VERSION}")
        for key, mine in (("dataset", d.fingerprint), ("split", d.split), ("num_units", len(d.units)),
                          ("seed", d.cfg.seed)):
            if state[key] != mine:
                raise ValueError(f"data cursor is for {key}={state[key]!r}, this reader has {mine!r}: "
                                 "a cursor only resumes the dataset/split/seed it was saved from")
        if not state["merged"]:
            layout = state.get("layout")
            if (state["world_size"], state["rank"]) != (d.world_size, d.rank) or (
                    layout is not None and list(layout) != [d.world_size, self._workers()]):
                raise ValueError(
                    f"data cursor of rank {state['rank']}/{state['world_size']} (layout {state['layout']}) "
                    f"cannot resume rank {d.rank}/{d.world_size} with {self._workers()} worker(s): pass the "
                    "cursors of all ranks (or a merged one) to restride the remaining work")
        self._close()
        self.cursor = Cursor.from_state(state)


def _rank_units(dataset: SequenceStream, cursor: Cursor, workers: int) -> list[int]:
    lay = dataset.layout_units(cursor, workers)
    return [u for w in range(workers) for u in lay[dataset.rank * workers + w]]


def _run_epoch(dataset: SequenceStream, c: Cursor, num_workers: int, prefetch_factor: int,
               mp_context: str | None) -> Iterator[dict[str, torch.Tensor]]:
    """The rest of the cursor's epoch (or the next one when it is complete), recording receipts."""
    if c.complete or c.done.all():
        c.new_epoch(c.epoch + 1)
    W = max(1, num_workers)
    if c.merged or c.layout is None:
        # Fresh epoch, or a merged cursor (possibly from another world size): the remaining
        # units form the new pool, strided over this run's ranks x workers.
        c.base = ~c.done
        c.layout = (dataset.world_size, W)
        c.merged = False
    dataset.set_cursor(c)
    if num_workers > 0:
        dl = DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch_factor,
                        persistent_workers=False, multiprocessing_context=mp_context)
    else:
        dl = dataset
    it = iter(dl)
    try:
        for item in it:
            meta = item.pop(_META)
            if "error" in meta:
                raise meta["error"]
            c.record(meta)
            if item["inputs"].shape[0] == 0:
                continue
            yield item
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        elif hasattr(it, "close"):
            it.close()
    missing = [u for u in _rank_units(dataset, c, W) if not c.done[u]]
    if missing:
        raise RuntimeError(f"reader bug: epoch {c.epoch} ended with {len(missing)} unit(s) of rank "
                           f"{dataset.rank} unfinished (first: {missing[:5]})")
    c.complete = True


def build_train_loader(data_cfg: DataConfig, split: str = "train", rank: int = 0, world_size: int = 1,
                       **stream_kwargs: Any) -> StatefulLoader:
    """The training reader of one rank: iterate = the rest of one epoch from the cursor."""
    return StatefulLoader(SequenceStream(data_cfg, split, rank, world_size, **stream_kwargs))


def _read_manifest(fs: Any, root: str, retry_s: float) -> Manifest:
    shown = f"{display_path(fs, root)}/manifest.json"
    return retrying(lambda: read_manifest(fs, root, check_files=True), shown, budget_s=retry_s)


def read_dataset_manifest(data_cfg: DataConfig) -> Manifest:
    """The dataset's manifest as every reader reads it: fields validated, every shard present with
    its recorded size, storage failures retried for ``data.storage_retry_s`` and reported as
    StorageError naming the object (e.g. for ``num_items`` before a model is built)."""
    fs, root = open_fs(data_cfg.path, data_cfg.storage_options)
    return _read_manifest(fs, root, data_cfg.storage_retry_s)


def iter_row_lengths(data_cfg: DataConfig, split: str = "train") -> Iterator[np.ndarray]:
    """Items per row of ``split``, one int64 array per row group in manifest order.

    For counting windows before training (``pieces_per_row``): reads only ``item_ids``, through the
    validating reader, so shards are checked as for training (sizes, sha256 when
    ``data.verify_checksums``, footers) and a null sequence is a DataError naming file, row group,
    row and field. With ``data.quarantine`` a null row counts 0 items and an undecodable row group
    none, as the reader sets them aside.
    """
    ds = SequenceStream(data_cfg, split, check_timestamps=False, prefetch=0)
    reader = _ShardReader(ds.fs, ds.root, ds.manifest, split, check_timestamps=False, verify_checksums=False,
                          retry_s=data_cfg.storage_retry_s)
    for unit in ds.units:
        try:
            table = reader.read(unit)
        except CorruptFileError as err:
            if data_cfg.quarantine and err.row_group is not None:
                yield np.zeros(0, np.int64)
                continue
            raise
        _, lengths, isnull, _ = _list_parts(table.column("item_ids"))
        if isnull.any() and not data_cfg.quarantine:
            raise DataError("null sequence", path=reader.show(unit.path), row_group=unit.row_group,
                            row=int(np.flatnonzero(isnull)[0]), field="item_ids")
        yield lengths


# -- evaluation --------------------------------------------------------------------------------


def iter_eval_batches(data_cfg: DataConfig, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                      **stream_kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation rows of ``split``: ``inputs`` (b, L) = the last L items before the target,
    left-padded with 0; ``targets`` (b,) = each row's last item.

    Units (row groups) are strided over ranks like training: unit ``u`` (manifest order) belongs
    to rank ``u % world_size``, so each rank reads and decodes only its own row groups and every
    row is evaluated exactly once across ranks (the caller all-reduces the metric sums). A rank
    may get more rows than another, or none when there are fewer row groups than ranks: the
    evaluation loop must not run collectives per batch. Rows with fewer than 2 items are bad input.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    ds = SequenceStream(data_cfg, split, 0, 1, **stream_kwargs)
    L = ds.L
    reader_units = list(range(rank, len(ds.units), world_size))
    pend_i: list[np.ndarray] = []
    pend_t: list[np.ndarray] = []
    n_pend = 0
    for data in ds._read_ahead(reader_units, min_length=2):
        mine = np.flatnonzero(data.lengths >= 2)
        if len(mine):
            last = data.offsets[mine] + data.lengths[mine] - 1  # index of the target
            start = np.maximum(data.offsets[mine], last - L)
            idx = last[:, None] - L + np.arange(L)
            hist = np.where(idx >= start[:, None], data.values[np.maximum(idx, 0)], 0)
            pend_i.append(hist)
            pend_t.append(data.values[last])
            n_pend += len(mine)
        while n_pend >= batch_size:
            inputs, targets = np.concatenate(pend_i), np.concatenate(pend_t)
            yield {"inputs": torch.from_numpy(np.ascontiguousarray(inputs[:batch_size])),
                   "targets": torch.from_numpy(np.ascontiguousarray(targets[:batch_size]))}
            pend_i, pend_t = [inputs[batch_size:]], [targets[batch_size:]]
            n_pend -= batch_size
    if n_pend:
        yield {"inputs": torch.from_numpy(np.ascontiguousarray(np.concatenate(pend_i))),
               "targets": torch.from_numpy(np.ascontiguousarray(np.concatenate(pend_t)))}
