"""Row validation: what each row of a sequence-Parquet row group must satisfy before it is read.

A bad row (null or empty sequence, an item id outside ``1 .. num_items - 1``, a null id, timestamps
that do not match the items, an evaluation row without history) is reported as ``(row, field,
reason)``; the caller raises it as a DataError or quarantines it (``data.quarantine``).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stackrec_dist.config import DataConfig

from .errors import CorruptFileError, DataError
from .shards import ShardReader, read_manifest_retrying, split_units, verify_shards
from .storage import open_fs


def list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
    flat, lengths, isnull, offsets = list_parts(table.column("item_ids"))
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
        _, ts_len, ts_null, _ = list_parts(table.column("timestamps"))
        flag(np.flatnonzero(ts_null & ~isnull), "timestamps", lambda r: "null timestamps")
        mismatch = np.flatnonzero((ts_len != lengths) & ~ts_null & ~isnull)
        flag(mismatch, "timestamps",
             lambda r: f"{ts_len[r]} timestamps for {lengths[r]} item ids (lengths must match)")
    bad = sorted((r, f, why) for r, (f, why) in problems.items())
    if bad:
        lengths = lengths.copy()
        lengths[[r for r, _, _ in bad]] = 0
    return values, offsets, lengths, bad


def iter_row_lengths(data_cfg: DataConfig, split: str = "train") -> Iterator[np.ndarray]:
    """Items per row of ``split``, one int64 array per row group in manifest order.

    For counting windows before training (``pieces_per_row``): reads only ``item_ids``, through the
    validating reader, so shards are checked as for training (sizes, footers, footer sha256 and
    page checksums when ``data.verify_checksums``) and a null sequence is a DataError naming file, row group,
    row and field. With ``data.quarantine`` a null row counts 0 items and an undecodable row group
    none, as the reader sets them aside.
    """
    data_cfg.validate()
    fs, root = open_fs(data_cfg.path, data_cfg.storage_options)
    manifest = read_manifest_retrying(fs, root, data_cfg.storage_retry_s)
    units = split_units(manifest, root, split)
    verify_shards(fs, root, manifest, split, verify_checksums=data_cfg.verify_checksums,
                  retry_s=data_cfg.storage_retry_s)
    reader = ShardReader(fs, root, manifest, split, check_timestamps=False, verify_checksums=data_cfg.verify_checksums,
                         retry_s=data_cfg.storage_retry_s)
    for unit in units:
        try:
            table = reader.read(unit)
        except CorruptFileError as err:
            if data_cfg.quarantine and err.row_group is not None:
                yield np.zeros(0, np.int64)
                continue
            raise
        _, lengths, isnull, _ = list_parts(table.column("item_ids"))
        if isnull.any() and not data_cfg.quarantine:
            raise DataError("null sequence", path=reader.show(unit.path), row_group=unit.row_group,
                            row=int(np.flatnonzero(isnull)[0]), field="item_ids")
        yield lengths

