"""Writing sequence-Parquet shards: exact row groups, checksums computed while writing.

Shared by ``prepare`` (real logs) and ``synthetic.generate_sequence_dataset`` so both produce the
same format byte for byte. Rows must arrive in their final global order with a non-decreasing
shard index; each shard's row groups hold exactly ``row_group_size`` rows (the last one fewer),
whatever the sizes of the tables fed in, so the bytes do not depend on how the producer chunked
its work (e.g. the number of partitions of an external sort).
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .manifest import SEQUENCE_SCHEMA, ShardInfo, SplitInfo

PARQUET_COMPRESSION = "zstd"


class _HashingFile:
    """A write-only file wrapper that hashes and counts the bytes passing through."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()
        self._tail_sha: Any = None
        self.tail_size = 0
        self.size = 0
        self.closed = False

    def start_tail(self) -> None:
        """From here on also hash the bytes written into a second digest (the footer)."""
        self._tail_sha = hashlib.sha256()
        self.tail_size = 0

    def write(self, data: Any) -> int:
        mv = memoryview(data)
        self._sha.update(mv)
        if self._tail_sha is not None:
            self._tail_sha.update(mv)
            self.tail_size += mv.nbytes
        self.size += mv.nbytes
        self._raw.write(mv)
        return mv.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            self.closed = True

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def tail_hexdigest(self) -> str:
        return self._tail_sha.hexdigest()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class ShardWriter:
    """One Parquet shard with exact row groups."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, relpath: str, row_group_size: int,
                 block_size: int | None = None) -> None:
        self.relpath = relpath
        self.row_group_size = row_group_size
        full = posixpath.join(root, relpath)
        fs.makedirs(posixpath.dirname(full), exist_ok=True)
        # block_size: what a buffered (e.g. S3) file holds before it uploads a part.
        self._file = _HashingFile(fs.open(full, "wb", block_size=block_size))
        # No dictionary pages: item ids are near-unique per page and timestamps unique, so a
        # dictionary costs time and grows files (measured: 2x slower writes, 1.6x bigger);
        # timestamps rise along a sequence, which delta encoding turns into small numbers.
        self._writer = pq.ParquetWriter(
            self._file,
            SEQUENCE_SCHEMA,
            compression=PARQUET_COMPRESSION,
            use_dictionary=False,
            column_encoding={"timestamps": "DELTA_BINARY_PACKED"},
            write_statistics=["user_id", "time_slice"],
            # CRC32 per page, checked by every read: integrity of exactly the bytes read, with no
            # extra I/O (hashing whole shards would make each worker read every shard it touches).
            write_page_checksum=True,
        )
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0
        self.row_groups = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_size:
            buf = pa.concat_tables(self._pending)
            start = 0
            while buf.num_rows - start >= self.row_group_size:
                self._emit(buf.slice(start, self.row_group_size))
                start += self.row_group_size
            rest = buf.slice(start)
            self._pending = [rest] if rest.num_rows else []
            self._pending_rows = rest.num_rows

    def _emit(self, table: pa.Table) -> None:
        # combine_chunks: a row group written from a multi-chunk table is still one row group,
        # but its pages would follow the chunking; normalise so bytes do not depend on it.
        self._writer.write_table(table.combine_chunks(), row_group_size=self.row_group_size)
        self.rows += table.num_rows
        self.row_groups += 1

    def close(self) -> ShardInfo:
        if self._pending_rows:
            self._emit(pa.concat_tables(self._pending))
            self._pending = []
            self._pending_rows = 0
        self._file.start_tail()  # row groups are written whole: what close() writes is the footer
        self._writer.close()
        self._file.close()
        return ShardInfo(self.relpath, self.rows, self.row_groups, self._file.hexdigest(), self._file.size,
                         footer_sha256=self._file.tail_hexdigest(), footer_bytes=self._file.tail_size)


class SplitWriter:
    """The ``num_shards`` shards of one split; rows arrive with non-decreasing shard indices.

    Also records what the trainer needs without reading the shards back: the histogram of
    sequence lengths (``SplitInfo.length_histogram``) and, with ``num_items`` given, the
    occurrences of every item id (``item_counts``, (num_items,) int64).
    """

    def __init__(
        self, fs: fsspec.AbstractFileSystem, root: str, split: str, num_shards: int, row_group_size: int,
        num_items: int | None = None, block_size: int | None = None,
    ) -> None:
        self.fs, self.root, self.split = fs, root, split
        self.block_size = block_size
        self.num_shards = num_shards
        self.row_group_size = row_group_size
        self._current: ShardWriter | None = None
        self._index = -1
        self._done: list[ShardInfo] = []
        self._lengths: dict[int, int] = {}
        self.item_counts = None if num_items is None else np.zeros(num_items, dtype=np.int64)

    def _advance_to(self, index: int) -> None:
        if index < self._index:
            raise AssertionError(f"split {self.split}: shard index went back from {self._index} to {index}")
        while self._index < index:
            if self._current is not None:
                self._done.append(self._current.close())
            self._index += 1
            # Every shard file exists, even an empty one, so readers can stride by index.
            self._current = ShardWriter(
                self.fs, self.root, f"{self.split}/{shard_name(self._index)}", self.row_group_size,
                block_size=self.block_size,
            )

    def write(self, table: pa.Table, shard: np.ndarray) -> None:
        """Append rows; ``shard[i]`` is row i's shard index (non-decreasing)."""
        if table.num_rows == 0:
            return
        column = table.column("item_ids")
        lengths, counts = np.unique(pc.list_value_length(column).to_numpy(zero_copy_only=False), return_counts=True)
        for n, c in zip(lengths.tolist(), counts.tolist()):
            self._lengths[n] = self._lengths.get(n, 0) + c
        if self.item_counts is not None:
            values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            self.item_counts += np.bincount(values, minlength=len(self.item_counts))[: len(self.item_counts)]
        shard = np.asarray(shard)
        cuts = np.flatnonzero(np.diff(shard)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(shard)]])
        for s, e in zip(starts.tolist(), ends.tolist()):
            self._advance_to(int(shard[s]))
            self._current.write(table.slice(s, e - s))

    def close(self) -> SplitInfo:
        self._advance_to(self.num_shards - 1)
        self._done.append(self._current.close())
        self._current = None
        lengths = sorted(self._lengths)
        histogram = {"length": lengths, "count": [self._lengths[n] for n in lengths]}
        return SplitInfo(rows=sum(s.rows for s in self._done), shards=self._done, length_histogram=histogram)


ITEM_COUNTS_PATH = "stats/item_counts.parquet"


def write_item_counts(fs: fsspec.AbstractFileSystem, root: str, counts: np.ndarray, split: str) -> dict[str, Any]:
    """Write ``counts`` ((num_items,) int64, index = item id) beside the shards; returns the
    manifest's ``item_counts`` entry (path, split, sha256, bytes, total)."""
    full = posixpath.join(root, ITEM_COUNTS_PATH)
    fs.makedirs(posixpath.dirname(full), exist_ok=True)
    out = _HashingFile(fs.open(full, "wb"))
    try:
        # Delta encoding would not help (counts are unordered); zstd shrinks the long tail of 0s and 1s.
        pq.write_table(pa.table({"count": pa.array(np.asarray(counts, dtype=np.int64))}), out,
                       compression=PARQUET_COMPRESSION, use_dictionary=False)
    finally:
        out.close()
    return {"path": ITEM_COUNTS_PATH, "split": split, "sha256": out.hexdigest(), "bytes": out.size,
            "total": int(np.asarray(counts).sum())}


def sequence_table(
    user_id: np.ndarray,
    offsets: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    time_slice: int = 0,
    domain: str | None = None,
) -> pa.Table:
    """Build rows from flat values and per-row offsets (len = rows + 1, starting at 0)."""
    offsets = pa.array(np.asarray(offsets, dtype=np.int32))
    n = len(user_id)
    return pa.Table.from_arrays(
        [
            pa.array(np.asarray(user_id, dtype=np.int64)),
            pa.ListArray.from_arrays(offsets, pa.array(np.asarray(items, dtype=np.int32))),
            pa.ListArray.from_arrays(offsets, pa.array(np.asarray(timestamps, dtype=np.int64))),
            pa.nulls(n, pa.string()) if domain is None else pa.array([domain] * n, pa.string()),
            pa.array(np.full(n, time_slice, dtype=np.int32)),
        ],
        schema=SEQUENCE_SCHEMA,
    )
