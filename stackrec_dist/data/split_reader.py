"""One split of a prepared dataset opened for reading, and its row groups decoded and validated.

``SplitReader`` reads the manifest (fields, every shard present with its size), lists the units
(row groups in manifest order), verifies the shards once per process (sha256, footers), and
decodes units in order with a read-ahead thread: each unit's rows validated, bad rows raised as a
DataError naming file, row group, row and field, or quarantined when ``data.quarantine`` is on.
The training stream and the evaluation stream both read through it.
"""

from __future__ import annotations

import os
import posixpath
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from stackrec_dist.config import DataConfig

from .errors import CorruptFileError, DataError
from .quarantine import QUARANTINE_DIR, write_quarantine
from .rows import validate_rows
from .shards import ShardReader, Unit, read_manifest_retrying, split_fingerprint, split_units, verify_shards
from .storage import display_path, open_fs


@dataclass
class UnitData:
    """Decoded, validated item ids of one row group (bad rows already removed or raised)."""

    unit: Unit
    values: np.ndarray  # (total items,) int64, rows concatenated
    offsets: np.ndarray  # (rows + 1,) int64
    lengths: np.ndarray  # (rows,) int64; 0 for quarantined rows
    bad_rows: int = 0
    bad_row_group: bool = False
    quarantine_file: str | None = None


class SplitReader:
    """The units of one split and their decoded rows. Picklable: the filesystem is reopened per process."""

    def __init__(self, data_cfg: DataConfig, split: str = "train", *, check_timestamps: bool = True,
                 verify_checksums: bool | None = None, prefetch: int = 2, quarantine_dir: str | None = None,
                 verify_at_start: bool = False) -> None:
        self.cfg = data_cfg
        self.split = split
        self.check_timestamps = check_timestamps
        self.verify_checksums = data_cfg.verify_checksums if verify_checksums is None else verify_checksums
        self.prefetch = max(0, prefetch)
        fs, root = open_fs(data_cfg.path, data_cfg.storage_options)
        self.root = root
        self.shown_root = display_path(fs, root)
        # Validate before training: manifest fields, every shard exists with its recorded size.
        self.manifest = read_manifest_retrying(fs, root, data_cfg.storage_retry_s)
        self.units = split_units(self.manifest, root, split)
        self.num_items = self.manifest.num_items
        self.fingerprint = split_fingerprint(self.manifest, split)
        self.quarantine_dir = quarantine_dir or posixpath.join(root, QUARANTINE_DIR, split)
        self._fs = fs
        self._fs_pid = os.getpid()
        # By default each shard's footer sha256 is checked when this process first opens it and
        # each page's CRC32 whenever it is read: a changed shard never yields a row, start-up does
        # not grow with the data, and no byte is read twice (hashing whole shards on first read
        # made every worker read every shard it touched). ``verify_at_start`` checks every
        # shard's footer up front instead.
        if verify_at_start:
            self.verify_shards()

    def verify_shards(self) -> None:
        """Check every shard of the split before any batch (``shards.verify_shards``)."""
        verify_shards(self._fs, self.root, self.manifest, self.split, verify_checksums=self.verify_checksums,
                      retry_s=self.cfg.storage_retry_s)

    # fs objects hold event loops and sockets: rebuild them in each process.
    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_fs"] = None
        return d

    @property
    def fs(self) -> Any:
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, _ = open_fs(self.cfg.path, self.cfg.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def shard_reader(self) -> ShardReader:
        return ShardReader(self.fs, self.root, self.manifest, self.split,
                           check_timestamps=self.check_timestamps,
                           verify_checksums=self.verify_checksums,
                           retry_s=self.cfg.storage_retry_s)

    def load_unit(self, reader: ShardReader, unit: Unit, min_length: int = 1) -> UnitData:
        """Read + validate one unit; bad rows raise, or are quarantined when configured."""
        shown = reader.show(unit.path)
        try:
            table = reader.read(unit)
        except CorruptFileError as err:
            # Only an undecodable row group is quarantined; a file that disagrees with the
            # manifest (rows, checksum) or cannot be opened fails the run.
            if not self.cfg.quarantine or err.row_group is None:
                raise
            rows = reader.rows_in(unit)
            qfile = self._quarantine(unit, shown, [(-1, "*", str(err))], None)
            empty = np.zeros(0, np.int64)
            return UnitData(unit, empty, np.zeros(1, np.int64), empty, bad_rows=rows, bad_row_group=True,
                            quarantine_file=qfile)
        values, offsets, lengths, bad = validate_rows(
            table, self.num_items, min_length=min_length, path=shown, row_group=unit.row_group
        )
        data = UnitData(unit, values, offsets, lengths)
        if bad:
            if not self.cfg.quarantine:
                row, field, why = bad[0]
                extra = f" (and {len(bad) - 1} more bad rows in this row group)" if len(bad) > 1 else ""
                raise DataError(why + extra, path=shown, row_group=unit.row_group, row=row, field=field)
            data.bad_rows = len(bad)
            data.quarantine_file = self._quarantine(unit, shown, bad, table)
        return data

    def _quarantine(self, unit: Unit, shown: str, bad: list[tuple[int, str, str]], table: Any) -> str:
        return write_quarantine(self.fs, self.quarantine_dir, unit, shown, bad, table, self.cfg.storage_retry_s)

    def read_ahead(self, units: list[int], min_length: int = 1) -> Iterator[UnitData]:
        """Decoded units (indices into ``self.units``) in order; the next ``prefetch`` are read in a
        background thread. ``min_length`` 2 makes a row without history + target a bad row."""
        reader = self.shard_reader()
        if self.prefetch == 0:
            for u in units:
                yield self.load_unit(reader, self.units[u], min_length)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stackrec-read")
        pending: list[Future] = []
        try:
            it = iter(units)
            for u in it:
                pending.append(pool.submit(self.load_unit, reader, self.units[u], min_length))
                if len(pending) > self.prefetch:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
