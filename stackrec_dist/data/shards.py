"""Shard I/O of a prepared split: units (row groups) in manifest order, opening shards with retries,
checking them against the manifest (footer sha256, row counts), reading row groups (page CRC32s
checked on every read).

The unit of work of every reader is one row group of one shard, numbered in manifest order (shard 0
row group 0 = unit 0, ...). Readers open exactly the shards the manifest lists; storage failures
are retried for ``data.storage_retry_s`` (``storage.retrying``) and a shard that is missing,
changed or undecodable is a DataError naming it.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stackrec_dist.config import DataConfig

from .errors import CorruptFileError, DataError, ManifestError, MissingShardError
from .manifest import Manifest, check_sequence_schema, file_digest, read_manifest
from .storage import StorageError, arrow_fs, display_path, is_local, is_s3, open_fs, retrying


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the reader's unit of work."""

    index: int  # position in manifest order over the split
    shard: int
    path: str  # full path inside the filesystem
    row_group: int


def split_units(manifest: Manifest, root: str, split: str) -> list[Unit]:
    if split not in manifest.splits:
        raise ManifestError(
            f"split {split!r} not in the manifest (splits: {sorted(manifest.splits)})", path=root, field="splits"
        )
    units = []
    for s, shard in enumerate(manifest.splits[split].shards):
        path = posixpath.join(root, shard.path)
        for rg in range(shard.row_groups):
            units.append(Unit(len(units), s, path, rg))
    return units


def split_fingerprint(manifest: Manifest, split: str) -> str:
    h = hashlib.sha1()
    for shard in manifest.splits[split].shards:
        h.update(f"{shard.path}:{shard.rows}:{shard.row_groups}:{shard.sha256};".encode())
    return h.hexdigest()[:16]



class ShardReader:
    """Opens shards (an LRU of open files), checks them against the manifest, reads row groups.

    Used from one thread at a time (the read-ahead thread of a worker).
    """

    def __init__(self, fs: Any, root: str, manifest: Manifest, split: str, *, check_timestamps: bool,
                 verify_checksums: bool, max_open: int = 8, retry_s: float | None = None) -> None:
        self.fs = fs
        self.afs = arrow_fs(fs)
        self.root = root
        self.manifest = manifest
        self.split = split
        self.shards = manifest.splits[split].shards
        self.columns = ["item_ids", "timestamps"] if check_timestamps else ["item_ids"]
        self.verify_checksums = verify_checksums
        self.pre_buffer = is_s3(fs)
        self._open: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self.max_open = max_open
        self.retry_s = retry_s
        self._missing: dict[int, MissingShardError] = {}  # found missing after the retry budget

    def show(self, path: str) -> str:
        return display_path(self.fs, path)

    def _probe(self) -> None:
        """Called by ``retrying`` when a shard looks missing: raising means "outage, retry".

        Locally a missing file is missing if the manifest is still there. On an object store the
        shard was listed with its size when the reader started, and a store that is restarting
        answers 404 for objects it has not loaded yet (SeaweedFS does, while ``manifest.json``
        already answers): it is taken for an outage until ``data.storage_retry_s`` runs out, then
        reported as a missing shard.
        """
        if not is_local(self.fs):
            raise FileNotFoundError("listed in the manifest: retried as an outage")
        self.fs.info(posixpath.join(self.root, "manifest.json"))

    def parquet(self, shard: int, path: str) -> pq.ParquetFile:
        pf = self._open.get(shard)
        if pf is not None:
            self._open.move_to_end(shard)
            return pf
        if shard in self._missing:  # waited for once already: the next row groups fail at once
            raise self._missing[shard]
        shown = self.show(path)
        info = self.shards[shard]
        key = (shown, info.sha256, info.bytes)

        def _open() -> pq.ParquetFile:
            f = self.afs.open_input_file(path)
            try:
                return pq.ParquetFile(f, pre_buffer=self.pre_buffer,
                                      page_checksum_verification=self.verify_checksums)
            except Exception:
                f.close()
                raise

        try:
            if self.verify_checksums and key not in _VERIFIED_SHARDS:
                self._check_digest(path, shown, info)  # before any row of the shard is used
                _VERIFIED_SHARDS.add(key)
            pf = retrying(_open, shown, probe=self._probe, budget_s=self.retry_s)
        except DataError:
            raise
        except StorageError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                self._missing[shard] = MissingShardError("shard listed in the manifest does not exist", path=shown)
                raise self._missing[shard] from err
            if _undecodable(err):
                raise CorruptFileError(f"not a readable Parquet file: {err.__cause__}", path=shown) from err
            raise
        except (pa.ArrowException, OSError, ValueError) as err:
            raise CorruptFileError(f"not a readable Parquet file: {err}", path=shown) from err
        check_sequence_schema(pf.schema_arrow, path=shown)
        md = pf.metadata
        if md.num_rows != info.rows:
            raise CorruptFileError(f"has {md.num_rows} rows, the manifest says {info.rows}", path=shown)
        if md.num_row_groups != info.row_groups:
            raise CorruptFileError(
                f"has {md.num_row_groups} row groups, the manifest says {info.row_groups}", path=shown
            )
        self._open[shard] = pf
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            try:
                old.close()
            except Exception:  # noqa: BLE001 - closing a read-only handle
                pass
        return pf

    def _check_digest(self, path: str, shown: str, info: Any) -> None:
        """The shard's footer (or, for datasets prepared before page checksums, its whole bytes)
        against the manifest's sha256: a shard rewritten after prepare is refused by name."""
        if info.footer_sha256:
            start = info.bytes - info.footer_bytes
            tail = retrying(lambda: self.fs.cat_file(path, start=start, end=info.bytes), shown, probe=self._probe,
                            budget_s=self.retry_s)
            digest, want, what = hashlib.sha256(tail).hexdigest(), info.footer_sha256, "footer sha256"
        else:
            digest, _ = retrying(lambda: file_digest(self.fs, path), shown, probe=self._probe, budget_s=self.retry_s)
            want, what = info.sha256, "sha256"
        if digest != want:
            raise CorruptFileError(
                f"{what} {digest} != manifest {want}: the shard was changed after prepare "
                "(prepare the dataset again)", path=shown)

    def drop(self, shard: int) -> None:
        self._open.pop(shard, None)

    def read(self, unit: Unit) -> pa.Table:
        shown = self.show(unit.path)
        what = f"{shown} row group {unit.row_group}"

        def _read() -> pa.Table:
            pf = self.parquet(unit.shard, unit.path)
            try:
                return pf.read_row_group(unit.row_group, columns=self.columns)
            except Exception:
                self.drop(unit.shard)  # reopen on the next try (connection state, footer)
                raise

        try:
            return retrying(_read, what, probe=self._probe, budget_s=self.retry_s)
        except StorageError as err:
            if _undecodable(err) and "CRC checksum" in str(err.__cause__):
                raise CorruptFileError(
                    f"page checksum mismatch ({err.__cause__}): the shard was changed or damaged after prepare "
                    "(prepare the dataset again)", path=shown, row_group=unit.row_group) from err
            if _undecodable(err):
                raise CorruptFileError(f"cannot decode: {err.__cause__}", path=shown, row_group=unit.row_group) from err
            raise
        except DataError:
            raise
        except (pa.ArrowException, OSError, ValueError) as err:
            raise CorruptFileError(f"cannot decode: {err}", path=shown, row_group=unit.row_group) from err

    def rows_in(self, unit: Unit) -> int:
        try:
            return self.parquet(unit.shard, unit.path).metadata.row_group(unit.row_group).num_rows
        except DataError:
            return 0


# Shards whose footer (or whole-shard) sha256 matched the manifest, and whose decoded footer matched it, in this process:
# (shown path, sha256, bytes). Checked once per process (verify_shards, or the
# first read with verify_at_start=False), not on every epoch or validation.
_VERIFIED_SHARDS: set[tuple[str, str, int]] = set()
_FOOTERS_OK: set[tuple[str, str, int]] = set()


def _undecodable(err: StorageError) -> bool:
    """A permanent failure raised by Arrow itself while decoding (not by the filesystem)."""
    cause = err.__cause__
    if err.transient or cause is None:
        return False
    return isinstance(cause, pa.ArrowException) or (type(cause) is OSError and cause.errno is None)


def verify_shards(fs: Any, root: str, manifest: Manifest, split: str, *, verify_checksums: bool,
                  retry_s: float | None) -> None:
    """Check every shard of ``split`` before any batch: the footer's sha256 against the manifest
    (when ``verify_checksums``; one small ranged read per shard), then the footer: decodable, schema, row and
    row group counts as in the manifest. Raises CorruptFileError / SchemaError naming the shard.
    Done once per shard and process (evaluation builds a reader per validation)."""
    reader = ShardReader(fs, root, manifest, split, check_timestamps=False, verify_checksums=verify_checksums,
                         max_open=1, retry_s=retry_s)
    for s, shard in enumerate(manifest.splits[split].shards):
        path = posixpath.join(root, shard.path)
        key = (reader.show(path), shard.sha256, shard.bytes)
        if key not in _FOOTERS_OK or (verify_checksums and key not in _VERIFIED_SHARDS):
            reader.parquet(s, path)
            reader.drop(s)
            _FOOTERS_OK.add(key)


def read_manifest_retrying(fs: Any, root: str, retry_s: float) -> Manifest:
    """``read_manifest`` with every shard checked present, storage failures retried."""
    shown = f"{display_path(fs, root)}/manifest.json"
    return retrying(lambda: read_manifest(fs, root, check_files=True), shown, budget_s=retry_s)


def read_dataset_manifest(data_cfg: DataConfig) -> Manifest:
    """The dataset's manifest as every reader reads it: fields validated, every shard present with
    its recorded size, storage failures retried for ``data.storage_retry_s`` and reported as
    StorageError naming the object (e.g. for ``num_items`` before a model is built)."""
    fs, root = open_fs(data_cfg.path, data_cfg.storage_options)
    return read_manifest_retrying(fs, root, data_cfg.storage_retry_s)
