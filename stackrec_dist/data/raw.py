"""Streamed reading and validation of raw interaction logs (CSV or Parquet, any fsspec URI).

A raw log has one row per interaction with a user column, an item column and a timestamp column
(names configurable). Files are read in record batches (``pyarrow.csv.open_csv`` blocks, Parquet
``iter_batches``), never whole, so logs larger than memory can be prepared.

Row numbers in errors are 0-based indices of data rows within their file (a CSV header is not
counted; the message adds the 1-based CSV line, also for a malformed line met by the
multi-threaded parser). CSV values are read as bytes: a value that is not UTF-8 is a bad row of
its field (set aside in quarantine mode), not a failure of the whole block.

Timestamps may be integers (kept as given: any epoch unit), decimal numbers (floored), ISO-8601
strings or Arrow timestamp/date values (converted to epoch seconds).

An optional rating column (``RawColumns.rating``, read only when set) is parsed as a float: a null
or non-numeric value is a bad row of that field.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import BadRowError, DataError, SchemaError
from .storage import as_storage_error, display_path, open_fs

CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".csv.bz2", ".csv.zst")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parquet.brotli", ".parquet.snappy", ".parquet.zstd")


@dataclass(frozen=True)
class RawColumns:
    """Names of the raw log's columns; ``rating`` None: no rating column is read."""

    user: str = "user"
    item: str = "item"
    timestamp: str = "timestamp"
    rating: str | None = None

    def names(self) -> list[str]:
        return [self.user, self.item, self.timestamp] + ([self.rating] if self.rating is not None else [])


@dataclass
class RawBatch:
    """Valid rows of one record batch, in input order.

    ``user`` / ``item`` are original ids as strings (so int and string logs with the same ids give
    the same id maps); ``timestamp`` is int64.
    """

    path: str
    first_row: int  # file row index of the batch's first row (valid or not)
    user: pa.Array
    item: pa.Array
    timestamp: np.ndarray
    rating: np.ndarray | None = None  # float64, when RawColumns.rating is set


@dataclass
class BadRows:
    """Rows rejected from one batch (quarantine mode)."""

    path: str
    rows: np.ndarray  # file row indices
    fields: list[str]
    reasons: list[str]
    values: dict[str, list[Any]] = field(default_factory=dict)  # column -> raw values as strings

    def __len__(self) -> int:
        return len(self.rows)


QUARANTINE_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("row", pa.int64()),
        ("field", pa.string()),
        ("reason", pa.string()),
        ("user", pa.string()),
        ("item", pa.string()),
        ("timestamp", pa.string()),
        ("rating", pa.string()),
    ]
)


def list_raw_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The data files of ``path``: itself if a file, else its CSV/Parquet files in sorted order."""
    if not fs.exists(path):
        raise DataError("raw input does not exist", path=display_path(fs, path))
    if fs.isfile(path):
        return [path]
    files = []
    for p in sorted(fs.find(path)):
        name = posixpath.basename(p)
        if name.startswith((".", "_")):  # _SUCCESS, .crc, hidden temp files
            continue
        if name.lower().endswith(CSV_SUFFIXES + PARQUET_SUFFIXES):
            files.append(p)
    if not files:
        raise DataError(
            f"no CSV or Parquet files (suffixes {CSV_SUFFIXES + PARQUET_SUFFIXES})", path=display_path(fs, path)
        )
    return files


def raw_input_bytes(fs: fsspec.AbstractFileSystem, files: list[str]) -> int:
    return int(sum(fs.size(p) or 0 for p in files))


def estimate_rows(fs: fsspec.AbstractFileSystem, files: list[str]) -> int:
    """An upper-ish estimate of the number of rows (exact for Parquet, bytes/8 for text)."""
    total = 0
    for p in files:
        if _is_parquet(p):
            with fs.open(p, "rb") as f:
                total += _parquet_file(f, display_path(fs, p)).metadata.num_rows
        else:
            # "1,2,3\n" is 6 bytes; real logs are longer, so this over-estimates: safe for sizing.
            total += (fs.size(p) or 0) // 8 + 1
    return total


def iter_raw(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    columns: RawColumns = RawColumns(),
    *,
    quarantine: bool = False,
    batch_rows: int = 65536,
    csv_block_bytes: int = 4 << 20,
    delimiter: str | None = None,
    use_threads: bool = True,
) -> Iterator[RawBatch | BadRows]:
    """Yield the valid rows of every file of ``uri`` as RawBatch, in file then row order.

    With ``quarantine`` off the first bad row raises BadRowError naming file, row and field.
    With it on, each batch's bad rows are yielded as a BadRows (before that batch's RawBatch) and
    the caller decides where they go; nothing is dropped silently.
    ``use_threads``: parallel CSV parsing, faster but it keeps several blocks in flight (tens of
    MB of extra memory): memory-bound callers turn it off.
    """
    fs, path = open_fs(uri, storage_options)
    for p in list_raw_files(fs, path):
        shown = display_path(fs, p)
        malformed: list[tuple[int, str]] | None = None
        if _is_parquet(p):
            batches = _parquet_batches(fs, p, shown, columns, batch_rows)
        else:
            malformed = [] if quarantine else None
            batches = _csv_batches(fs, p, shown, columns, csv_block_bytes, delimiter, use_threads, malformed)
        is_csv = not _is_parquet(p)
        first = 0
        last_skipped = -1
        for batch in batches:
            rows = first + np.arange(batch.num_rows, dtype=np.int64)
            if malformed:
                skipped = sorted(r for r, _ in malformed)
                # Skipped rows are missing from the batch: number its rows around them.
                for r in skipped:
                    rows[rows >= r] += 1
                last_skipped = max(last_skipped, skipped[-1])
                yield _malformed_rows(shown, malformed)
                malformed.clear()
            yield from _validate(batch, shown, rows, columns, quarantine, is_csv)
            first = max(int(rows[-1]) + 1 if len(rows) else first, last_skipped + 1)
        if malformed:
            yield _malformed_rows(shown, malformed)


def _malformed_rows(shown: str, malformed: list[tuple[int, str]]) -> BadRows:
    return BadRows(
        shown,
        np.asarray([r for r, _ in malformed], dtype=np.int64),
        ["*"] * len(malformed),
        [why for _, why in malformed],
        {},
    )


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def _parquet_batches(
    fs: fsspec.AbstractFileSystem, path: str, shown: str, columns: RawColumns, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    with fs.open(path, "rb") as f:
        pf = _parquet_file(f, shown)
        names = pf.schema_arrow.names
        _check_columns(names, columns, shown)
        try:
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns.names())
        except (pa.ArrowException, OSError) as err:
            if as_storage_error(err, shown) is not None and not _undecodable(err):
                raise
            raise DataError(f"cannot decode: {err}", path=shown) from err


def _parquet_file(f: Any, shown: str) -> pq.ParquetFile:
    """``pq.ParquetFile(f)``; an undecodable file (footer, magic bytes) is a DataError naming it."""
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as err:
        if as_storage_error(err, shown) is not None and not _undecodable(err):
            raise
        raise DataError(f"not a readable Parquet file: {err}", path=shown) from err


def _undecodable(err: BaseException) -> bool:
    # Arrow reports bytes it cannot decode as ArrowInvalid or a bare OSError without errno.
    return isinstance(err, pa.ArrowException) or (type(err) is OSError and err.errno is None)


def _csv_batches(
    fs: fsspec.AbstractFileSystem,
    path: str,
    shown: str,
    columns: RawColumns,
    block_bytes: int,
    delimiter: str | None,
    use_threads: bool = True,
    malformed: list[tuple[int, str]] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Record batches of a CSV file.

    ``malformed``: when given, rows with the wrong number of fields are skipped and appended to it
    as (0-based data row, reason) instead of failing the read.
    """
    if delimiter is None:
        delimiter = "\t" if ".tsv" in path.lower() else ","
    compression = _compression(path)

    def on_invalid(row: Any) -> str:
        line = row.number if row.number is not None and row.number > 0 else None
        malformed.append(
            (-1 if line is None else line - 2, f"malformed CSV row: expected {row.expected_columns} fields, "
             f"got {row.actual_columns}: {row.text!r}")
        )
        return "skip"

    parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid if malformed is not None else None)
    # Everything as bytes: per-block type inference could flip a column's type mid-file, parsing
    # the timestamp ourselves lets a bad value be reported with its row, and UTF-8 is checked per
    # row in _validate (Arrow's own check fails the whole block, without a row number).
    convert = pacsv.ConvertOptions(
        column_types={c: pa.binary() for c in columns.names()},
        include_columns=columns.names(),
        strings_can_be_null=True,
    )
    with fs.open(path, "rb", compression=compression) as f:
        header = f.readline().decode("utf-8", errors="replace").rstrip("\r\n").split(delimiter)
    _check_columns([h.strip().strip('"') for h in header], columns, shown)
    # A block must hold whole rows (and the header): keep a floor well above any row.
    # Line numbers of malformed rows are only known to a single-threaded reader.
    read = pacsv.ReadOptions(block_size=max(block_bytes, 1 << 16), use_threads=use_threads and malformed is None)
    with fs.open(path, "rb", compression=compression) as f:
        try:
            for batch in pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert):
                yield batch
        except pa.ArrowInvalid as err:
            text = str(err)
            if read.use_threads and "Row #" not in text:
                # The multi-threaded parser does not know line numbers: parse again on one thread
                # (only up to the bad line) to find it.
                text = _single_threaded_error(fs, path, compression, read, parse, convert) or text
            m = re.search(r"Row #(\d+): (.*)", text)
            if m:
                line = int(m.group(1))
                raise BadRowError(f"malformed CSV row (line {line}): {m.group(2)}", path=shown, row=line - 2) from None
            raise DataError(f"CSV cannot be parsed: {text}", path=shown) from None


def _single_threaded_error(fs: fsspec.AbstractFileSystem, path: str, compression: str | None,
                           read: pacsv.ReadOptions, parse: pacsv.ParseOptions,
                           convert: pacsv.ConvertOptions) -> str | None:
    """The text of the first parse error of a single-threaded read (it carries ``Row #N``)."""
    one = pacsv.ReadOptions(block_size=read.block_size, use_threads=False)
    with fs.open(path, "rb", compression=compression) as f:
        try:
            for _ in pacsv.open_csv(f, read_options=one, parse_options=parse, convert_options=convert):
                pass
        except pa.ArrowInvalid as err:
            return str(err)
    return None


def _compression(path: str) -> str | None:
    low = path.lower()
    for suffix, name in ((".gz", "gzip"), (".bz2", "bz2"), (".zst", "zstd")):
        if low.endswith(suffix):
            return name
    return None


def _check_columns(names: list[str], columns: RawColumns, shown: str) -> None:
    if columns.rating is not None and columns.rating not in names:
        raise SchemaError(
            f"missing rating column {columns.rating!r}, needed by the rating filter (prepare.min_rating) "
            f"(columns present: {names}; set prepare.rating_column to match)",
            path=shown,
            field=columns.rating,
        )
    for role, name in (("user", columns.user), ("item", columns.item), ("timestamp", columns.timestamp)):
        if name not in names:
            raise SchemaError(
                f"missing {role} column {name!r} (columns present: {names}; set the column names to match)",
                path=shown,
                field=name,
            )


def _utf8(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(the column with non-UTF-8 values set to null, mask of those values); only binary columns
    (CSV) can hold them. The per-value scan runs only when a block fails to cast as a whole."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        return arr, np.zeros(len(arr), dtype=bool)
    try:
        return arr.cast(pa.string()), np.zeros(len(arr), dtype=bool)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    values = arr.to_pylist()
    bad = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
    fixed = pc.if_else(pa.array(bad), pa.scalar(None, arr.type), arr)
    return fixed.cast(pa.string()), bad


def _shown(arr: pa.Array, idx: pa.Array) -> list[Any]:
    """The values at ``idx`` as text for the quarantine file (bytes that are not UTF-8 escaped)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.take(idx)
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return [None if v is None else v.decode("utf-8", errors="backslashreplace") for v in arr.to_pylist()]
    if pa.types.is_timestamp(arr.type):
        return arr.cast(pa.string()).to_pylist()
    return _as_string(arr).to_pylist()


def _as_string(arr: pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type):
        return arr
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return _utf8(arr)[0]
    if pa.types.is_large_string(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_integer(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_floating(arr.type):
        # 12.0 -> "12": float-typed id columns come from pandas frames with nulls.
        ints = pc.cast(arr, pa.int64(), safe=False)
        return pc.if_else(pc.equal(pc.cast(ints, arr.type), arr), ints.cast(pa.string()), arr.cast(pa.string()))
    return arr.cast(pa.string())


_INT_RE = r"^[+-]?[0-9]{1,18}$"
_DEC_RE = r"^[+-]?[0-9]{1,15}\.[0-9]*$"


def parse_timestamps(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(int64 values, bad mask, reason per bad row) of a timestamp column."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    n = len(arr)
    t = arr.type
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    values = np.zeros(n, dtype=np.int64)
    if pa.types.is_integer(t):
        values = np.asarray(arr.cast(pa.int64()).fill_null(0).to_numpy(), dtype=np.int64)
        bad = null
    elif pa.types.is_floating(t):
        f = np.asarray(arr.cast(pa.float64()).fill_null(np.nan).to_numpy(), dtype=np.float64)
        bad = ~np.isfinite(f)
        values[~bad] = np.floor(f[~bad]).astype(np.int64)
    elif pa.types.is_timestamp(t) or pa.types.is_date(t):
        secs = pc.cast(pc.cast(arr, pa.timestamp("s", tz=getattr(t, "tz", None)), safe=False), pa.int64())
        values = np.asarray(secs.fill_null(0).to_numpy(), dtype=np.int64)
        bad = null
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pc.utf8_trim_whitespace(arr.cast(pa.string()))
        is_int = np.asarray(pc.match_substring_regex(s, _INT_RE).fill_null(False).to_numpy(zero_copy_only=False), bool)
        if is_int.all():
            return np.asarray(pc.cast(s, pa.int64()).to_numpy(), dtype=np.int64), null, ["null value"] * int(null.sum())
        bad = null.copy()
        if is_int.any():
            values[is_int] = pc.cast(s.filter(pa.array(is_int)), pa.int64()).to_numpy()
        is_dec = np.asarray(pc.match_substring_regex(s, _DEC_RE).fill_null(False).to_numpy(zero_copy_only=False), bool)
        if is_dec.any():
            values[is_dec] = np.floor(pc.cast(s.filter(pa.array(is_dec)), pa.float64()).to_numpy()).astype(np.int64)
        rest = ~(is_int | is_dec | null)
        if rest.any():
            idx = np.flatnonzero(rest)
            parsed, ok = _parse_iso(s.take(pa.array(idx)))
            values[idx[ok]] = parsed[ok]
            bad[idx[~ok]] = True
    else:
        raise SchemaError(f"timestamp column has unsupported type {t}")
    reasons = []
    if bad.any():
        strs = arr.cast(pa.string()) if not pa.types.is_string(t) else arr
        for i in np.flatnonzero(bad):
            reasons.append("null value" if null[i] else f"unparsable timestamp {strs[int(i)].as_py()!r}")
    return values, bad, reasons


def _parse_iso(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """ISO-8601 strings -> epoch seconds; (values, ok mask). Vectorised, per-row only on failure."""
    for target in (pa.timestamp("s"), pa.timestamp("s", tz="UTC")):
        try:
            v = pc.cast(pc.cast(s, target), pa.int64()).to_numpy()
            return np.asarray(v, dtype=np.int64), np.ones(len(s), dtype=bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    values = np.zeros(len(s), dtype=np.int64)
    ok = np.zeros(len(s), dtype=bool)
    for i in range(len(s)):
        one = s.slice(i, 1)
        for target in (pa.timestamp("s"), pa.timestamp("s", tz="UTC")):
            try:
                values[i] = pc.cast(pc.cast(one, target), pa.int64())[0].as_py()
                ok[i] = True
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
    return values, ok


_NUMBER_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"


def parse_ratings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(float64 values, bad mask, reason per bad row) of a rating column: null, non-numeric and
    non-finite values are bad."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    values = np.zeros(len(arr), dtype=np.float64)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        values = np.asarray(arr.cast(pa.float64()).fill_null(np.nan).to_numpy(), dtype=np.float64)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pc.utf8_trim_whitespace(arr.cast(pa.string()))
        ok = np.asarray(pc.match_substring_regex(s, _NUMBER_RE).fill_null(False).to_numpy(zero_copy_only=False), bool)
        values[~ok] = np.nan
        if ok.any():
            values[ok] = pc.cast(s.filter(pa.array(ok)), pa.float64()).to_numpy()
    else:
        raise SchemaError(f"rating column has unsupported type {t}")
    bad = ~np.isfinite(values)
    reasons = []
    if bad.any():
        strs = arr.cast(pa.string())
        for i in np.flatnonzero(bad):
            reasons.append("null value" if null[i] else f"not a number: {strs[int(i)].as_py()!r}")
    return values, bad, reasons


def _validate(
    batch: pa.RecordBatch, shown: str, rows_of: np.ndarray, columns: RawColumns, quarantine: bool, is_csv: bool
) -> Iterator[RawBatch | BadRows]:
    """Split a batch into valid rows and bad ones; ``rows_of[k]``: file row index of batch row k."""
    first = int(rows_of[0]) if len(rows_of) else 0
    raw_cols = {c: batch.column(batch.schema.get_field_index(c)) for c in columns.names()}
    decoded = {c: _utf8(col) for c, col in raw_cols.items()}
    not_utf8 = {c: mask for c, (_, mask) in decoded.items() if mask.any()}
    user, item, ts_col = (decoded[c][0] for c in columns.names()[:3])
    user_null = np.asarray(user.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    item_null = np.asarray(item.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    try:
        ts, ts_bad, ts_reasons = parse_timestamps(ts_col)
    except SchemaError as err:
        raise SchemaError(err.reason, path=shown, field=columns.timestamp) from None
    rating = None
    rating_bad = np.zeros(len(ts), dtype=bool)
    rating_reasons: list[str] = []
    if columns.rating is not None:
        try:
            rating, rating_bad, rating_reasons = parse_ratings(decoded[columns.rating][0])
        except SchemaError as err:
            raise SchemaError(err.reason, path=shown, field=columns.rating) from None
    bad = user_null | item_null | ts_bad | rating_bad
    if not bad.any():
        yield RawBatch(shown, first, _as_string(user), _as_string(item), ts, rating)
        return
    # First failing field per row, in column order, so the report is stable.
    ts_reason_of = dict(zip(np.flatnonzero(ts_bad).tolist(), ts_reasons))
    rating_reason_of = dict(zip(np.flatnonzero(rating_bad).tolist(), rating_reasons))
    rows, fields, reasons = [], [], []
    for i in np.flatnonzero(bad).tolist():
        enc = next((c for c in columns.names() if c in not_utf8 and not_utf8[c][i]), None)
        if enc is not None:
            f, r = enc, f"not UTF-8: {raw_cols[enc][i].as_py()!r}"
        elif user_null[i]:
            f, r = columns.user, "null value"
        elif item_null[i]:
            f, r = columns.item, "null value"
        elif ts_bad[i]:
            f, r = columns.timestamp, ts_reason_of[i]
        else:
            f, r = columns.rating, rating_reason_of[i]
        if not quarantine:
            row = int(rows_of[i])
            line = f" (line {row + 2})" if is_csv else ""
            raise BadRowError(r + line, path=shown, row=row, field=f)
        rows.append(int(rows_of[i]))
        fields.append(f)
        reasons.append(r)
    idx = pa.array(np.flatnonzero(bad))
    values = {
        "user": _shown(raw_cols[columns.user], idx),
        "item": _shown(raw_cols[columns.item], idx),
        "timestamp": _shown(raw_cols[columns.timestamp], idx),
    }
    if columns.rating is not None:
        values["rating"] = _shown(raw_cols[columns.rating], idx)
    yield BadRows(shown, np.asarray(rows, dtype=np.int64), fields, reasons, values)
    keep = pa.array(~bad)
    yield RawBatch(shown, first, _as_string(user).filter(keep), _as_string(item).filter(keep), ts[~bad],
                   None if rating is None else rating[~bad])


def bad_rows_table(bad: BadRows) -> pa.Table:
    return pa.table(
        {
            "file": [bad.path] * len(bad),
            "row": bad.rows,
            "field": bad.fields,
            "reason": bad.reasons,
            "user": bad.values.get("user", [None] * len(bad)),
            "item": bad.values.get("item", [None] * len(bad)),
            "timestamp": bad.values.get("timestamp", [None] * len(bad)),
            "rating": bad.values.get("rating", [None] * len(bad)),
        },
        schema=QUARANTINE_SCHEMA,
    )
