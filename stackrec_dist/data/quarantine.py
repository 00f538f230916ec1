"""Quarantine: bad rows of a row group written aside, instead of failing the run (``data.quarantine``).

One Parquet file per row group under ``<dataset>/_quarantine/<split>/``, so a re-read (a resumed
run, another epoch) rewrites it identically; written to a temporary name and moved into place.
"""

from __future__ import annotations

import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .shards import Unit
from .storage import display_path, retrying

QUARANTINE_DIR = "_quarantine"


def write_quarantine(fs: Any, quarantine_dir: str, unit: Unit, shown: str, bad: list[tuple[int, str, str]],
                     table: pa.Table | None, retry_s: float | None) -> str:
    """Write the ``(row, field, reason)`` bad rows of ``unit`` aside (with their items and timestamps
    when ``table`` is given; a whole undecodable row group is one row ``(-1, "*", reason)``).
    Returns the file written, as shown to the user."""
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
    path = posixpath.join(quarantine_dir, name)

    def _write() -> None:
        fs.makedirs(quarantine_dir, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            pq.write_table(out, f)
        fs.mv(tmp, path)

    retrying(_write, display_path(fs, path), budget_s=retry_s)
    return display_path(fs, path)
