"""Errors of the data layer.

Every error raised while reading raw logs, preparing a dataset or streaming one names *where* the
problem is (file, row group, row, field) so that a failure in a 10k-file job can be found without
re-running it under a debugger.
"""

from __future__ import annotations

from typing import Any

from stackrec_dist.errors import DataErrorBase


class DataError(DataErrorBase, ValueError):
    """Bad or inconsistent data.

    ``str(err)`` reads like
    ``s3://b/ds/train/part-00001.parquet row group 3 row 17 field item_ids: item id 9001 >= num_items 3707``;
    each location part is left out when unknown. The parts are also kept as attributes so callers
    (quarantine, retries, tests) need not parse the text.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        row_group: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = message
        self.path = path
        self.row_group = row_group
        self.row = row
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path is not None:
            where.append(str(self.path))
        if self.row_group is not None:
            where.append(f"row group {self.row_group}")
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field}")
        return f"{' '.join(where)}: {self.reason}" if where else self.reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields would be lost by the default pickling (Ray ships errors between
        # processes), so rebuild from the parts.
        return (_rebuild, (type(self), self.reason, self.path, self.row_group, self.row, self.field))


def _rebuild(cls: type, reason: str, path: Any, row_group: Any, row: Any, field: Any) -> DataError:
    return cls(reason, path=path, row_group=row_group, row=row, field=field)


class SchemaError(DataError):
    """A file's columns or types do not match what is expected (raw log or sequence Parquet)."""


class ManifestError(DataError):
    """manifest.json is missing, unreadable, of an unknown version or inconsistent with the files."""


class CorruptFileError(DataError):
    """A file cannot be decoded, or its size / checksum differs from the manifest."""


class MissingShardError(ManifestError):
    """A shard listed in the manifest does not exist."""


class BadRowError(DataError):
    """One raw interaction row is invalid (null id, unparsable timestamp, ...)."""
