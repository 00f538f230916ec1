"""Raw interaction logs -> a prepared sequence-Parquet dataset (docs/architecture.md).

Deterministic and bounded in memory:

* Pass 1 streams the raw batches and spills ``(user, item, timestamp, user hash)`` rows, ids as
  the original strings, to local Arrow IPC bucket files by a fixed 64-bit hash of the user's
  original id (bucket = top bits of the hash); rows below ``min_rating`` are left out here. No
  vocabulary is built: nothing in memory grows with the number of distinct ids.
* Pass A reads one bucket at a time (all of a user's rows are in one bucket): with the k-core
  on, first the k-core loop (below), then the census: interactions per user, which rows survive,
  who is kept (alive, in the domain), the items of the surviving rows; each bucket's kept users
  and touched items go to :class:`vocab.SortedIds`.
* Final ids: kept users get dense ids 0..U-1 and the items they touch dense ids 1..V-1, both in
  sorted original-id order (numeric when every id is an integer, else by string); 0 is the pad
  item. ``SortedIds`` computes them as global ranks by an external range-partitioned sort
  (partitions of about ``budget / NAME_BYTES`` ids) and the id maps are streamed out in order.
* Pass 2 loads consecutive buckets up to the memory budget at a time, maps them to dense ids
  (each bucket's ids come back from ``SortedIds`` aligned with what it gave), sorts rows by
  (user hash, user id, timestamp) with a stable sort (ties keep input order), builds sequences,
  splits them and appends them to the shard writers, which also record each split's
  sequence-length histogram and the training split's item counts (for the manifest).

Rows are written in (user hash, user id) order and shard ``j`` holds the users whose hash falls in
the j-th of ``num_shards`` equal hash ranges. Both orders are monotone in the hash, so the output
is the same whatever the number of buckets or partitions (i.e. whatever ``memory_limit_mb``), and
users come out in a random-looking, seed-independent order, which spreads them across shards.

``memory_limit_mb`` bounds the interactions held (pass A and 2) and the ids being sorted; what
grows with the number of distinct ids lives in the spill directory (except the k-core's item
counts, below). Resident memory measured flat from 60k to 240k distinct users (and 180k to 720k
items) at a 16 MB bound (tests/data/test_prepare.py::test_memory_bound_with_many_distinct_ids).
The bound is on what is held; freed memory is handed back to the OS after every bucket, group
and id-sort partition (:mod:`.memory`), and Arrow allocates from the system pool meanwhile, or
each phase's high-water mark stays resident under the next (docs/scaling.md).

Time slices (CL, ``time_slices = T > 0``): with N the number of interactions of kept users, the
boundary b_k (k = 1..T-1) is the ceil(k*N/T)-th smallest of their timestamps (exact, found by
histogram refinement over per-bucket files of the kept timestamps written in pass A) and b_T = +inf. Split ``slice-k`` holds, for every
training row, its interactions with timestamp <= b_k (rows left empty are omitted), so
``slice-T`` equals ``train`` and no valid/test target leaks into any slice. ``valid``/``test`` stay
those of the full data.

Domains (TF, ``user_subset`` = ``source`` or ``target``): a user belongs to the target domain when
``blake2b(original user id, digest 8 bytes, key = b"stackrec-domain:" + seed as 8-byte signed
little-endian) / 2**64 < target_user_fraction`` (the digest read as a little-endian integer),
else to the source domain; the key differs from the held-out split's, so the two splits are
independent. Only that domain's users are kept (counted as ``users_other_domain``), but the item
id map is the one ``user_subset = all`` builds (items touched by any user with
>= ``min_sequence_length`` interactions), so source, target and all share item ids and
``num_items``; users get dense ids 0..U-1 within their domain. The domain is one bool per user,
computed in pass A: memory stays bounded as above, and the output is deterministic.

Filters (RecBole's ``val_interval`` and ``user/item_inter_num_interval``; docs/data.md): first
``min_rating`` drops raw rows whose ``rating_column`` is < min_rating (pass 1; counted as
``rows_below_min_rating``, not as bad rows; a null or non-numeric rating is a bad row). Then, with
``user_core`` or ``item_core`` > 0, k-core filtering until stable (:func:`_core_filter`): each pass
re-reads the spill buckets one at a time, counts per user (per bucket) and per item (global) the
surviving rows, and removes users with fewer than ``max(min_sequence_length, user_core)`` and
items with fewer than ``item_core`` of them, until a pass removes nothing. ``min_sequence_length``
thus keeps its meaning (a kept user has at least that many interactions) and is the user threshold
inside the loop. The k-core runs over every user before the domain split, so domains still share
one item id map; only surviving items get ids (num_items = surviving items + pad), and pass 2
writes only surviving rows. The per-user state stays per bucket (an alive mask on local disk);
the per-item counts are one Arrow table (item id string, int64 count) in memory: about 40 bytes
per distinct item between passes (counts and the surviving ids, for ~13-character ids) and about
180 at the peak (merging per-bucket counts with Arrow's group_by, is_in's hash set of the
surviving ids): 330 MB of Arrow pool for 1.9M distinct items, measured. The surviving set is the
largest in which every user and item meets its threshold: it does not depend on the order of
removal or the number of buckets, so the output stays byte-identical whatever
``memory_limit_mb``.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import PrepareConfig
from .errors import CorruptFileError, DataError
from .manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, write_manifest
from .storage import display_path, open_fs, storage_errors
from .raw import BadRows, RawBatch, RawColumns, bad_rows_table, QUARANTINE_SCHEMA, estimate_rows, iter_raw, list_raw_files, raw_input_bytes
from .memory import release_freed_memory
from .vocab import SortedIds
from .writer import SplitWriter, sequence_table, write_item_counts

# Peak bytes per interaction held in pass 2 (loaded columns, sort keys and permutation, the split
# copies and their Arrow conversion); measured ~110 on synthetic logs, rounded up.
BYTES_PER_ROW = 160
# Bytes per original id while the id vocabularies are sorted: sets how many ids one external-sort
# partition holds. Sized for Python strings, sort keys and dict entries; the sort is now Arrow and
# numpy compute (the string bytes, offsets and a few int64 arrays per name), which holds less, so
# this is a safe upper bound (measured: ~200 B of RSS per name of a partition).
NAME_BYTES = 400
MAX_BUCKETS = 1024


def write_block_bytes(memory_limit_mb: int) -> int:
    """Buffer of each output file open for writing. An S3 file (s3fs) holds what is written until
    it has a block (50 MiB by default) to upload as one part; one shard per split is open at a
    time and a shard grows with the data (data / num_shards), so with the default the writers held
    up to 3 x 50 MiB more as the data grew, whatever the bound. 1/16 of the bound, within S3's
    part sizes (>= 5 MiB; <= fsspec's default here, 10,000 parts of 5 MiB allow 50 GB files).
    The bytes written do not depend on it."""
    return min(50 << 20, max(5 << 20, (memory_limit_mb << 20) // 16))
# Original ids travel as strings through the spill (no vocabulary is held in memory), with the
# user's 64-bit hash computed once per batch.
_SPILL_SCHEMA = pa.schema([("u", pa.string()), ("i", pa.string()), ("t", pa.int64()), ("h", pa.uint64())])
_HIST_BINS = 1 << 16


@dataclass
class PrepareReport:
    output: str
    source: str
    protocol: str
    num_users: int
    num_items: int  # vocabulary incl. pad
    rows_read: int
    rows_bad: int
    quarantine_path: str | None
    users_dropped: int
    interactions_dropped: int
    interactions_kept: int
    splits: dict[str, int]
    time_slice_boundaries: list[int]
    input_bytes: int
    spill_buckets: int
    partitions: int
    wall_s: float
    peak_rss_mb: float
    extra: dict[str, Any] = field(default_factory=dict)
    filters: dict[str, Any] = field(default_factory=dict)  # as the manifest's extra records them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return main_summary(self)


def resolve_source(cfg: PrepareConfig, cache_dir: str | None = None) -> str:
    """URI of the raw log; named sources (MovieLens, synthetic) are fetched or made and cached."""
    if cfg.source == "movielens-1m":
        from .movielens import fetch_movielens

        return str(fetch_movielens("1m", cache_dir))
    if cfg.source == "movielens-100k":
        from .movielens import fetch_movielens

        return str(fetch_movielens("100k", cache_dir))
    if cfg.source == "synthetic":
        from .synthetic import synthetic_log_path

        return str(synthetic_log_path(cfg.synthetic_users, cfg.synthetic_items, cfg.seed, cache_dir))
    return cfg.source


def prepare_dataset(
    cfg: PrepareConfig,
    storage_options: dict[str, Any] | None = None,
    *,
    columns: RawColumns | None = None,
    quarantine: bool | None = None,
    spill_dir: str | None = None,
    num_buckets: int | None = None,
    cache_dir: str | None = None,
) -> PrepareReport:
    """Turn ``cfg.source`` into the dataset at ``cfg.output`` and return what happened.

    ``storage_options`` apply to both the raw source URI and the output. ``columns`` defaults to
    ``cfg.user_column``, ``cfg.item_column``, ``cfg.timestamp_column``.
    ``quarantine`` (default ``cfg.quarantine``) writes bad raw rows to
    ``<output>/_quarantine/bad_rows.parquet`` instead of failing. ``num_buckets`` overrides the
    spill fan-out computed from ``memory_limit_mb`` (tests use it to show it does not matter).
    """
    t0 = time.perf_counter()
    cfg.validate()
    if columns is None:
        columns = RawColumns(
            user=cfg.user_column,
            item=cfg.item_column,
            timestamp=cfg.timestamp_column,
        )
    # The rating column is read only for the rating filter.
    columns = replace(columns, rating=(columns.rating or cfg.rating_column) if cfg.min_rating is not None else None)
    if quarantine is None:
        quarantine = cfg.quarantine
    uri = resolve_source(cfg, cache_dir)
    with storage_errors(uri):
        src_fs, src_path = open_fs(uri, storage_options)
        files = list_raw_files(src_fs, src_path)
        input_bytes = raw_input_bytes(src_fs, files)
    budget_rows = max(1024, cfg.memory_limit_mb * (1 << 20) // BYTES_PER_ROW)
    if num_buckets is None:
        # x2: hash buckets are uneven; a bucket over budget is still loaded (whole users must be).
        with storage_errors(uri):
            wanted = math.ceil(2 * estimate_rows(src_fs, files) / budget_rows)
        num_buckets = 1 << max(0, math.ceil(math.log2(max(1, wanted))))
    if num_buckets < 1 or num_buckets & (num_buckets - 1) or num_buckets > MAX_BUCKETS:
        raise ValueError(f"num_buckets must be a power of two in [1, {MAX_BUCKETS}] (got {num_buckets})")

    # A file named by the OS error (permission denied, a file where a directory is expected) is
    # named in the message; otherwise the output.
    with storage_errors(cfg.output):
        out_fs, root = open_fs(cfg.output, storage_options)
        _clear_output(out_fs, root)
        own_spill = tempfile.mkdtemp(prefix="stackrec-prepare-", dir=spill_dir)
        # Arrow's default mimalloc pool keeps segments freed by its worker threads past
        # release_unused; the C heap hands them back on malloc_trim (.memory), so this job's
        # resident memory follows what it holds (measured 10M interactions, 128 MB bound: 359 MB
        # peak RSS with mimalloc, 338 MB with the system pool). Restored after: buffers remember
        # their pool, so those made here are freed to it whenever they die.
        previous_pool = pa.default_memory_pool()
        pa.set_memory_pool(pa.system_memory_pool())
        try:
            state = _pass1(uri, storage_options, columns, quarantine, num_buckets, own_spill, out_fs, root, budget_rows,
                           cfg.min_rating)
            report = _finish(cfg, state, out_fs, root, budget_rows, own_spill)
        finally:
            pa.set_memory_pool(previous_pool)
            shutil.rmtree(own_spill, ignore_errors=True)
    report.input_bytes = input_bytes
    report.wall_s = round(time.perf_counter() - t0, 3)
    report.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


# ---------------------------------------------------------------------------------------------
# Hashing and id order


def _hash64(text: str, key: bytes = b"") -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest(), "little")


_DOMAIN_KEY = b"stackrec-domain:"


def domain_of(original_user_id: str, seed: int, target_user_fraction: float) -> str:
    """'target' or 'source': the TF domain of one user (see the module docstring)."""
    key = _DOMAIN_KEY + int(seed).to_bytes(8, "little", signed=True)
    return "target" if _hash64(original_user_id, key) / 2.0**64 < target_user_fraction else "source"


def _domain_mask(cfg: PrepareConfig, names: list[str]) -> np.ndarray | None:
    """Per provisional user: in ``cfg.user_subset``'s domain (None when every user is kept)."""
    if cfg.user_subset == "all":
        return None
    key = _DOMAIN_KEY + int(cfg.seed).to_bytes(8, "little", signed=True)
    threshold = cfg.target_user_fraction
    target = np.fromiter((_hash64(n, key) / 2.0**64 < threshold for n in names), dtype=bool, count=len(names))
    return target if cfg.user_subset == "target" else ~target


def _shard_of(h: np.ndarray, num_shards: int) -> np.ndarray:
    # floor(h * S / 2^64) on 32 bits of precision: monotone in h, no uint64 overflow.
    return (((h >> np.uint64(32)) * np.uint64(num_shards)) >> np.uint64(32)).astype(np.int64)


def _bucket_of(h: np.ndarray, num_buckets: int) -> np.ndarray:
    if num_buckets == 1:
        return np.zeros(len(h), dtype=np.int64)
    return (h >> np.uint64(64 - int(num_buckets).bit_length() + 1)).astype(np.int64)


@dataclass
class _Pass1:
    bucket_paths: list[str]
    bucket_rows: np.ndarray
    rows_read: int
    rows_bad: int
    quarantine_path: str | None
    source: str
    rows_below_min_rating: int = 0


# ---------------------------------------------------------------------------------------------
# Pass 1


def _clear_output(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Drop what a previous prepare wrote here, manifest first: a crash leaves no valid dataset."""
    if not fs.exists(root):
        fs.makedirs(root, exist_ok=True)
        return
    manifest = posixpath.join(root, MANIFEST_NAME)
    if fs.exists(manifest):
        fs.rm(manifest)
    for entry in fs.ls(root, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        if name in ("train", "valid", "test", "id_maps", "stats", "_quarantine") or name.startswith("slice-"):
            fs.rm(entry, recursive=True)


def _pass1(
    uri: str,
    storage_options: dict[str, Any] | None,
    columns: RawColumns,
    quarantine: bool,
    num_buckets: int,
    spill: str,
    out_fs: fsspec.AbstractFileSystem,
    root: str,
    budget_rows: int,
    min_rating: float | None = None,
) -> _Pass1:
    # Raw batches are a small slice of the budget; threaded CSV parsing keeps several blocks in
    # flight, so only when the budget is roomy.
    read_rows = int(min(65536, max(4096, budget_rows // 16)))
    read_threads = budget_rows * BYTES_PER_ROW >= 256 << 20
    paths = [os.path.join(spill, f"bucket-{b:05d}.arrows") for b in range(num_buckets)]
    sinks = [pa.OSFile(p, "wb") for p in paths]
    writers = [pa.ipc.new_stream(s, _SPILL_SCHEMA) for s in sinks]
    bucket_rows = np.zeros(num_buckets, dtype=np.int64)
    rows_read = rows_bad = below_min_rating = 0
    q_writer = None
    q_file = None
    q_path = posixpath.join(root, "_quarantine", "bad_rows.parquet")
    try:
        for batch in iter_raw(
            uri, storage_options, columns, quarantine=quarantine,
            batch_rows=read_rows, csv_block_bytes=read_rows * 16, use_threads=read_threads,
        ):
            if isinstance(batch, BadRows):
                if q_writer is None:
                    out_fs.makedirs(posixpath.dirname(q_path), exist_ok=True)
                    q_file = out_fs.open(q_path, "wb")
                    q_writer = pq.ParquetWriter(q_file, QUARANTINE_SCHEMA, compression="zstd")
                q_writer.write_table(bad_rows_table(batch))
                rows_bad += len(batch)
                rows_read += len(batch)
                continue
            assert isinstance(batch, RawBatch)
            n = len(batch.user)
            if n == 0:
                continue
            rows_read += n
            user, item, timestamp = batch.user, batch.item, batch.timestamp
            if min_rating is not None:
                # Not bad rows: valid ones the rating filter leaves out, before anything is spilled.
                keep = batch.rating >= min_rating
                if not keep.all():
                    below_min_rating += n - int(keep.sum())
                    user, item, timestamp = user.filter(pa.array(keep)), item.filter(pa.array(keep)), timestamp[keep]
                    n = len(timestamp)
                    if n == 0:
                        continue
            user = user.cast(pa.string())
            enc = user.dictionary_encode()
            names = enc.dictionary.to_pylist()
            h = np.fromiter((_hash64(x) for x in names), dtype=np.uint64, count=len(names))
            h = h[np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]
            item = item.cast(pa.string())
            bucket = _bucket_of(h, num_buckets)
            order = np.argsort(bucket, kind="stable")  # stable: keeps input order within a bucket
            sb = bucket[order]
            cuts = np.flatnonzero(np.diff(sb)) + 1
            for s, e in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [n]]).tolist()):
                sel = order[s:e]
                b = int(sb[s])
                take = pa.array(sel)
                writers[b].write_batch(
                    pa.record_batch(
                        [user.take(take), item.take(take), pa.array(timestamp[sel]), pa.array(h[sel])],
                        schema=_SPILL_SCHEMA,
                    )
                )
                bucket_rows[b] += e - s
    finally:
        for w in writers:
            w.close()
        for s in sinks:
            s.close()
        if q_writer is not None:
            q_writer.close()
            q_file.close()
    return _Pass1(paths, bucket_rows, rows_read, rows_bad, q_path if rows_bad else None, uri, below_min_rating)


def _read_bucket(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all().combine_chunks()


@dataclass
class _BucketUsers:
    """The users of one spill bucket, numbered in first-seen order within the bucket (the order
    Arrow's dictionary_encode gives, so the same on every read of the bucket)."""

    row_user: np.ndarray  # (rows,) int64 local user of each row
    names: pa.Array  # (users,) original ids
    counts: np.ndarray  # (users,) interactions


def _bucket_users(table: pa.Table) -> _BucketUsers:
    enc = table.column("u").combine_chunks().dictionary_encode()
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.chunk(0) if enc.num_chunks else pa.array([], pa.string()).dictionary_encode()
    row_user = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    return _BucketUsers(row_user, enc.dictionary, np.bincount(row_user, minlength=len(enc.dictionary)))


def _touched_items(table: pa.Table, row_ok: np.ndarray) -> pa.Array:
    """Distinct items of the rows that survive the filters, first-seen order (deterministic)."""
    return pc.unique(table.column("i").combine_chunks().filter(pa.array(row_ok)))


def _item_mask(table: pa.Table, items: pa.Array | None) -> np.ndarray:
    """Per row of a bucket: its item is among ``items`` (every row when None)."""
    if items is None:
        return np.ones(table.num_rows, dtype=bool)
    return np.asarray(pc.is_in(table.column("i"), value_set=items).to_numpy(zero_copy_only=False), dtype=bool)


# ---------------------------------------------------------------------------------------------
# Pass A, part 1: the k-core loop (user_core / item_core)


class _ItemCounts:
    """Interactions per item over all buckets, as an Arrow table (item id string, int64 count):
    each bucket's ``value_counts`` is kept aside and merged by one ``group_by`` whenever the parts
    aside hold more rows than the merged table, so at most about twice the merged table is held
    and each merge re-reads no more rows than it adds."""

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []
        self._merged_rows = 0
        self._pending_rows = 0

    def add(self, items: pa.ChunkedArray) -> None:
        vc = pc.value_counts(items)
        self._parts.append(pa.table({"i": vc.field("values").cast(pa.string()), "n": vc.field("counts")}))
        self._pending_rows += len(vc)
        if self._pending_rows > max(self._merged_rows, 1 << 16):
            self.table()

    def table(self) -> pa.Table:
        merged = pa.concat_tables(self._parts).group_by("i", use_threads=False).aggregate([("n", "sum")])
        merged = pa.table({"i": merged.column("i"), "n": merged.column("n_sum")})
        self._parts, self._merged_rows, self._pending_rows = [merged], merged.num_rows, 0
        return merged


@dataclass
class _Core:
    """What the k-core loop leaves: the surviving users are in the per-bucket alive masks on disk,
    the surviving items here (None: every item of a surviving user). ``seen`` holds (users, items,
    interactions) alive at the start of each pass; ``rounds`` counts the passes that removed some."""

    user_min: int
    item_min: int
    items: pa.Array | None = None
    passes: int = 0
    rounds: int = 0
    seen: list[tuple[int, int, int]] = field(default_factory=list)


def _core_filter(cfg: PrepareConfig, s: _Pass1, alive_paths: list[str]) -> _Core | None:
    """k-core filtering until stable (None when ``user_core`` and ``item_core`` are both 0).

    Each pass reads the spill buckets one at a time and counts, over the rows of alive users whose
    item is alive, each user's interactions (per bucket: a user's rows are all in one bucket) and
    each item's (``_ItemCounts``, global). Then, as RecBole's ``_filter_by_inter_num`` does, users
    with fewer than ``max(min_sequence_length, user_core)`` and items with fewer than ``item_core``
    of those interactions are removed together, and the next pass counts again; the loop stops
    when a pass removes nothing. The surviving set is the largest one in which every user and item
    meets its threshold, so it does not depend on the order of removal (nor on the buckets). With
    ``item_core <= 1`` no item can fall below its threshold, so one pass is enough.
    """
    if not (cfg.user_core or cfg.item_core):
        return None
    core = _Core(user_min=max(cfg.min_sequence_length, cfg.user_core), item_min=cfg.item_core)
    while True:
        counts = _ItemCounts()
        users_alive = users_removed = rows = 0
        for b, path in enumerate(s.bucket_paths):
            table = _read_bucket(path)
            bu = _bucket_users(table)
            alive = np.load(alive_paths[b]) if core.passes else np.ones(len(bu.counts), dtype=bool)
            row_ok = alive[bu.row_user] & _item_mask(table, core.items)
            survive = alive & (np.bincount(bu.row_user[row_ok], minlength=len(bu.counts)) >= core.user_min)
            users_alive += int(alive.sum())
            users_removed += int((alive & ~survive).sum())
            rows += int(row_ok.sum())
            np.save(alive_paths[b], survive)
            counts.add(table.column("i").filter(pa.array(row_ok)))
            del table, bu
            release_freed_memory()
        item_counts = counts.table()
        keep = pc.greater_equal(item_counts.column("n"), core.item_min)
        items_removed = item_counts.num_rows - int(pc.sum(keep).as_py() or 0)
        core.passes += 1
        core.seen.append((users_alive, item_counts.num_rows, rows))
        if users_removed == 0 and items_removed == 0:
            break
        core.rounds += 1
        if core.item_min <= 1:
            break  # every item of a surviving user keeps >= 1 interaction: this is the fixed point
        core.items = item_counts.column("i").filter(keep).combine_chunks()
        del item_counts, counts
    return core


# ---------------------------------------------------------------------------------------------
# Between the passes: time-slice boundaries


def _iter_ts(paths: list[str]):
    for path in paths:
        yield np.load(path)


def _exact_quantile_values(
    paths: list[str], ranks: list[int], lo: int, hi: int, first_counts: np.ndarray, width: int
) -> list[int]:
    """The ranks-th smallest kept timestamps (1-based ranks), by histogram refinement.

    ``paths``: one .npy of kept timestamps per spill bucket. ``first_counts`` is the histogram
    of all kept timestamps over bins [lo + k*width, ...).
    """
    out = []
    for r in ranks:
        base, w, below, counts = lo, width, 0, first_counts
        while True:
            cum = below + np.cumsum(counts)
            j = int(np.searchsorted(cum, r))
            below = below + (int(cum[j - 1] - below) if j > 0 else 0)
            base = base + j * w
            if w == 1:
                out.append(int(base))
                break
            nw = max(1, -(-w // _HIST_BINS))
            counts = np.zeros(-(-w // nw), dtype=np.int64)
            for t in _iter_ts(paths):
                m = (t >= base) & (t < base + w)
                if m.any():
                    counts += np.bincount((t[m] - base) // nw, minlength=len(counts))[: len(counts)]
            w = nw
    return out


ID_MAP_ROW_GROUP = 1 << 16


class _IdMapWriter:
    """``id_maps/<name>.parquet`` written as names arrive in dense-id order, in row groups of
    exactly ``ID_MAP_ROW_GROUP`` rows (so the bytes do not depend on how the names were batched).

    The names arrive (from ``SortedIds``) and wait as Arrow strings, not Python ``str``s: Python
    objects for a partition's names, scattered over the interpreter's object arenas, would pin
    nearly every arena of the partition while up to ``ID_MAP_ROW_GROUP`` of them are kept alive,
    so the whole partition's objects (hundreds of MB at a 1 GB bound) would stay resident under
    pass 2. A list of ``str`` is still accepted."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, name: str, id_type: pa.DataType,
                 block_size: int | None = None) -> None:
        self.rel = f"id_maps/{name}.parquet"
        fs.makedirs(posixpath.join(root, "id_maps"), exist_ok=True)
        self.schema = pa.schema([("original_id", pa.string()), ("dense_id", id_type)])
        self._file = fs.open(posixpath.join(root, self.rel), "wb", block_size=block_size)
        self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")
        self._names = pa.array([], pa.string())
        self._first = 0

    def add(self, names: pa.Array | list[str], first_id: int) -> None:
        if not len(self._names):
            self._first = first_id
        names = names.cast(pa.string()) if isinstance(names, pa.Array) else pa.array(names, pa.string())
        self._names = pa.concat_arrays([self._names, names])
        while len(self._names) >= ID_MAP_ROW_GROUP:
            self._emit(self._names.slice(0, ID_MAP_ROW_GROUP))
            # A copy, so the rest does not keep the whole concatenated buffer alive.
            self._names = pa.concat_arrays([pa.array([], pa.string()), self._names.slice(ID_MAP_ROW_GROUP)])

    def _emit(self, names: pa.Array) -> None:
        ids = np.arange(self._first, self._first + len(names))
        self._writer.write_table(pa.table([names, pa.array(ids, self.schema.field(1).type)],
                                          schema=self.schema), row_group_size=ID_MAP_ROW_GROUP)
        self._first += len(names)

    def close(self) -> str:
        if len(self._names):
            self._emit(self._names)
            self._names = pa.array([], pa.string())
        self._writer.close()
        self._file.close()
        return self.rel


@dataclass
class _Census:
    """Pass A's counts over all buckets: who is kept, what was dropped, the kept time range."""

    total_users: int = 0
    users_alive: int = 0  # past the length / k-core filter, every domain
    rows_alive: int = 0
    users_dropped: int = 0
    interactions_dropped: int = 0
    interactions_kept: int = 0
    users_other_domain: int = 0
    interactions_other_domain: int = 0
    tmin: int | None = None
    tmax: int | None = None


def _finish(
    cfg: PrepareConfig, s: _Pass1, fs: fsspec.AbstractFileSystem, root: str, budget_rows: int, spill: str
) -> PrepareReport:
    """Pass A (k-core loop, census), dense ids, CL slice boundaries, pass 2 (rows -> splits),
    manifest last."""
    names_per_partition = budget_rows * BYTES_PER_ROW // NAME_BYTES
    users = SortedIds(os.path.join(spill, "users"), names_per_partition)
    items = SortedIds(os.path.join(spill, "items"), names_per_partition)
    paths = {name: [os.path.join(spill, f"{name}-{b:05d}.npy") for b in range(len(s.bucket_paths))]
             for name in ("alive", "kept", "rows", "ts")}
    release_freed_memory()  # pass 1's read buffers
    core = _core_filter(cfg, s, paths["alive"])
    census = _census(cfg, s, core, users, items, paths)
    _check_census(cfg, s, census)
    block = write_block_bytes(cfg.memory_limit_mb)
    num_users, num_items, id_maps = _assign_ids(fs, root, users, items, block)
    release_freed_memory()  # the id sort's objects, before pass 2 allocates its arrays
    filters = _filters_record(cfg, s, core, census, num_items)
    boundaries = _slice_boundaries(cfg, census, paths["ts"])
    split_names = ["train", "valid", "test"] + [f"slice-{k}" for k in range(1, cfg.time_slices + 1)]
    writers = {n: SplitWriter(fs, root, n, cfg.num_shards, cfg.row_group_size,
                              num_items=num_items if n == "train" else None, block_size=block)
               for n in split_names}
    groups = _bucket_groups(s.bucket_rows.tolist(), budget_rows)
    _write_rows(cfg, s, writers, groups, paths, users, items, boundaries)
    split_infos = {n: w.close() for n, w in writers.items()}
    item_counts = write_item_counts(fs, root, writers["train"].item_counts, "train")
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        num_items=num_items,
        num_users=num_users,
        protocol=cfg.split,
        splits=split_infos,
        id_maps=id_maps,
        created_by="stackrec_dist.data.prepare",
        extra=_manifest_extra(cfg, s, census, boundaries, filters),
        item_counts=item_counts,
    )
    write_manifest(fs, root, manifest)
    return PrepareReport(
        output=cfg.output,
        source=cfg.source,
        protocol=cfg.split,
        num_users=num_users,
        num_items=num_items,
        rows_read=s.rows_read,
        rows_bad=s.rows_bad,
        quarantine_path=display_path(fs, s.quarantine_path) if s.quarantine_path else None,
        users_dropped=census.users_dropped,
        interactions_dropped=census.interactions_dropped,
        interactions_kept=census.interactions_kept,
        splits={n: info.rows for n, info in split_infos.items()},
        time_slice_boundaries=boundaries,
        input_bytes=0,
        spill_buckets=len(s.bucket_paths),
        partitions=len(groups),
        wall_s=0.0,
        peak_rss_mb=0.0,
        extra={"manifest": manifest, "id_sort_partitions": {"users": users.partitions, "items": items.partitions},
               "id_sort_largest_partition": {"users": users.largest_partition, "items": items.largest_partition}},
        filters=filters,
    )


def _census(cfg: PrepareConfig, s: _Pass1, core: _Core | None, users: SortedIds, items: SortedIds,
            paths: dict[str, list[str]]) -> _Census:
    """Pass A, one bucket at a time (a user's rows are all in one bucket): who is alive (>=
    min_sequence_length interactions, or the k-core's alive masks ``paths["alive"]``), the rows
    that survive (saved to ``paths["rows"]``: alive user and, with the k-core, alive item), who is
    kept (alive and in the domain; ``paths["kept"]``), the items of the surviving rows, and the
    kept timestamps when slicing (``paths["ts"]``). Surviving rows of every domain decide the item
    id map; kept users decide the rows."""
    c = _Census()
    for b, path in enumerate(s.bucket_paths):
        table = _read_bucket(path)
        bu = _bucket_users(table)
        if core is None:
            alive = bu.counts >= cfg.min_sequence_length
            row_ok = alive[bu.row_user]
        else:
            alive = np.load(paths["alive"][b])
            row_ok = alive[bu.row_user] & _item_mask(table, core.items)
        in_domain = _domain_mask(cfg, bu.names.to_pylist()) if cfg.user_subset != "all" else None
        if in_domain is None:
            in_domain = np.ones(len(bu.counts), dtype=bool)
        kept = alive & in_domain
        row_domain = in_domain[bu.row_user]
        row_kept = row_ok & row_domain
        c.total_users += len(bu.counts)
        c.users_alive += int(alive.sum())
        c.rows_alive += int(row_ok.sum())
        c.users_dropped += int((~alive & in_domain).sum())
        c.interactions_dropped += int((row_domain & ~row_ok).sum())
        c.interactions_kept += int(row_kept.sum())
        c.users_other_domain += int((alive & ~in_domain).sum())
        c.interactions_other_domain += int((row_ok & ~row_domain).sum())
        np.save(paths["kept"][b], kept)
        np.save(paths["rows"][b], row_ok)
        users.add(bu.names.filter(pa.array(kept)))
        items.add(_touched_items(table, row_ok))
        if cfg.time_slices > 1:
            t = table.column("t").to_numpy()[row_kept]
            np.save(paths["ts"][b], t)
            if len(t):
                c.tmin = int(t.min()) if c.tmin is None else min(c.tmin, int(t.min()))
                c.tmax = int(t.max()) if c.tmax is None else max(c.tmax, int(t.max()))
        del table, bu
        release_freed_memory()
    return c


def _check_census(cfg: PrepareConfig, s: _Pass1, c: _Census) -> None:
    """A dataset without a single kept user is bad input, named with the reason."""
    valid = s.rows_read - s.rows_bad
    if c.users_alive == 0 and (cfg.min_rating is not None or cfg.user_core or cfg.item_core):
        raise DataError(
            f"no user is left by the filters (min_sequence_length={cfg.min_sequence_length}, "
            f"min_rating={cfg.min_rating}, user_core={cfg.user_core}, item_core={cfg.item_core}, k-core until "
            f"stable): {valid} valid rows, {s.rows_below_min_rating} of them below min_rating, "
            f"{c.total_users} users in the rest",
            path=s.source,
        )
    if c.users_alive == 0:
        raise DataError(
            f"no user has >= min_sequence_length={cfg.min_sequence_length} valid interactions "
            f"({c.total_users} users, {valid} valid rows)",
            path=s.source,
        )
    if c.interactions_kept == 0:
        raise DataError(
            f"prepare.user_subset={cfg.user_subset!r}: no user with >= min_sequence_length="
            f"{cfg.min_sequence_length} interactions falls in this domain "
            f"(target_user_fraction={cfg.target_user_fraction}, seed={cfg.seed}, "
            f"{c.users_other_domain} users in the other domain)",
            path=s.source,
        )


def _assign_ids(fs: fsspec.AbstractFileSystem, root: str, users: SortedIds,
                items: SortedIds, block_size: int | None = None) -> tuple[int, int, dict[str, Any]]:
    """Dense ids: global ranks in sorted original-id order, by external sort; the id maps are
    written as the sorted names come out. Returns (num_users, num_items incl. pad, id_maps).
    The user map is closed before the item sort: a buffered (S3) file holds up to a block until
    then."""
    user_map = _IdMapWriter(fs, root, "users", pa.int64(), block_size)
    num_users = users.assign(0, user_map.add)
    users_rel = user_map.close()
    item_map = _IdMapWriter(fs, root, "items", pa.int32(), block_size)
    num_items = items.assign(1, item_map.add) + 1
    return num_users, num_items, {"items": item_map.close(), "users": users_rel}


def _slice_boundaries(cfg: PrepareConfig, c: _Census, ts_paths: list[str]) -> list[int]:
    """CL slice boundaries b_1..b_{T-1}: exact quantiles of the kept timestamps (none when T <= 1)."""
    if cfg.time_slices <= 1:
        return []
    width = max(1, -(-(c.tmax - c.tmin + 1) // _HIST_BINS))
    counts = np.zeros(-(-(c.tmax - c.tmin + 1) // width), dtype=np.int64)
    for t in _iter_ts(ts_paths):
        if len(t):
            counts += np.bincount((t - c.tmin) // width, minlength=len(counts))[: len(counts)]
    ranks = [-(-k * c.interactions_kept // cfg.time_slices) for k in range(1, cfg.time_slices)]
    return _exact_quantile_values(ts_paths, ranks, c.tmin, c.tmax, counts, width)


def _bucket_groups(bucket_rows: list[int], budget_rows: int) -> list[list[int]]:
    """Consecutive buckets, as many as fit in the row budget together (at least one each)."""
    groups: list[list[int]] = []
    total = 0
    for b, rows in enumerate(bucket_rows):
        if groups and total + rows <= budget_rows:
            groups[-1].append(b)
            total += rows
        else:
            groups.append([b])
            total = rows
    return groups


def _write_rows(cfg: PrepareConfig, s: _Pass1, writers: dict[str, SplitWriter], groups: list[list[int]],
                paths: dict[str, list[str]], users: SortedIds, items: SortedIds, boundaries: list[int]) -> None:
    """Pass 2, one group of buckets at a time: the surviving rows of kept users with dense ids,
    sorted by (user hash, user, time), cut into the splits."""
    bounds = boundaries + [None] if cfg.time_slices else []
    held_key = int(cfg.seed).to_bytes(8, "little", signed=True)
    for g in groups:
        parts = []
        for b in g:
            parts.append(_bucket_rows(cfg, s.bucket_paths[b], np.load(paths["kept"][b]), np.load(paths["rows"][b]),
                                      users.ids(b), items.ids(b), held_key))
        u = np.concatenate([p[0] for p in parts])
        i = np.concatenate([p[1] for p in parts])
        t = np.concatenate([p[2] for p in parts])
        h = np.concatenate([p[3] for p in parts])
        held = np.concatenate([p[4] for p in parts]) if cfg.split == "held_out" else None
        del parts
        if len(u) == 0:
            continue
        perm = np.lexsort((t, u, h))  # last key primary; lexsort is stable, so ties keep input order
        u, i, t, h = u[perm], i[perm], t[perm], h[perm]
        if held is not None:
            held = held[perm]
        del perm
        _emit_group(cfg, writers, u, i, t, h, held, bounds)
        del u, i, t, h, held
        # Or the allocators keep this group's peak resident under the next (see .memory).
        release_freed_memory()


def _filters_record(cfg: PrepareConfig, s: _Pass1, core: _Core | None, c: _Census, num_items: int) -> dict[str, Any]:
    """The rating and k-core filters' options and what each removed (manifest extra, report)."""
    record: dict[str, Any] = {
        "min_rating": None if cfg.min_rating is None else float(cfg.min_rating),
        "rating_column": cfg.rating_column if cfg.min_rating is not None else None,
        "rows_below_min_rating": s.rows_below_min_rating,
        "user_core": cfg.user_core,
        "item_core": cfg.item_core,
        "core": None,
    }
    if core is not None:
        # (users, items, interactions) alive before each round and after the last one.
        states = core.seen[: core.rounds] + [(c.users_alive, num_items - 1, c.rows_alive)]
        names = ("users", "items", "interactions")
        record["core"] = {
            "user_min": core.user_min,
            "item_min": core.item_min,
            "passes": core.passes,
            "before": dict(zip(names, core.seen[0])),
            "after": dict(zip(names, states[-1])),
            "removed": dict(zip(names, (a - b for a, b in zip(core.seen[0], states[-1])))),
            "rounds": [dict(zip(names, (a - b for a, b in zip(x, y)))) for x, y in zip(states, states[1:])],
        }
    return record


def _manifest_extra(cfg: PrepareConfig, s: _Pass1, c: _Census, boundaries: list[int],
                    filters: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``extra``: the options and counts of this prepare, for provenance."""
    return {
        "source": cfg.source,
        "min_sequence_length": cfg.min_sequence_length,
        "held_out_fraction": cfg.held_out_fraction if cfg.split == "held_out" else None,
        "seed": cfg.seed,
        "time_slices": cfg.time_slices,
        "time_slice_boundaries": boundaries,
        "interactions": c.interactions_kept,
        "rows_bad": s.rows_bad,
        "quarantine": "_quarantine/bad_rows.parquet" if s.rows_bad else None,
        "users_dropped": c.users_dropped,
        "interactions_dropped": c.interactions_dropped,
        "user_subset": cfg.user_subset,
        "target_user_fraction": cfg.target_user_fraction if cfg.user_subset != "all" else None,
        "domain_hash": (
            "blake2b-64(original user id, key=b'stackrec-domain:' + int64le(seed)) / 2**64 "
            "< target_user_fraction -> target, else source"
        ) if cfg.user_subset != "all" else None,
        "users_other_domain": c.users_other_domain,
        "interactions_other_domain": c.interactions_other_domain,
        **filters,
    }


def _bucket_rows(cfg: PrepareConfig, path: str, kept: np.ndarray, row_ok: np.ndarray, user_ids: np.ndarray,
                 item_ids: np.ndarray, held_key: bytes) -> tuple[np.ndarray, ...]:
    """(user, item, timestamp, hash, held-out code) of the surviving rows (``row_ok``) of the kept
    users of one bucket, dense ids, in input order. ``user_ids`` / ``item_ids``: the bucket's
    sources' dense ids from pass A."""
    table = _read_bucket(path)
    bu = _bucket_users(table)
    user_dense = np.full(len(bu.counts), -1, dtype=np.int64)
    user_dense[np.flatnonzero(kept)] = user_ids
    touched = _touched_items(table, row_ok)
    m = row_ok & kept[bu.row_user]
    sel = pa.array(m)
    local_item = pc.index_in(table.column("i").combine_chunks().filter(sel), value_set=touched)
    i = item_ids[np.asarray(local_item.to_numpy(zero_copy_only=False), dtype=np.int64)]
    held = np.zeros(0, dtype=np.int8)
    if cfg.split == "held_out":
        frac = cfg.held_out_fraction
        kept_names = bu.names.filter(pa.array(kept)).to_pylist()
        x = np.fromiter((_hash64(n, held_key) / 2.0**64 for n in kept_names), dtype=np.float64, count=len(kept_names))
        code = np.zeros(len(bu.counts), dtype=np.int8)
        code[np.flatnonzero(kept)] = np.where(x < frac, 2, np.where(x < 2 * frac, 1, 0))
        held = code[bu.row_user[m]]
    return (user_dense[bu.row_user[m]], i, table.column("t").to_numpy()[m], table.column("h").to_numpy()[m], held)


def _drop_tail(offsets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(value mask, new offsets) removing the last k elements of every row."""
    lens = np.diff(offsets)
    keep_lens = np.maximum(lens - k, 0)
    pos = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lens)
    mask = pos < np.repeat(keep_lens, lens)
    return mask, np.concatenate([[0], np.cumsum(keep_lens)])


def _emit_group(
    cfg: PrepareConfig,
    writers: dict[str, SplitWriter],
    u: np.ndarray,
    i: np.ndarray,
    t: np.ndarray,
    h: np.ndarray,
    held: np.ndarray | None,
    bounds: list[int | None],
) -> None:
    starts = np.concatenate([[0], np.flatnonzero(np.diff(u)) + 1])
    offsets = np.concatenate([starts, [len(u)]])
    users = u[starts]
    shard = _shard_of(h[starts], cfg.num_shards)
    domain = None if cfg.user_subset == "all" else cfg.user_subset

    def rows(name: str, sel_users: np.ndarray, offs: np.ndarray, vmask: np.ndarray | None, k: int = 0) -> None:
        items = i if vmask is None else i[vmask]
        ts = t if vmask is None else t[vmask]
        writers[name].write(
            sequence_table(users[sel_users], offs, items, ts, time_slice=k, domain=domain), shard[sel_users]
        )

    if cfg.split == "leave_last_out":
        all_users = np.arange(len(users))
        rows("test", all_users, offsets, None)
        vmask, voff = _drop_tail(offsets, 1)
        rows("valid", all_users, voff, vmask)
        tmask, toff = _drop_tail(offsets, 2)
        rows("train", all_users, toff, tmask)
        train_mask, train_off, train_users = tmask, toff, all_users
    else:
        lens = np.diff(offsets)
        user_split = held[starts]  # held is per row (constant within a user's rows)
        row_split = np.repeat(user_split, lens)
        for code, name in ((0, "train"), (1, "valid"), (2, "test")):
            sel = np.flatnonzero(user_split == code)
            vmask = row_split == code
            offs = np.concatenate([[0], np.cumsum(lens[sel])])
            rows(name, sel, offs, vmask)
        train_users = np.flatnonzero(user_split == 0)
        train_mask = row_split == 0
        train_off = np.concatenate([[0], np.cumsum(lens[train_users])])
    for k, b in enumerate(bounds, start=1):
        if b is None:
            smask = train_mask
        else:
            smask = train_mask & (t <= b)
        # Per training row, how many of its interactions fall in the slice.
        row_of = np.repeat(np.arange(len(users)), np.diff(offsets))
        per_row = np.bincount(row_of[smask], minlength=len(users))[train_users]
        nonempty = per_row > 0
        sel = train_users[nonempty]
        offs = np.concatenate([[0], np.cumsum(per_row[nonempty])])
        rows(f"slice-{k}", sel, offs, smask, k)


def read_id_map(uri: str, name: str = "items", storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """original id -> dense id, from a prepared dataset's ``id_maps/<name>.parquet``."""
    fs, root = open_fs(uri, storage_options)
    path = posixpath.join(root, "id_maps", f"{name}.parquet")
    with storage_errors(display_path(fs, path)), fs.open(path, "rb") as f:
        try:
            table = pq.read_table(f)
        except pa.ArrowException as err:
            raise CorruptFileError(f"not a readable Parquet file: {err}", path=display_path(fs, path)) from err
    return dict(zip(table.column("original_id").to_pylist(), table.column("dense_id").to_pylist()))


def main_summary(report: PrepareReport) -> str:
    """Human-readable lines for the CLI."""
    if report.filters.get("core"):
        dropped = f"  dropped by the k-core: {report.users_dropped} users, {report.interactions_dropped} interactions"
    else:
        dropped = (f"  users dropped (< min_sequence_length) {report.users_dropped} with "
                   f"{report.interactions_dropped} interactions")
    lines = [
        f"prepared {report.source} -> {report.output} ({report.protocol})",
        f"  users {report.num_users}  items {report.num_items - 1} (+pad)  interactions {report.interactions_kept}",
        f"  rows read {report.rows_read}  bad {report.rows_bad}"
        + (f" (quarantined at {report.quarantine_path})" if report.quarantine_path else ""),
        dropped,
        "  " + "  ".join(f"{k}={v}" for k, v in report.splits.items()),
        f"  {report.wall_s:.1f} s, peak RSS {report.peak_rss_mb:.0f} MB, {report.spill_buckets} spill buckets, "
        f"{report.partitions} partitions",
    ]
    manifest = report.extra.get("manifest")
    extra = getattr(manifest, "extra", None) or {}
    if extra.get("user_subset", "all") != "all":
        lines.append(
            f"  domain {extra['user_subset']} (target_user_fraction {extra['target_user_fraction']}, "
            f"seed {extra['seed']}): {extra['users_other_domain']} users of the other domain left out; "
            f"item ids shared by all domains"
        )
    if report.time_slice_boundaries:
        lines.append(f"  time slice boundaries {report.time_slice_boundaries}")
    return "\n".join(lines + _filter_lines(report.filters))


def _filter_lines(filters: dict[str, Any]) -> list[str]:
    lines = []
    if filters.get("min_rating") is not None:
        lines.append(f"  rating filter ({filters['rating_column']} >= {filters['min_rating']:g}): "
                     f"{filters['rows_below_min_rating']} rows dropped")
    core = filters.get("core")
    if core:
        removed = core["removed"]
        lines.append(
            f"  k-core (users >= {core['user_min']}, items >= {core['item_min']} interactions, until stable): "
            f"{len(core['rounds'])} rounds in {core['passes']} passes removed {removed['users']} users, "
            f"{removed['items']} items, {removed['interactions']} interactions"
        )
        if core["rounds"]:
            lines.append("  k-core rounds (users, items, interactions removed): "
                         + " ".join(f"({r['users']}, {r['items']}, {r['interactions']})" for r in core["rounds"]))
    return lines
