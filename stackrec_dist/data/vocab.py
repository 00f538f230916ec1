"""Id vocabularies on disk: dense ids in sorted original-id order, in bounded memory.

``prepare`` gives users dense ids ``0..U-1`` and items ``1..V-1`` in sorted original-id order
(numeric when every id of the set is an integer, else by string). With 100M users the set of
original ids does not fit the memory bound, so :class:`SortedIds` works like an external sort:

1. ``add(names)`` spills one list of names ("source", e.g. the kept users of one spill bucket)
   to a local Arrow IPC file; names may repeat across sources (an item touched in many buckets).
2. ``assign(base)`` range-partitions the names of every source by splitters taken from a
   regular sample (so each partition holds about ``names_per_partition`` names), then takes the
   partitions in key order: sorts each one's distinct names, numbers them ``base, base + 1, ...``
   after those of the partitions before it, and writes each name's number back to a per-source
   result file. The sorted names are handed to ``on_sorted`` in order (the id-map writer).
3. ``ids(j)`` returns source ``j``'s dense ids, aligned with the names it was given.

The numbering is the global rank of each distinct name, so it does not depend on the number of
partitions (i.e. on the memory bound). Per-name work is Python (as the in-memory sort it replaces
was); memory holds one partition, one source, and the sample.
"""

from __future__ import annotations

import bisect
import math
import os
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .memory import release_freed_memory

_INT_PATTERN = r"^-?[0-9]+$"
_PART_SCHEMA = pa.schema([("name", pa.string()), ("src", pa.int32()), ("idx", pa.int64())])
_RESULT_SCHEMA = pa.schema([("idx", pa.int64()), ("id", pa.int64())])
_SAMPLES_PER_PARTITION = 64


def sort_key(all_int: bool) -> Callable[[str], object] | None:
    """The order of dense ids: (integer value, string) when every id is an integer, else string."""
    return (lambda s: (int(s), s)) if all_int else None


def _write(path: str, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
        for b in batches:
            w.write_batch(b)


def _read(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all()


class SortedIds:
    def __init__(self, workdir: str, names_per_partition: int) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.dir = workdir
        self.names_per_partition = max(256, names_per_partition)
        self.sizes: list[int] = []
        self.all_int = True
        self.total = 0
        self.distinct = 0
        self.partitions = 0
        self.largest_partition = 0  # names (with repeats) in the largest partition: what memory holds

    def _src(self, j: int) -> str:
        return os.path.join(self.dir, f"src-{j:05d}.arrows")

    def _res(self, j: int) -> str:
        return os.path.join(self.dir, f"ids-{j:05d}.arrows")

    def add(self, names: pa.Array) -> int:
        """Spill one source; returns its index."""
        j = len(self.sizes)
        names = names.cast(pa.string())
        if self.all_int and len(names):
            self.all_int = bool(pc.all(pc.match_substring_regex(names, _INT_PATTERN)).as_py())
        _write(self._src(j), pa.schema([("name", pa.string())]),
               [pa.record_batch([names], names=["name"])] if len(names) else [])
        self.sizes.append(len(names))
        self.total += len(names)
        return j

    def _names(self, j: int) -> list[str]:
        return _read(self._src(j)).column("name").to_pylist()

    def assign(self, base: int, on_sorted: Callable[[list[str], int], None] | None = None) -> int:
        """Number the distinct names from ``base`` in sorted order; returns how many there are."""
        key = sort_key(self.all_int)
        P = max(1, math.ceil(self.total / self.names_per_partition))
        splitters: list = []
        if P > 1:
            # A systematic sample over all names as one sequence (positions first, first + stride,
            # ...). Sampling each source from its index 0 instead would take every source's first
            # name, its smallest when a source comes sorted, and with sources smaller than the
            # stride the splitters would all sit at the low end: one partition would hold nearly
            # every name and the sort's memory would follow the data, not the bound.
            stride = max(1, self.total // (P * _SAMPLES_PER_PARTITION))
            first, start, sample = stride // 2, 0, []
            for j, n in enumerate(self.sizes):
                lo = first + max(0, -(-(start - first) // stride)) * stride  # first position >= start
                if lo < start + n:
                    names = self._names(j)
                    sample += [key(s) if key else s for s in names[lo - start::stride]]
                start += n
            sample.sort()
            splitters = [sample[len(sample) * p // P] for p in range(1, P)]
            del sample
        part_paths = [os.path.join(self.dir, f"part-{p:05d}.arrows") for p in range(P)]
        sinks = [pa.OSFile(p, "wb") for p in part_paths]
        writers = [pa.ipc.new_stream(s, _PART_SCHEMA) for s in sinks]
        try:
            for j, n in enumerate(self.sizes):
                if n == 0:
                    continue
                names = self._names(j)
                if P == 1:
                    parts = np.zeros(n, dtype=np.int64)
                else:
                    parts = np.fromiter((bisect.bisect_right(splitters, key(s) if key else s) for s in names),
                                        dtype=np.int64, count=n)
                order = np.argsort(parts, kind="stable")
                sp = parts[order]
                cuts = np.flatnonzero(np.diff(sp)) + 1
                arr = pa.array(names, pa.string())
                for s, e in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [n]]).tolist()):
                    sel = order[s:e]
                    writers[int(sp[s])].write_batch(pa.record_batch(
                        [arr.take(pa.array(sel)), pa.array(np.full(len(sel), j, np.int32)), pa.array(sel)],
                        schema=_PART_SCHEMA))
        finally:
            for w in writers:
                w.close()
            for s in sinks:
                s.close()

        res_sinks = [pa.OSFile(self._res(j), "wb") for j in range(len(self.sizes))]
        res_writers = [pa.ipc.new_stream(s, _RESULT_SCHEMA) for s in res_sinks]
        next_id = base
        try:
            for p, path in enumerate(part_paths):
                table = _read(path)
                os.remove(path)
                if table.num_rows == 0:
                    continue
                self.largest_partition = max(self.largest_partition, table.num_rows)
                names = table.column("name").to_pylist()
                distinct = sorted(set(names), key=key)
                rank = {s: next_id + k for k, s in enumerate(distinct)}
                ids = np.fromiter((rank[s] for s in names), dtype=np.int64, count=len(names))
                if on_sorted is not None:
                    on_sorted(distinct, next_id)
                next_id += len(distinct)
                del rank, distinct, names
                # A partition's millions of small Python objects are freed here; without handing
                # them back the id sort's peak stays resident under pass 2 (see .memory).
                release_freed_memory()
                src = table.column("src").to_numpy()
                idx = table.column("idx").to_numpy()
                order = np.argsort(src, kind="stable")
                ss = src[order]
                cuts = np.flatnonzero(np.diff(ss)) + 1
                for s, e in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(ss)]]).tolist()):
                    sel = order[s:e]
                    res_writers[int(ss[s])].write_batch(
                        pa.record_batch([pa.array(idx[sel]), pa.array(ids[sel])], schema=_RESULT_SCHEMA))
        finally:
            for w in res_writers:
                w.close()
            for s in res_sinks:
                s.close()
        self.partitions = P
        self.distinct = next_id - base
        return self.distinct

    def ids(self, j: int) -> np.ndarray:
        """(len of source j,) int64: the dense id of each name source ``j`` was given."""
        out = np.full(self.sizes[j], -1, dtype=np.int64)
        table = _read(self._res(j))
        out[table.column("idx").to_numpy()] = table.column("id").to_numpy()
        return out
