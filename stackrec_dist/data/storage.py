"""The one filesystem layer of the data package: local paths, ``file://``, ``s3://`` and ``memory://``.

Everything that touches bytes of a dataset goes through :func:`open_fs` (an fsspec filesystem and
the path inside it), :func:`arrow_fs` (the same filesystem for pyarrow) and :func:`retrying`
(transient object-store failures are retried with exponential back-off, permanent ones fail at
once naming the object).

S3 settings (see docs/data.md and the stack notes): the endpoint comes from
``storage_options["endpoint_url"]`` or ``$AWS_ENDPOINT_URL``, credentials from the environment
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) unless given as ``key`` / ``secret``; no read
cache (the reader does its own read-ahead), botocore "standard" retries with 2 attempts and a 5 s
connect timeout, and ``fs.retries = 2`` for s3fs's own retry loop (passing ``retries=`` to the
constructor breaks it); the deadline of :func:`retrying` (``data.storage_retry_s``) decides how long
an outage is ridden out.
"""

from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import fsspec

from stackrec_dist.errors import StackrecError, StorageErrorBase

T = TypeVar("T")

# Retries inside one attempt (botocore, s3fs): few, so that the deadline of `retrying` decides how
# long an outage is ridden out. A dead endpoint fails within about DEFAULT_RETRY_S + 2 s.
S3_MAX_ATTEMPTS = 2
S3_CONNECT_TIMEOUT_S = 5
DEFAULT_RETRY_S = 10.0


def _s3_fs(storage_options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    import s3fs

    opts = dict(storage_options)
    client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
    endpoint = opts.pop("endpoint_url", None) or client_kwargs.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    config_kwargs = dict(opts.pop("config_kwargs", {}) or {})
    config_kwargs.setdefault("retries", {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
    config_kwargs.setdefault("connect_timeout", S3_CONNECT_TIMEOUT_S)
    opts.setdefault("default_cache_type", "none")
    retries = opts.pop("retries", S3_MAX_ATTEMPTS)
    fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, config_kwargs=config_kwargs, **opts)
    fs.retries = retries
    return fs


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it, without a trailing slash) for a local path or a URI.

    ``storage_options`` are fsspec options; for ``s3://`` also ``endpoint_url``. Local paths and
    ``file://`` give the local filesystem with an absolute path.
    """
    uri = str(uri)
    protocol, _, rest = uri.partition("://") if "://" in uri else ("file", "", uri)
    if protocol in ("s3", "s3a"):
        fs = _s3_fs(storage_options or {})
        path = fs._strip_protocol(uri)
    else:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    path = path.rstrip("/") or path
    return fs, path


def display_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would type it (``s3://bucket/key``, ``memory://x``), for messages."""
    try:
        return fs.unstrip_protocol(path)
    except Exception:
        return path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a")


def arrow_fs(fs: fsspec.AbstractFileSystem):
    """A ``pyarrow.fs.FileSystem`` over ``fs``: native for local disk, ``PyFileSystem`` otherwise."""
    import pyarrow.fs as pafs

    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# -- retries -------------------------------------------------------------------------------------

_PERMANENT_CODES = {
    "NoSuchKey", "NoSuchBucket", "404", "NotFound", "AccessDenied", "403", "Forbidden",
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidRange", "416",
}
_TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "503", "500", "InternalError", "RequestTimeout",
    "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "502", "504",
}


class StorageError(StorageErrorBase, OSError):
    """An object could not be read: permanently, or transiently past the retry bound."""

    def __init__(self, message: str, *, path: str | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.transient = transient


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn a filesystem failure inside the block into :class:`StorageError` naming the path.

    For code that touches storage outside :func:`retrying` (prepare's output, listing raw input):
    permission denied, a missing path, a file where a directory is expected (or the reverse), an
    unreachable endpoint. The path is the one the OS error names, else ``what``. Project errors
    and anything that is not an I/O failure pass through unchanged.
    """
    try:
        yield
    except StackrecError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below
        err = as_storage_error(exc, what)
        if err is None:
            raise
        raise err from exc


_OS_REASONS = (
    (PermissionError, "permission denied"),
    (FileNotFoundError, "does not exist"),
    (NotADirectoryError, "a file is in the way where a directory is expected"),
    (IsADirectoryError, "is a directory where a file is expected"),
    (FileExistsError, "already exists"),
)


def as_storage_error(exc: BaseException, what: str) -> StorageError | None:
    """The :class:`StorageError` for an I/O failure ``exc`` on ``what``; None when it is not one."""
    if isinstance(exc, StackrecError) or _is_arrow_error(exc):
        return None
    for cls, reason in _OS_REASONS:
        if isinstance(exc, cls):
            name = getattr(exc, "filename", None) or what
            return StorageError(f"{name}: {reason}", path=str(name))
    if isinstance(exc, OSError) or _is_boto(exc) or is_transient(exc):
        return StorageError(f"{what}: {_describe(exc)}", path=what, transient=is_transient(exc))
    return None


def _client_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        code = err.get("Code")
        if code:
            return str(code)
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if status:
            return str(status)
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: connection errors, timeouts, throttling, 5xx.

    Permanent: missing object or bucket, permission / signature errors, bad ranges, and anything
    that is not an I/O error at all (corrupt bytes surface as ``pyarrow.ArrowInvalid``; data errors
    are ``ValueError``). A missing object is permanent here: callers that cannot trust a
    ``FileNotFoundError`` during an outage re-check with a probe (see ``retrying(probe=...)``).
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, StorageError):
            return False  # the outcome of a retry loop already: never retried again
        if _is_arrow_error(cur):
            # Raised by Arrow itself (Python errors of fsspec pass through PyFileSystem
            # unchanged): undecodable bytes or a local I/O failure, not a flaky connection.
            return False
        code = _client_error_code(cur)
        if code in _PERMANENT_CODES:
            return False
        if code in _TRANSIENT_CODES:
            return True
        if isinstance(cur, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(cur, (ConnectionError, TimeoutError)):
            return True
        try:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(cur, ClientError):
                return code is not None and code.startswith("5")
            if isinstance(cur, BotoCoreError):
                return True
        except ImportError:  # pragma: no cover - botocore ships with s3fs[boto3]
            pass
        try:
            import aiohttp

            if isinstance(cur, aiohttp.ClientError):
                return True
        except ImportError:  # pragma: no cover
            pass
        if isinstance(cur, OSError):
            # Arrow reports undecodable files as a bare OSError without errno ("Couldn't
            # deserialize thrift", "Parquet magic bytes not found"); socket-level failures carry
            # an errno (ECONNRESET, ETIMEDOUT, ...) or are ConnectionError subclasses (above).
            if type(cur) is OSError and cur.errno is None and cur.__cause__ is None and cur.__context__ is None:
                return False
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def retrying(
    fn: Callable[[], T],
    what: str,
    *,
    attempts: int | None = None,
    budget_s: float | None = None,
    base_delay: float = 0.25,
    max_delay: float = 4.0,
    probe: Callable[[], Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn()``; retry transient failures with exponential back-off and full jitter.

    ``what`` names the object (``s3://b/ds/train/part-00001.parquet row group 3``) in the error.
    A permanent failure raises :class:`StorageError` at once (chained to the cause); a transient
    one is retried until ``budget_s`` seconds have passed since the first failure (default
    :data:`DEFAULT_RETRY_S`, the ``data.storage_retry_s`` setting) or ``attempts`` tries were made,
    whichever comes first, then raises it. The time counted (from the first try) is the larger of
    the wall clock and the back-off slept. A new try is started only if it can end inside the
    budget, judged by the longest try so far (about 1.3 s on a refused connection: botocore's own
    two attempts), so the error comes within the budget unless a try suddenly takes longer than
    every earlier one. ``probe``: called when ``fn`` raised FileNotFoundError; if the probe itself
    fails the server is unreachable and the error is treated as transient (s3fs can report a dead
    endpoint as a missing key).
    """
    budget = DEFAULT_RETRY_S if budget_s is None else max(0.0, float(budget_s))
    delay = base_delay
    attempt = 0
    start = clock()
    slept = 0.0
    longest_try = 0.0
    while True:
        attempt += 1
        try_start = clock()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            longest_try = max(longest_try, clock() - try_start)
            transient = is_transient(exc)
            if not transient and probe is not None and isinstance(exc, FileNotFoundError):
                try:
                    probe()
                except Exception:  # noqa: BLE001
                    transient = True
            if not transient:
                if isinstance(exc, StorageError) or not isinstance(exc, OSError) and not _is_boto(exc):
                    raise
                raise StorageError(f"{what}: {_describe(exc)} (permanent, not retried)", path=what) from exc
            spent = max(clock() - start, slept)
            if (attempts is not None and attempt >= attempts) or spent + longest_try >= budget:
                raise StorageError(
                    f"{what}: {_describe(exc)} (still failing after {attempt} attempts over {spent:.1f} s; "
                    f"data.storage_retry_s = {budget:g})", path=what, transient=True
                ) from exc
            pause = min(random.uniform(0, delay), budget - spent - longest_try)
            sleep(pause)
            slept += max(pause, 0.0)
            delay = min(max_delay, delay * 2)


def _is_arrow_error(exc: BaseException) -> bool:
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, pa.ArrowException)


def _is_boto(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (BotoCoreError, ClientError))


def _describe(exc: BaseException) -> str:
    code = _client_error_code(exc)
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} [{code}]" if code and code not in text else text
