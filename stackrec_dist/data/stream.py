"""The training stream: rank/worker striding, shuffle buffer, batches that carry their cursor ids.

Read docs/data.md ("Streaming reader") for the design; in short: the unit of work is one row
group of one shard (``shards.py``). Each epoch the units are permuted with a generator seeded by
``(seed, epoch)``, identical on every rank, and strided over the *global worker index*
``g = rank * W + worker_id`` of ``G = world_size * W`` workers (``W`` = DataLoader workers, at
least 1). Data is never pre-split per world size. Each unit is cut into windows (``windows.py``);
every batch carries the unit and piece ids of its windows under ``CURSOR_META``, which the loader
(``loader.py``) strips and records in its cursor (``cursor.py``).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stackrec_dist.config import DataConfig

from .cursor import Cursor
from .errors import DataError
from .read_stats import ReadStats
from .split_reader import SplitReader
from .storage import StorageError
from .windows import row_pieces, unit_windows

# The key of a batch's cursor metadata (unit and piece ids, units met, quarantine files, an error
# raised in a DataLoader worker), stripped by the loader.
CURSOR_META = "_cursor"


def epoch_order(num_units: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of units for ``epoch``: the same on every rank and worker."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_units)


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
                 quarantine_dir: str | None = None, verify_at_start: bool = False) -> None:
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
        self.stride = data_cfg.stride  # pieces end every `stride` transitions (windows.py)
        # Opens the split: manifest, units, shards verified (once per process) before training.
        self.source = SplitReader(data_cfg, split, check_timestamps=check_timestamps,
                                  verify_checksums=verify_checksums, prefetch=prefetch,
                                  quarantine_dir=quarantine_dir, verify_at_start=verify_at_start)
        self.manifest = self.source.manifest
        self.units = self.source.units
        self.num_items = self.source.num_items
        self.fingerprint = self.source.fingerprint
        self.cursor = Cursor(len(self.units))
        self._stats = ReadStats()

    @property
    def stats(self) -> dict[str, Any]:
        """What in-process iteration met and emitted (``ReadStats.as_dict``)."""
        return self._stats.as_dict()

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
            yield {CURSOR_META: {"error": err}}

    def _batches(self, units: list[int], cursor: Cursor, rng: np.random.Generator, g: int):
        """Batches of worker ``g``'s ``units``: windows through the shuffle buffer, each batch with
        its cursor metadata; the last partial batch, or metadata only, at the end."""
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
            self._stats.add_batch(n)
            return {
                "inputs": torch.from_numpy(np.ascontiguousarray(take[0])),
                "targets": torch.from_numpy(np.ascontiguousarray(take[1])),
                CURSOR_META: meta,
            }

        for data in self.source.read_ahead(units):
            u = data.unit.index
            total = int(row_pieces(data.lengths, self.stride)[0].shape[0])
            new_units.append([u, total, data.bad_rows, int(data.bad_row_group)])
            if not cursor.seen(u):
                self._stats.add_unit(data.bad_rows, int(data.bad_row_group))
            if data.quarantine_file:
                qfiles.append(data.quarantine_file)
                self._stats.add_quarantine([data.quarantine_file])
            received = cursor.partial[u][1] if u in cursor.partial else None
            inputs, targets, pieces = unit_windows(data.values, data.offsets, data.lengths, received, L,
                                                   self.cfg.pack, rng, self.cfg.shuffle_buffer > 1, self.stride)
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

