"""The dataset manifest and the sequence-Parquet row schema (see docs/architecture.md).

``manifest.json`` is the single source of truth of a prepared dataset: readers never list
directories (listing is slow and eventually consistent on object stores), they read the manifest and
open exactly the shards it names. It is written last, so a dataset without one is incomplete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from .errors import ManifestError, MissingShardError, SchemaError
from .storage import display_path, open_fs  # noqa: F401  (open_fs re-exported for writers)
from .windows import pairs_per_row, pieces_per_row

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"

# One row per sequence. ``domain`` is null for single-domain data; ``time_slice`` is k for rows of
# the CL split ``slice-k`` and 0 elsewhere.
SEQUENCE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("timestamps", pa.list_(pa.int64()), nullable=False),
        pa.field("domain", pa.string(), nullable=True),
        pa.field("time_slice", pa.int32(), nullable=False),
    ]
)
REQUIRED_COLUMNS = ("user_id", "item_ids", "timestamps")
OPTIONAL_COLUMNS = ("domain", "time_slice")


def check_sequence_schema(schema: pa.Schema, path: str | None = None) -> None:
    """Raise SchemaError naming the file and column when ``schema`` cannot be read as sequences."""
    for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        idx = schema.get_field_index(name)
        if idx < 0:
            if name in REQUIRED_COLUMNS:
                raise SchemaError(f"missing column (columns present: {schema.names})", path=path, field=name)
            continue
        want = SEQUENCE_SCHEMA.field(name).type
        got = schema.field(idx).type
        # large_list is what some writers (pandas, polars) produce for the same data.
        same_list = (
            pa.types.is_list(want) and pa.types.is_large_list(got) and got.value_type.equals(want.value_type)
        )
        if not got.equals(want) and not same_list:
            raise SchemaError(f"type {got} where {want} is expected", path=path, field=name)


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root, posix separators
    rows: int
    row_groups: int
    sha256: str
    bytes: int
    # sha256 of the shard's last ``footer_bytes`` bytes (Parquet footer, its length, magic),
    # checked on each shard's first read; the pages carry CRC32s checked on every read. None in
    # datasets prepared before page checksums: the whole shard is hashed on first read instead.
    footer_sha256: str | None = None
    footer_bytes: int = 0


@dataclass
class SplitInfo:
    rows: int
    shards: list[ShardInfo] = field(default_factory=list)
    # Histogram of the rows' sequence lengths: {"length": [n, ...] ascending, "count": [rows, ...]}.
    # The epoch's window count for any max_len L, window stride S and either packing follows
    # (sum count * ceil((n-1)/S) exactly; the (input, target) pairs concat packs) without opening
    # a shard. None in manifests written before it existed.
    length_histogram: dict[str, list[int]] | None = None

    def windows(self, max_len: int, stride: int = 0) -> int:
        """Pad-layout windows of this split: sum over rows of ceil((n - 1) / S), S = ``stride`` or
        ``max_len`` when 0 (``windows.pieces_per_row``)."""
        lengths, counts = self._histogram()
        return int((counts * pieces_per_row(lengths, stride or max_len)).sum())

    def pairs(self, max_len: int, stride: int = 0) -> int:
        """(input, target) pairs of those windows (``windows.pairs_per_row``): the transitions when
        ``stride`` is 0 or ``max_len``; what ``pack="concat"`` lays into windows of ``max_len``."""
        lengths, counts = self._histogram()
        return int((counts * pairs_per_row(lengths, max_len, stride or max_len)).sum())

    def transitions(self) -> int:
        """Next-item transitions of this split: sum over rows of n - 1."""
        lengths, counts = self._histogram()
        return int((counts * np.maximum(lengths - 1, 0)).sum())

    def _histogram(self) -> tuple[np.ndarray, np.ndarray]:
        if self.length_histogram is None:
            raise ValueError("no length_histogram in this manifest split")
        h = self.length_histogram
        return np.asarray(h["length"], np.int64), np.asarray(h["count"], np.int64)


@dataclass
class Manifest:
    schema_version: int
    num_items: int  # vocabulary incl. pad id 0
    num_users: int
    protocol: str  # leave_last_out | held_out | synthetic
    splits: dict[str, SplitInfo]
    id_maps: dict[str, str] = field(default_factory=dict)  # {"items": "id_maps/items.parquet", ...}
    created_by: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Occurrences of every item id in the training split, for the unigram sampler: a separate
    # Parquet file (one int64 column ``count``, row j = item id j, row 0 = pad = 0) so a
    # million-item catalogue does not bloat this file. {"path", "split", "sha256", "bytes",
    # "total"}; None in manifests written before it existed.
    item_counts: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def shard_paths(self, split: str) -> list[str]:
        return [s.path for s in self.splits[split].shards]


def shard_checksums(data: bytes) -> dict[str, Any]:
    """The manifest's integrity fields of a whole Parquet file's bytes (``bytes``, ``sha256``,
    ``footer_sha256``, ``footer_bytes``), for tools that rewrite a shard outside ``prepare``."""
    footer = int.from_bytes(data[-8:-4], "little") + 8  # the footer, its length, the magic
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "footer_sha256": hashlib.sha256(data[-footer:]).hexdigest(), "footer_bytes": footer}


def file_digest(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, streamed."""
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            h.update(buf)
            size += len(buf)
    return h.hexdigest(), size


def manifest_json(manifest: Manifest) -> bytes:
    # Fixed key order and formatting: identical input must give an identical manifest.
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n").encode()


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> str:
    """Write ``<root>/manifest.json`` so that readers see either no manifest or the whole one.

    Locally the temp file is renamed (atomic on POSIX). On object stores a single PUT is already
    atomic; the rename there is a server-side copy, still never a half-written object.
    """
    root = root.rstrip("/")
    final = posixpath.join(root, MANIFEST_NAME)
    tmp = posixpath.join(root, f".{MANIFEST_NAME}.tmp-{uuid.uuid4().hex}")
    fs.makedirs(root, exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(manifest_json(manifest))
    try:
        fs.mv(tmp, final)
    except Exception:
        try:
            fs.rm(tmp)
        finally:
            raise
    return final


def _need(raw: dict[str, Any], key: str, types: type | tuple[type, ...], where: str, mpath: str) -> Any:
    if key not in raw:
        raise ManifestError("missing field", path=mpath, field=f"{where}{key}")
    value = raw[key]
    if isinstance(value, bool) and types is not bool or not isinstance(value, types):
        tname = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise ManifestError(f"must be {tname} (got {value!r})", path=mpath, field=f"{where}{key}")
    return value


def _optional(raw: dict[str, Any], key: str, types: type | tuple[type, ...], where: str, mpath: str) -> Any:
    return _need(raw, key, types, where, mpath) if raw.get(key) is not None else None


def manifest_from_dict(raw: Any, mpath: str = MANIFEST_NAME) -> Manifest:
    """Validate a decoded manifest; errors name the manifest path and the dotted field."""
    if not isinstance(raw, dict):
        raise ManifestError("top level must be a JSON object", path=mpath)
    version = _need(raw, "schema_version", int, "", mpath)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ManifestError(
            f"unknown schema_version {version} (this code reads {list(SUPPORTED_SCHEMA_VERSIONS)})",
            path=mpath,
            field="schema_version",
        )
    num_items = _need(raw, "num_items", int, "", mpath)
    if num_items < 2:
        raise ManifestError(f"must be >= 2 (pad + one item), got {num_items}", path=mpath, field="num_items")
    num_users = _need(raw, "num_users", int, "", mpath)
    protocol = _need(raw, "protocol", str, "", mpath)
    splits_raw = _need(raw, "splits", dict, "", mpath)
    splits: dict[str, SplitInfo] = {}
    for name, sraw in splits_raw.items():
        where = f"splits.{name}."
        if not isinstance(sraw, dict):
            raise ManifestError("must be an object", path=mpath, field=f"splits.{name}")
        rows = _need(sraw, "rows", int, where, mpath)
        shards_raw = _need(sraw, "shards", list, where, mpath)
        shards = []
        for i, shraw in enumerate(shards_raw):
            w = f"{where}shards[{i}]."
            if not isinstance(shraw, dict):
                raise ManifestError("must be an object", path=mpath, field=w[:-1])
            shards.append(
                ShardInfo(
                    path=_need(shraw, "path", str, w, mpath),
                    rows=_need(shraw, "rows", int, w, mpath),
                    row_groups=_need(shraw, "row_groups", int, w, mpath),
                    sha256=_need(shraw, "sha256", str, w, mpath),
                    bytes=_need(shraw, "bytes", int, w, mpath),
                    footer_sha256=_optional(shraw, "footer_sha256", str, w, mpath),
                    footer_bytes=_optional(shraw, "footer_bytes", int, w, mpath) or 0,
                )
            )
        total = sum(s.rows for s in shards)
        if total != rows:
            raise ManifestError(f"rows {rows} != sum of shard rows {total}", path=mpath, field=f"{where}rows")
        hist = sraw.get("length_histogram")
        if hist is not None:
            hist = _check_histogram(hist, rows, mpath, f"{where}length_histogram")
        splits[name] = SplitInfo(rows=rows, shards=shards, length_histogram=hist)
    id_maps = raw.get("id_maps", {})
    if not isinstance(id_maps, dict) or not all(isinstance(v, str) for v in id_maps.values()):
        raise ManifestError(f"must map names to paths (got {id_maps!r})", path=mpath, field="id_maps")
    created_by = raw.get("created_by", "")
    extra = raw.get("extra", {})
    if not isinstance(extra, dict):
        raise ManifestError(f"must be an object (got {extra!r})", path=mpath, field="extra")
    counts = raw.get("item_counts")
    if counts is not None:
        if not isinstance(counts, dict):
            raise ManifestError(f"must be an object (got {counts!r})", path=mpath, field="item_counts")
        for key, types in (("path", str), ("split", str), ("sha256", str), ("bytes", int), ("total", int)):
            _need(counts, key, types, "item_counts.", mpath)
        counts = dict(counts)
    return Manifest(version, num_items, num_users, protocol, splits, dict(id_maps), str(created_by), dict(extra),
                    counts)


def _check_histogram(hist: Any, rows: int, mpath: str, where: str) -> dict[str, list[int]]:
    ok = (
        isinstance(hist, dict)
        and isinstance(hist.get("length"), list)
        and isinstance(hist.get("count"), list)
        and len(hist["length"]) == len(hist["count"])
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in hist["length"] + hist["count"])
    )
    if not ok:
        raise ManifestError("must be {\"length\": [ints >= 0], \"count\": [ints >= 0]} of equal length",
                            path=mpath, field=where)
    if sum(hist["count"]) != rows:
        raise ManifestError(f"counts sum to {sum(hist['count'])}, the split has {rows} rows", path=mpath, field=where)
    return {"length": list(hist["length"]), "count": list(hist["count"])}


def read_manifest(
    fs: fsspec.AbstractFileSystem,
    root: str,
    *,
    check_files: bool = True,
    verify_checksums: bool = False,
) -> Manifest:
    """Read and validate ``<root>/manifest.json``.

    ``check_files``: every listed shard must exist with the recorded size (one metadata call each).
    ``verify_checksums``: also re-hash every shard (reads all bytes; for audits, not every job start).
    """
    root = root.rstrip("/")
    mpath = posixpath.join(root, MANIFEST_NAME)
    shown = display_path(fs, mpath)
    try:
        with fs.open(mpath, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise ManifestError(
            "no manifest: not a prepared dataset, or preparation did not finish", path=shown
        ) from None
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"not valid JSON: {err}", path=shown) from None
    manifest = manifest_from_dict(raw, shown)
    if check_files or verify_checksums:
        for name, split in manifest.splits.items():
            for i, shard in enumerate(split.shards):
                field_name = f"splits.{name}.shards[{i}]"
                spath = posixpath.join(root, shard.path)
                try:
                    size = fs.size(spath)
                except FileNotFoundError:
                    size = None
                if size is None:
                    raise MissingShardError(
                        f"shard {shard.path} listed in the manifest does not exist ({display_path(fs, spath)})",
                        path=shown,
                        field=field_name,
                    )
                if size != shard.bytes:
                    raise ManifestError(
                        f"shard {shard.path} has {size} bytes, the manifest says {shard.bytes}",
                        path=shown,
                        field=field_name,
                    )
                if verify_checksums:
                    digest, _ = file_digest(fs, spath)
                    if digest != shard.sha256:
                        raise ManifestError(
                            f"shard {shard.path} sha256 {digest} != manifest {shard.sha256}",
                            path=shown,
                            field=field_name,
                        )
    return manifest
