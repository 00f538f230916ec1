"""The fsspec layer: one open_fs for local/file/memory/s3, arrow wrapping, retry classification."""

from __future__ import annotations

import errno
import re
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stackrec_dist.data.storage import (
    S3_CONNECT_TIMEOUT_S,
    S3_MAX_ATTEMPTS,
    StorageError,
    arrow_fs,
    is_transient,
    open_fs,
    retrying,
)


def test_open_fs_local_file_memory(tmp_path):
    fs, path = open_fs(str(tmp_path / "a") + "/")
    assert path == str(tmp_path / "a")
    fs2, path2 = open_fs(f"file://{tmp_path}/a")
    assert type(fs2) is type(fs) and path2 == path
    mfs, mpath = open_fs(f"memory://m-{uuid.uuid4().hex}/x")
    mfs.pipe_file(f"{mpath}/f", b"hi")
    assert mfs.cat_file(f"{mpath}/f") == b"hi"
    # arrow wrapping reads the same bytes
    table = pa.table({"a": [1, 2, 3]})
    with mfs.open(f"{mpath}/t.parquet", "wb") as f:
        pq.write_table(table, f)
    assert pq.read_table(f"{mpath}/t.parquet", filesystem=arrow_fs(mfs)).equals(table)
    assert type(arrow_fs(fs)).__name__ == "LocalFileSystem"


def test_open_fs_s3_settings(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    fs, path = open_fs("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix"
    assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    assert fs.retries == S3_MAX_ATTEMPTS
    assert fs.default_cache_type == "none"
    assert fs.config_kwargs["retries"] == {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}
    assert fs.config_kwargs["connect_timeout"] == S3_CONNECT_TIMEOUT_S
    fs2, _ = open_fs("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:10"})
    assert fs2.client_kwargs["endpoint_url"] == "http://127.0.0.1:10"


def test_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError

    assert is_transient(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert is_transient(TimeoutError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(OSError(errno.EPIPE, "broken pipe"))
    assert is_transient(ClientError({"Error": {"Code": "SlowDown"}}, "GetObject"))
    assert not is_transient(ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject"))
    assert not is_transient(ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(PermissionError("x"))
    assert not is_transient(OSError("Couldn't deserialize thrift"))  # Arrow: corrupt bytes
    assert not is_transient(pa.ArrowInvalid("bad"))
    assert not is_transient(ValueError("bad"))
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)


def test_retrying_transient_then_success_with_backoff():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        return "ok"

    assert retrying(flaky, "s3://b/k", sleep=sleeps.append, base_delay=1.0) == "ok"
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(0 <= s <= 1.0 * 2**i for i, s in enumerate(sleeps))  # full jitter, doubling bound


def test_retrying_bounded_and_permanent_at_once():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    with pytest.raises(StorageError, match=r"s3://b/k: ConnectionRefusedError.*still failing after 3 attempts") as info:
        retrying(down, "s3://b/k", attempts=3, sleep=lambda s: None)
    assert info.value.transient and len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/k")

    with pytest.raises(StorageError, match=r"s3://b/k: FileNotFoundError.*permanent, not retried"):
        retrying(missing, "s3://b/k", sleep=lambda s: None)
    assert len(calls) == 1
    # a data error is not an I/O error: re-raised unchanged
    with pytest.raises(ValueError, match="bad row"):
        retrying(lambda: (_ for _ in ()).throw(ValueError("bad row")), "x")


def test_retrying_gives_up_inside_its_budget():
    # a fake clock: every try takes 1.3 s (botocore's own attempts on a refused connection)
    now = [0.0]
    ends = []

    def refused():
        now[0] += 1.3
        ends.append(now[0])
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    def sleep(s):
        now[0] += s

    with pytest.raises(StorageError, match=r"still failing after \d+ attempts over ([\d.]+) s") as info:
        retrying(refused, "s3://b/k", budget_s=10, sleep=sleep, clock=lambda: now[0])
    assert len(ends) > 3 and ends[-1] <= 10  # no try was started that could not end inside the budget
    assert float(re.search(r"over ([\d.]+) s", str(info.value)).group(1)) <= 10


def test_retrying_missing_key_during_outage_is_transient():
    calls = []

    def fn():
        calls.append(1)
        if len(calls) < 3:
            raise FileNotFoundError("looks missing")
        return 1

    def probe():
        if len(calls) < 2:
            raise ConnectionRefusedError()

    # first failure: probe fails too (server down) -> retried; second: probe ok -> permanent
    with pytest.raises(StorageError, match="permanent"):
        retrying(fn, "s3://b/k", probe=probe, sleep=lambda s: None)
    assert len(calls) == 2


@pytest.mark.slow
def test_s3_roundtrip_outage_and_permanent_errors(s3_server, s3_fs, s3_dataset_root):
    fs, root = open_fs(s3_dataset_root, s3_server.storage_options)
    fs.pipe_file(f"{root}/obj", b"x" * 1000)
    table = pa.table({"a": list(range(100))})
    with fs.open(f"{root}/t.parquet", "wb") as f:
        pq.write_table(table, f)
    f = arrow_fs(fs).open_input_file(f"{root}/t.parquet")
    assert pq.ParquetFile(f, pre_buffer=True).read().equals(table)
    # a short outage (SIGKILL, 3 s down) is survived by one retrying() call
    done = threading.Event()

    def bounce():
        s3_server.kill()
        time.sleep(3)
        s3_server.restart()
        done.set()

    t = threading.Thread(target=bounce)
    t.start()
    time.sleep(0.3)
    fs.invalidate_cache()
    assert retrying(lambda: fs.cat_file(f"{root}/obj"), f"s3://{root}/obj") == b"x" * 1000
    t.join()
    assert done.is_set()
    # permanent: a missing key and a wrong secret fail at once, naming the object
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"s3://.*/nope: FileNotFoundError.*permanent"):
        retrying(lambda: fs.cat_file(f"{root}/nope"), f"s3://{root}/nope")
    bad, _ = open_fs(s3_dataset_root, {**s3_server.storage_options, "secret": "wrong", "skip_instance_cache": True})
    with pytest.raises(StorageError, match=r"s3://.*/obj: PermissionError.*permanent"):
        retrying(lambda: bad.cat_file(f"{root}/obj"), f"s3://{root}/obj")
    assert time.monotonic() - start < 10
