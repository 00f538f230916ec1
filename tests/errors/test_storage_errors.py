"""Storage faults through the real CLI: one ``stackrec: storage error`` line (exit 5) naming the path."""

from __future__ import annotations

import re
import socket

import pytest

from tests.errors.conftest import assert_one_line, run_cli, write_job

STORAGE = 5


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections are refused


@pytest.mark.slow
def test_dead_s3_endpoint_fails_fast(tmp_path):
    port = _closed_port()
    job = write_job(tmp_path, "s3://bucket/ds", model={"num_items": 21},
                    data={"storage_options": {"endpoint_url": f"http://127.0.0.1:{port}"}})
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    res = run_cli("train", "--config", str(job), tmp_path=tmp_path, env=env, timeout=60)
    line = assert_one_line(res, STORAGE, "storage", "s3://bucket/ds/manifest.json", "Could not connect",
                           "data.storage_retry_s = 10")
    retried_s = float(re.search(r"over ([\d.]+) s", line).group(1))
    # No try starts that could not end inside the budget (tests/data/test_storage.py proves it on a
    # fake clock); a loaded machine may still stretch one try, hence the slack. The bound is
    # "about 15 s, not 1-2 minutes": Python + torch start-up is the rest of the wall-clock.
    assert retried_s < 15, line
    assert res.wall_s < 40, res.wall_s


def test_data_path_is_a_file(tmp_path, checkpoint):
    blocker = tmp_path / "data.parquet"
    blocker.write_bytes(b"PAR1")
    res = run_cli("evaluate", "--config", str(write_job(tmp_path, blocker)), "--checkpoint", str(checkpoint),
                  tmp_path=tmp_path)
    assert_one_line(res, STORAGE, "storage", f"{blocker}/manifest.json", "NotADirectoryError")


def test_prepare_output_inside_a_file(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("x")
    res = run_cli("prepare", "--set", "prepare.source=synthetic", "--set", "prepare.synthetic_users=20",
                  "--set", f"prepare.output={blocker / 'ds'}", tmp_path=tmp_path)
    assert_one_line(res, STORAGE, "storage", str(blocker), "a file is in the way where a directory is expected")


def test_prepare_output_permission_denied(tmp_path):
    # /sys refuses mkdir even to root (EPERM), so this works whoever runs the tests.
    res = run_cli("prepare", "--set", "prepare.source=synthetic", "--set", "prepare.synthetic_users=20",
                  "--set", "prepare.output=/sys/stackrec-test-out", tmp_path=tmp_path)
    assert_one_line(res, STORAGE, "storage", "/sys/stackrec-test-out", "permission denied")


@pytest.mark.slow
def test_s3_permission_denied(tmp_path, s3_server, s3_dataset_root, corpus_source, checkpoint):
    from stackrec_dist.data.storage import open_fs

    fs, root = open_fs(s3_dataset_root, s3_server.storage_options)
    fs.put(str(corpus_source), root, recursive=True)
    wrong = {**s3_server.storage_options, "secret": "wrong"}
    job = write_job(tmp_path, s3_dataset_root, data={"storage_options": wrong})
    res = run_cli("evaluate", "--config", str(job), "--checkpoint", str(checkpoint), tmp_path=tmp_path, timeout=60)
    assert_one_line(res, STORAGE, "storage", f"{s3_dataset_root}/manifest.json", "PermissionError",
                    "permanent, not retried")
    assert res.wall_s < 20, res.wall_s  # permanent: not retried


def test_local_permission_denied(tmp_path, dataset, checkpoint):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode (the /sys and S3 tests cover this case)")
    (dataset / "manifest.json").chmod(0)
    res = run_cli("evaluate", "--config", str(write_job(tmp_path, dataset)), "--checkpoint", str(checkpoint),
                  tmp_path=tmp_path)
    assert_one_line(res, STORAGE, "storage", f"{dataset}/manifest.json", "PermissionError")
