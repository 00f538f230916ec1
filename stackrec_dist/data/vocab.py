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
partitions (i.e. on the memory bound). Per-name work is Arrow and numpy compute on the names as one
Arrow string array (a sort by UTF-8 bytes, which is Python's code point order; with integer ids a
sort by int64 value, then string): no Python object per name. Python objects per name would leave
the interpreter's small-object arenas and glibc's heap fragmented after every partition (each
partition's millions of ``str``s, set and dict entries), so resident memory grew with the number
of names sorted rather than with the bound. Only ids that are integers too large for int64 take a
Python-key sort. Memory holds one partition, one source, and the sample.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .memory import release_freed_memory

_INT_PATTERN = r"^-?[0-9]+$"
_PART_SCHEMA = pa.schema([("name", pa.string()), ("src", pa.int32()), ("idx", pa.int64())])
# Integer ids of at most this many characters (sign included) fit an int64.
_INT64_CHARS = 18
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
        self.max_chars = 0  # longest name, in bytes: whether integer ids fit an int64
        self.total = 0
        self.distinct = 0
        self.partitions = 0
        self.largest_partition = 0  # names (with repeats) in the largest partition: what memory holds

    def _src(self, j: int) -> str:
        return os.path.join(self.dir, f"src-{j:05d}.arrows")

    def _res(self, j: int) -> str:
        # (idx, id) int64 pairs, appended partition by partition: no file is held open.
        return os.path.join(self.dir, f"ids-{j:05d}.bin")

    def add(self, names: pa.Array) -> int:
        """Spill one source; returns its index."""
        j = len(self.sizes)
        names = names.cast(pa.string())
        if self.all_int and len(names):
            self.all_int = bool(pc.all(pc.match_substring_regex(names, _INT_PATTERN)).as_py())
        if len(names):
            self.max_chars = max(self.max_chars, int(pc.max(pc.binary_length(names)).as_py()))
        _write(self._src(j), pa.schema([("name", pa.string())]),
               [pa.record_batch([names], names=["name"])] if len(names) else [])
        self.sizes.append(len(names))
        self.total += len(names)
        return j

    def _column(self, j: int) -> pa.Array:
        return _read(self._src(j)).column("name").combine_chunks()

    def _order(self, names: pa.Array) -> np.ndarray:
        """The permutation that sorts ``names`` in id order (``sort_key``)."""
        if not self.all_int:
            # Arrow compares strings by UTF-8 bytes, which is code point order, as Python does.
            return pc.sort_indices(names).to_numpy().astype(np.int64)
        if self.max_chars <= _INT64_CHARS:
            t = pa.table({"v": pc.cast(names, pa.int64()), "s": names})
            return pc.sort_indices(t, sort_keys=[("v", "ascending"), ("s", "ascending")]).to_numpy().astype(np.int64)
        key = sort_key(True)
        py = names.to_pylist()
        return np.array(sorted(range(len(py)), key=lambda i: key(py[i])), dtype=np.int64)

    def _cuts(self, ordered: pa.Array, splitters: list) -> list[int]:
        """For each splitter (ascending), the first position of ``ordered`` (sorted) whose key is
        not below it, by binary search (a handful of scalar reads per splitter): partition ``p``
        holds the keys in ``[splitters[p - 1], splitters[p])``, i.e. ``bisect_right(splitters, key)``."""
        key = sort_key(self.all_int)
        out, lo = [], 0
        for sp in splitters:
            hi = len(ordered)
            while lo < hi:
                mid = (lo + hi) // 2
                s = ordered[mid].as_py()
                if sp <= (key(s) if key else s):
                    hi = mid
                else:
                    lo = mid + 1
            out.append(lo)
        return out

    def assign(self, base: int, on_sorted: Callable[[pa.Array, int], None] | None = None) -> int:
        """Number the distinct names from ``base`` in sorted order; returns how many there are.
        ``on_sorted(names, first_id)`` gets each partition's distinct names (an Arrow string
        array) in order."""
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
                    picked = self._column(j).take(pa.array(np.arange(lo - start, n, stride))).to_pylist()
                    sample += [key(s) if key else s for s in picked]
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
                names = self._column(j)
                order = self._order(names)
                ordered = names.take(pa.array(order))
                cuts = [0] + self._cuts(ordered, splitters) + [n]
                for p in range(P):
                    s, e = cuts[p], cuts[p + 1]
                    if e > s:
                        writers[p].write_batch(pa.record_batch(
                            [ordered.slice(s, e - s), pa.array(np.full(e - s, j, np.int32)),
                             pa.array(order[s:e])], schema=_PART_SCHEMA))
                del names, order, ordered
        finally:
            for w in writers:
                w.close()
            for s in sinks:
                s.close()

        for j in range(len(self.sizes)):
            open(self._res(j), "wb").close()
        next_id = base
        for p, path in enumerate(part_paths):
            table = _read(path)
            os.remove(path)
            if table.num_rows == 0:
                continue
            n = table.num_rows
            self.largest_partition = max(self.largest_partition, n)
            names = table.column("name").combine_chunks()
            order = self._order(names)
            ordered = names.take(pa.array(order))
            new = np.ones(n, dtype=bool)
            if n > 1:
                new[1:] = pc.not_equal(ordered.slice(1), ordered.slice(0, n - 1)).to_numpy(zero_copy_only=False)
            rank = np.cumsum(new, dtype=np.int64) + (next_id - 1)
            ids = np.empty(n, dtype=np.int64)
            ids[order] = rank
            distinct = ordered.filter(pa.array(new))
            if on_sorted is not None:
                on_sorted(distinct, next_id)
            next_id += len(distinct)
            del names, order, ordered, new, rank, distinct
            src = table.column("src").to_numpy()
            idx = table.column("idx").to_numpy()
            del table
            by_src = np.argsort(src, kind="stable")
            ss = src[by_src]
            cuts = np.flatnonzero(np.diff(ss)) + 1
            for s, e in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [n]]).tolist()):
                sel = by_src[s:e]
                with open(self._res(int(ss[s])), "ab") as f:
                    f.write(np.stack([idx[sel], ids[sel]], axis=1).astype(np.int64, copy=False).tobytes())
            del src, idx, ids, by_src, ss
            release_freed_memory()
        self.partitions = P
        self.distinct = next_id - base
        return self.distinct

    def ids(self, j: int) -> np.ndarray:
        """(len of source j,) int64: the dense id of each name source ``j`` was given."""
        out = np.full(self.sizes[j], -1, dtype=np.int64)
        pairs = np.fromfile(self._res(j), dtype=np.int64).reshape(-1, 2)
        out[pairs[:, 0]] = pairs[:, 1]
        return out
