"""Synthetic interaction logs and prepared datasets for tests and benchmarks at scale.

Item popularity is Zipf-like and every item has a few preferred successors, taken with
probability ``markov_p``: a next-item model can learn the transitions, so a training curve on
this data means something. Generation is vectorised over users (one numpy step per position) and
fully determined by the arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import SCHEMA_VERSION, Manifest, write_manifest
from .storage import open_fs
from .writer import SplitWriter, sequence_table, write_item_counts

T0 = 946_684_800  # 2000-01-01 UTC: plausible epoch-second timestamps


@dataclass(frozen=True)
class SyntheticParams:
    mean_length: float = 30.0
    min_length: int = 3
    max_length: int = 200
    zipf_a: float = 1.05
    markov_p: float = 0.6
    successors: int = 4
    gap_seconds: float = 3600.0
    span_seconds: int = 3 * 365 * 86400


class _Model:
    """Popularity and transition tables shared by every chunk of one seed."""

    def __init__(self, num_items: int, seed: int, p: SyntheticParams) -> None:
        rng = np.random.default_rng([seed, 0])
        weights = 1.0 / np.arange(1, num_items + 1) ** p.zipf_a
        self.item_of_rank = rng.permutation(num_items)  # popular items are not just the low ids
        self.cdf = np.cumsum(weights) / weights.sum()
        self.successors = self.item_of_rank[
            np.minimum(np.searchsorted(self.cdf, rng.random((num_items, p.successors))), num_items - 1)
        ]
        self.p = p
        self.num_items = num_items

    def popular(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.item_of_rank[np.minimum(np.searchsorted(self.cdf, rng.random(n)), self.num_items - 1)]

    def block(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lengths (n,), items (sum,) 0-based, timestamps (sum,)) for n users, user-major."""
        p = self.p
        extra = max(p.mean_length - p.min_length, 0.0)
        lengths = p.min_length + rng.geometric(1.0 / (extra + 1.0), size=n) - 1
        lengths = np.minimum(lengths, p.max_length).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        items = np.empty(offsets[-1], dtype=np.int64)
        cur = self.popular(rng, n)
        items[offsets[:-1]] = cur
        for pos in range(1, int(lengths.max(initial=0))):
            active = np.flatnonzero(lengths > pos)
            if len(active) == 0:
                break
            prev = cur[active]
            jump = rng.random(len(active)) < p.markov_p
            nxt = self.popular(rng, len(active))
            pick = rng.integers(0, p.successors, size=len(active))
            nxt = np.where(jump, self.successors[prev, pick], nxt)
            cur[active] = nxt
            items[offsets[:-1][active] + pos] = nxt
        gaps = rng.exponential(p.gap_seconds, size=offsets[-1]).astype(np.int64) + 1
        starts = T0 + rng.integers(0, p.span_seconds, size=n)
        cs = np.cumsum(gaps)
        before = np.concatenate([[0], cs])[offsets[:-1]]
        ts = cs - np.repeat(before, lengths) + np.repeat(starts, lengths)
        return lengths, items, ts


def generate_interactions(
    num_users: int,
    num_items: int,
    seed: int = 0,
    params: SyntheticParams = SyntheticParams(),
    path: str | os.PathLike | None = None,
    storage_options: dict[str, Any] | None = None,
    chunk_users: int = 100_000,
) -> pa.Table | str:
    """A raw log (columns user, item, timestamp; ids 1-based ints), user-major.

    Returns the table, or writes it as Parquet to ``path`` chunk by chunk (bounded memory) and
    returns the path.
    """
    model = _Model(num_items, seed, params)
    writer = None
    f = None
    tables = []
    try:
        for c, start in enumerate(range(0, num_users, chunk_users)):
            n = min(chunk_users, num_users - start)
            rng = np.random.default_rng([seed, 1, c])
            lengths, items, ts = model.block(rng, n)
            table = pa.table(
                {
                    "user": pa.array(np.repeat(np.arange(start + 1, start + n + 1, dtype=np.int64), lengths)),
                    "item": pa.array(items + 1),
                    "timestamp": pa.array(ts),
                }
            )
            if path is None:
                tables.append(table)
                continue
            if writer is None:
                fs, p = open_fs(str(path), storage_options)
                parent = p.rsplit("/", 1)[0]
                if parent:
                    fs.makedirs(parent, exist_ok=True)
                f = fs.open(p, "wb")
                writer = pq.ParquetWriter(f, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=1 << 20)
    finally:
        if writer is not None:
            writer.close()
        if f is not None:
            f.close()
    if path is None:
        return pa.concat_tables(tables) if tables else pa.table({"user": [], "item": [], "timestamp": []})
    return str(path)


def synthetic_log_path(num_users: int, num_items: int, seed: int, cache_dir: str | None = None) -> Path:
    """A cached synthetic raw log for ``source: synthetic`` (made on first use)."""
    from .movielens import cache_root

    path = cache_root(cache_dir) / "synthetic" / f"interactions-u{num_users}-i{num_items}-s{seed}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        generate_interactions(num_users, num_items, seed, path=tmp)
        os.replace(tmp, path)
    return path


def generate_sequence_dataset(
    root: str,
    num_sequences: int,
    num_items: int = 10_000,
    seed: int = 0,
    params: SyntheticParams = SyntheticParams(),
    num_shards: int = 8,
    row_group_size: int = 4096,
    storage_options: dict[str, Any] | None = None,
    chunk_sequences: int = 100_000,
) -> Manifest:
    """Write a prepared leave_last_out dataset of ``num_sequences`` users directly.

    ``num_items`` is the vocabulary incl. pad (real items 1..num_items-1). Same writer and
    manifest code as ``prepare``; no id maps (the ids are already dense). Chunks are generated
    from their own seeded streams, so memory is bounded by ``chunk_sequences``.
    """
    fs, path = open_fs(root, storage_options)
    fs.makedirs(path, exist_ok=True)
    model = _Model(num_items - 1, seed, params)
    writers = {n: SplitWriter(fs, path, n, num_shards, row_group_size, num_items=num_items if n == "train" else None)
               for n in ("train", "valid", "test")}
    interactions = 0
    for c, start in enumerate(range(0, num_sequences, chunk_sequences)):
        n = min(chunk_sequences, num_sequences - start)
        lengths, items, ts = model.block(np.random.default_rng([seed, 2, c]), n)
        items = items + 1
        interactions += len(items)
        users = np.arange(start, start + n, dtype=np.int64)
        shard = users * num_shards // max(num_sequences, 1)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for name, drop in (("train", 2), ("valid", 1), ("test", 0)):
            keep = np.maximum(lengths - drop, 0)
            pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
            mask = pos < np.repeat(keep, lengths)
            offs = np.concatenate([[0], np.cumsum(keep)])
            writers[name].write(sequence_table(users, offs, items[mask], ts[mask]), shard)
    splits = {n: w.close() for n, w in writers.items()}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        num_items=num_items,
        num_users=num_sequences,
        protocol="leave_last_out",
        splits=splits,
        id_maps={},
        created_by="stackrec_dist.data.synthetic",
        extra={"source": "synthetic", "seed": seed, "interactions": interactions, "params": params.__dict__},
        item_counts=write_item_counts(fs, path, writers["train"].item_counts, "train"),
    )
    write_manifest(fs, path, manifest)
    return manifest
