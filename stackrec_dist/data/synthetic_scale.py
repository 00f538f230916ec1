"""Synthetic interactions at production shape, streamed to sharded Parquet in bounded memory.

What makes it "production shaped" (unlike :mod:`stackrec_dist.data.synthetic`, made for learnable
toy data):

* **Item popularity** is a power law (Zipf with exponent ``item_zipf_a``) over a catalogue of
  ``num_items`` items, and it **drifts**: the popularity ranking rotates over the time span by
  ``drift_items`` positions, so the items in fashion at the start are not those at the end.
* **Sequence lengths** are a power law: ``min_length + floor(Lomax(length_alpha) * scale)``,
  capped at ``max_length``, with ``scale`` set so that the mean length is
  ``interactions / num_users`` (the cap makes the total a little lower; the exact count is
  returned and recorded).
* **Sessions**: a user's sequence is cut into sessions (geometric, mean ``session_length``
  interactions); gaps inside a session are short (exponential, ``in_session_gap_s``), between
  sessions long (exponential, ``between_sessions_gap_s``). Within a session the next item is,
  with probability ``markov_p``, one of a few fixed successors of the previous item (something to
  learn), else a fresh draw from the popularity of the session's time.

Everything is generated per chunk of ``chunk_users`` users from its own seeded stream (a chunk's
content depends only on ``(seed, chunk index)`` and the parameters), and each chunk is written
out before the next is made: memory is bounded by the chunk, not the data. Two targets:

* :func:`write_raw_interactions`: a directory of raw Parquet files ``part-NNNNN.parquet``
  (``user``, ``item``, ``timestamp``; ids are 1-based integers, rows in time order within a
  chunk) for ``stackrec prepare`` (a directory source).
* :func:`write_prepared_dataset`: a prepared ``leave_last_out`` dataset (shards, manifest with the
  length histograms and item counts), skipping ``prepare``.

Both accept local paths and ``s3://`` / ``memory://`` URIs (fsspec).
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import SCHEMA_VERSION, Manifest, write_manifest
from .storage import open_fs
from .writer import SplitWriter, sequence_table, write_item_counts

T0 = 1_577_836_800  # 2020-01-01 UTC


@dataclass(frozen=True)
class ScaleParams:
    num_users: int = 100_000
    num_items: int = 1_000_000  # real items (ids 1..num_items)
    interactions: int = 1_000_000  # target total; the power-law cap makes the real one a little lower
    item_zipf_a: float = 1.0
    length_alpha: float = 1.8  # tail exponent of the sequence-length power law (> 1)
    min_length: int = 3
    max_length: int = 5_000
    session_length: float = 8.0
    in_session_gap_s: float = 120.0
    between_sessions_gap_s: float = 3 * 86_400.0
    span_seconds: int = 2 * 365 * 86_400
    drift_items: int = 0  # popularity-ranking rotation over the span; 0 = num_items // 10
    markov_p: float = 0.5
    successors: int = 4
    seed: int = 0

    def validate(self) -> None:
        if self.num_users < 1 or self.num_items < 2:
            raise ValueError(f"need >= 1 user and >= 2 items (got {self.num_users}, {self.num_items})")
        if self.length_alpha <= 1:
            raise ValueError(f"length_alpha must be > 1 (a finite mean), got {self.length_alpha}")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length (got {self.min_length}, {self.max_length})")
        if self.interactions < self.num_users * self.min_length:
            raise ValueError(f"interactions {self.interactions} < num_users * min_length "
                             f"({self.num_users} * {self.min_length})")


@dataclass
class Chunk:
    """Users ``first_user .. first_user + len(lengths) - 1`` (0-based), user-major and time-ordered."""

    first_user: int
    lengths: np.ndarray  # (n,) int64
    items: np.ndarray  # (sum,) int64, 1-based item ids
    timestamps: np.ndarray  # (sum,) int64, epoch seconds, increasing within a user


class _Popularity:
    """Zipf over ranks; rank r at time t is item ``perm[(r + shift(t)) % V]``.

    The cdf is float64 over V entries and the successor table V x successors int32: about
    24 bytes per catalogue item, independent of the number of users or interactions.
    """

    def __init__(self, p: ScaleParams) -> None:
        rng = np.random.default_rng([p.seed, 0])
        V = p.num_items
        weights = 1.0 / np.arange(1, V + 1, dtype=np.float64) ** p.item_zipf_a
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]
        self.perm = rng.permutation(V).astype(np.int32)
        self.successors = self.perm[np.minimum(np.searchsorted(self.cdf, rng.random((V, p.successors))), V - 1)]
        self.drift = p.drift_items or max(1, V // 10)
        self.p = p

    def draw(self, rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
        """0-based items for timestamps ``t`` (n,)."""
        V = self.p.num_items
        rank = np.minimum(np.searchsorted(self.cdf, rng.random(len(t))), V - 1)
        frac = (t - T0) / max(1, self.p.span_seconds)
        shift = np.floor(np.clip(frac, 0.0, 1.0) * self.drift).astype(np.int64)
        return self.perm[(rank + shift) % V].astype(np.int64)


def _length_scale(p: ScaleParams) -> float:
    # E[Lomax(a)] = 1 / (a - 1); floor takes 0.5 off on average.
    mean = p.interactions / p.num_users
    return max(mean - p.min_length + 0.5, 0.0) * (p.length_alpha - 1)


def iter_chunks(p: ScaleParams, chunk_users: int = 50_000) -> Iterator[Chunk]:
    """The data, chunk by chunk; chunk c depends only on (seed, c) and the parameters."""
    p.validate()
    pop = _Popularity(p)
    scale = _length_scale(p)
    for c, first in enumerate(range(0, p.num_users, chunk_users)):
        n = min(chunk_users, p.num_users - first)
        rng = np.random.default_rng([p.seed, 1, c])
        lengths = p.min_length + np.floor(rng.pareto(p.length_alpha, n) * scale)
        lengths = np.minimum(lengths, p.max_length).astype(np.int64)
        total = int(lengths.sum())
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        pos = np.arange(total) - np.repeat(offsets[:-1], lengths)  # position within the user
        # Sessions: a new one starts at position 0 and then with probability 1 / session_length.
        new_session = (pos == 0) | (rng.random(total) < 1.0 / max(p.session_length, 1.0))
        gaps = np.where(new_session, rng.exponential(p.between_sessions_gap_s, total),
                        rng.exponential(p.in_session_gap_s, total)).astype(np.int64) + 1
        gaps[pos == 0] = 0
        cs = np.cumsum(gaps)
        starts = T0 + rng.integers(0, p.span_seconds, size=n)
        ts = cs - np.repeat(cs[offsets[:-1]], lengths) + np.repeat(starts, lengths)
        fresh = pop.draw(rng, ts)
        follow = (~new_session) & (rng.random(total) < p.markov_p)
        pick = rng.integers(0, p.successors, size=total)
        items = fresh
        # A successor chain must see the previous item's final value: resolve positions in order,
        # over the users still that long (a prefix of the users by decreasing length), so the
        # loop costs one numpy step per position and O(interactions) in all.
        by_length = np.argsort(-lengths, kind="stable")
        longer = np.sort(lengths)
        for k in range(1, int(lengths.max(initial=0))):
            active = by_length[: n - int(np.searchsorted(longer, k, side="right"))]
            idx = offsets[active] + k
            idx = idx[follow[idx]]
            items[idx] = pop.successors[items[idx - 1], pick[idx]]
        yield Chunk(first, lengths, items + 1, ts)


def write_raw_interactions(uri: str, p: ScaleParams, storage_options: dict[str, Any] | None = None,
                           chunk_users: int = 50_000, row_group_size: int = 1 << 20) -> dict[str, Any]:
    """Raw log as ``<uri>/part-NNNNN.parquet``, one file per chunk; returns a summary
    (files, interactions, bytes). Rows of a chunk are in global time order (as a log would be)."""
    fs, root = open_fs(uri, storage_options)
    fs.makedirs(root, exist_ok=True)
    files, interactions, size = 0, 0, 0
    for c, chunk in enumerate(iter_chunks(p, chunk_users)):
        users = np.repeat(np.arange(chunk.first_user + 1, chunk.first_user + len(chunk.lengths) + 1,
                                    dtype=np.int64), chunk.lengths)
        order = np.argsort(chunk.timestamps, kind="stable")
        table = pa.table({"user": pa.array(users[order]), "item": pa.array(chunk.items[order]),
                          "timestamp": pa.array(chunk.timestamps[order])})
        path = posixpath.join(root, f"part-{c:05d}.parquet")
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd", row_group_size=row_group_size)
        files += 1
        interactions += table.num_rows
        size += fs.size(path)
    return {"path": uri, "files": files, "interactions": interactions, "bytes": size, "params": asdict(p)}


def write_prepared_dataset(uri: str, p: ScaleParams, storage_options: dict[str, Any] | None = None,
                           chunk_users: int = 50_000, num_shards: int = 16,
                           row_group_size: int = 4096) -> Manifest:
    """A prepared ``leave_last_out`` dataset (item ids as generated, users 0..U-1), written chunk by
    chunk through the same writer as ``prepare``; shard j holds the j-th of ``num_shards`` equal
    user ranges."""
    fs, root = open_fs(uri, storage_options)
    fs.makedirs(root, exist_ok=True)
    num_items = p.num_items + 1
    writers = {n: SplitWriter(fs, root, n, num_shards, row_group_size, num_items=num_items if n == "train" else None)
               for n in ("train", "valid", "test")}
    interactions = 0
    for chunk in iter_chunks(p, chunk_users):
        n = len(chunk.lengths)
        users = np.arange(chunk.first_user, chunk.first_user + n, dtype=np.int64)
        shard = users * num_shards // p.num_users
        offsets = np.concatenate([[0], np.cumsum(chunk.lengths)])
        pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], chunk.lengths)
        interactions += int(offsets[-1])
        for name, drop in (("train", 2), ("valid", 1), ("test", 0)):
            keep = np.maximum(chunk.lengths - drop, 0)
            mask = pos < np.repeat(keep, chunk.lengths)
            offs = np.concatenate([[0], np.cumsum(keep)])
            writers[name].write(sequence_table(users, offs, chunk.items[mask], chunk.timestamps[mask]), shard)
    splits = {n: w.close() for n, w in writers.items()}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, num_items=num_items, num_users=p.num_users, protocol="leave_last_out",
        splits=splits, id_maps={}, created_by="stackrec_dist.data.synthetic_scale",
        extra={"source": "synthetic_scale", "interactions": interactions, "params": asdict(p)},
        item_counts=write_item_counts(fs, root, writers["train"].item_counts, "train"),
    )
    write_manifest(fs, root, manifest)
    return manifest
