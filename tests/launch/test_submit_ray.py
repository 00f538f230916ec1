"""stackrec_dist.launch.submit against a real local Ray head (job server on 127.0.0.1). Marked slow."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stackrec_dist.launch import submit as launch_submit

from .conftest import REPO

pytestmark = pytest.mark.slow

JOB_DIR = Path(__file__).parent / "job_dir"
ENTRY = "python print_result.py"
FAKE_SECRET = "fAkE-SeCrEt-" + hashlib.sha256(b"stackrec launch test").hexdigest()[:24]
FAKE_KEY_ID = "AKIAFAKESTACKREC0001"


def _job_dir(tmp_path: Path) -> Path:
    # A private copy: Ray packs the working_dir, and the secret scan must cover exactly what it packed.
    dst = tmp_path / "job"
    shutil.copytree(JOB_DIR, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_trivial_job_succeeds_and_metrics_come_back(ray_head, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    job_id, status = launch_submit.submit(
        None, address=ray_head.dashboard_url, working_dir=_job_dir(tmp_path), wait=True,
        entrypoint=ENTRY, extra_env={"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, timeout_s=240,
    )
    assert status == "SUCCEEDED"
    client = launch_submit.make_client(ray_head.dashboard_url)
    result = launch_submit.parse_result(client.get_job_logs(job_id))
    assert result is not None, client.get_job_logs(job_id)
    assert result["sum_squares"] == 0 + 1 + 4 + 9  # the job used the cluster
    assert result["mrr@5"] == 0.25
    assert result["cwd_has_job"] is True  # working_dir became the job's cwd
    assert result["secret_sha256"] is None  # nothing forwarded when nothing is set
    assert result["endpoint"] == "http://127.0.0.1:1"
    assert Path(result["python"]).resolve().parent == Path(sys.executable).resolve().parent


def test_explicit_address_beats_a_wrong_ray_address(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # nothing listens there
    job_id = launch_submit.submit(None, address=ray_head.dashboard_url, working_dir=_job_dir(tmp_path),
                                  entrypoint="python -c 'print(1)'")
    assert job_id.startswith("raysubmit_")
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:9"  # restored after connecting


def test_ray_address_env_is_used_without_address(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_head.dashboard_url)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    job_id, status = launch_submit.submit(None, working_dir=_job_dir(tmp_path), wait=True,
                                          entrypoint="python -c 'print(2)'", timeout_s=120)
    assert status == "SUCCEEDED", job_id


def test_failed_job_gives_nonzero_exit(ray_head, tmp_path, capsys):
    rc = launch_submit.main([
        "--address", ray_head.dashboard_url, "--working-dir", str(_job_dir(tmp_path)),
        "--env", "JOB_EXIT_CODE=3", "--entrypoint", ENTRY, "--wait", "--timeout", "240",
    ])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAILED" in out
    assert "STACKREC_RESULT" in out  # the tailed logs reached our stdout


def _files_containing(roots, needles) -> dict[Path, list[str]]:
    hits: dict[Path, list[str]] = {}
    scanned = 0
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                scanned += 1
                found = [n for n in needles if n.encode() in data]
                if found:
                    hits[path] = found
    assert scanned > 10  # logs and unpacked packages were there to scan
    return hits


def _submit_both_ways(ray_head, job_dir, extra_args, monkeypatch):
    """Submit through the library (in process) and through launch/submit.py (child process)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    forward = "--forward-credentials" in extra_args
    job_id, status = launch_submit.submit(None, address=ray_head.dashboard_url, working_dir=job_dir,
                                          wait=True, entrypoint=ENTRY, timeout_s=240,
                                          forward_credentials=forward)
    assert status == "SUCCEEDED"
    logs = launch_submit.make_client(ray_head.dashboard_url).get_job_logs(job_id)
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "submit.py"), "--address", ray_head.dashboard_url,
         "--working-dir", str(job_dir), "--entrypoint", ENTRY, "--wait", "--timeout", "240",
         *extra_args],
        env=dict(os.environ), capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCEEDED" in proc.stdout
    return launch_submit.parse_result(logs), logs, proc


def _assert_not_in_outputs(texts: dict[str, str]) -> None:
    for secret in (FAKE_SECRET, FAKE_KEY_ID):
        for name, text in texts.items():
            assert secret not in text, f"secret leaked into {name}"


def test_default_sends_no_credentials_anywhere(ray_head, tmp_path, monkeypatch, capfd, caplog):
    """Without --forward-credentials the secret in our env goes nowhere: not the job, not Ray."""
    caplog.set_level(logging.DEBUG)
    job_dir = _job_dir(tmp_path)
    result, logs, proc = _submit_both_ways(ray_head, job_dir, [], monkeypatch)
    assert result["secret_sha256"] is None
    captured = capfd.readouterr()
    _assert_not_in_outputs({"stdout": captured.out, "stderr": captured.err, "log records": caplog.text,
                            "script stdout": proc.stdout, "script stderr": proc.stderr, "job logs": logs})
    hits = _files_containing([job_dir, tmp_path, ray_head.temp_dir], [FAKE_SECRET, FAKE_KEY_ID])
    assert not hits, f"secret found in {sorted(map(str, hits))}"


def test_forwarded_secret_reaches_the_job_and_no_output(ray_head, tmp_path, monkeypatch, capfd, caplog):
    """--forward-credentials: the job sees AWS_SECRET_ACCESS_KEY (prints its sha256); it is in none of
    our output, log records, the job's logs, the packed working_dir or its unpacked copy. The one
    place it is written is Ray's own runtime_env_agent.log (ray 2.60 logs runtime_env values there
    by design): pinned here so that any other leak fails the test."""
    caplog.set_level(logging.DEBUG)
    job_dir = _job_dir(tmp_path)
    result, logs, proc = _submit_both_ways(ray_head, job_dir, ["--forward-credentials"], monkeypatch)
    assert result["secret_sha256"] == hashlib.sha256(FAKE_SECRET.encode()).hexdigest()
    assert "forwarding AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in proc.stderr  # the user is warned
    captured = capfd.readouterr()
    _assert_not_in_outputs({"stdout": captured.out, "stderr": captured.err, "log records": caplog.text,
                            "script stdout": proc.stdout, "script stderr": proc.stderr, "job logs": logs})
    hits = _files_containing([job_dir, tmp_path, ray_head.temp_dir], [FAKE_SECRET, FAKE_KEY_ID])
    assert {p.name for p in hits} <= {"runtime_env_agent.log"}, f"secret found in {sorted(map(str, hits))}"
    unpacked = [p for p in ray_head.temp_dir.rglob("working_dir_files") if p.is_dir()]
    assert unpacked, "Ray did not unpack any working_dir package"
    for root in unpacked:
        assert not [p for p in hits if root in p.parents]


def test_sockets_listen_on_loopback_only(ray_head):
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) not installed")
    pids = set(ray_head.pids())
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]
    assert ours, f"no listening sockets found for the Ray head's processes {sorted(pids)}"
    for line in ours:
        local = line.split()[3]
        host = local.rsplit(":", 1)[0].strip("[]")
        assert host in {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, f"not loopback: {line}"


def test_smoke_config_through_the_real_train_path(ray_head, tmp_path):
    """`stackrec train --config configs/smoke.yaml` as a Ray job, through the real entrypoint.

    Data is prepared locally first (the one-node cluster shares this filesystem); every output path
    is absolute so it outlives the job's unpacked working_dir.
    """
    config = REPO / "configs" / "smoke.yaml"
    data = tmp_path / "data"
    prep = subprocess.run(
        [sys.executable, "-m", "stackrec_dist.cli", "prepare", "--config", "configs/smoke.yaml",
         "--set", f"prepare.output={data}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert prep.returncode == 0, prep.stderr[-4000:]
    overrides = [f"data.path={data}", f"train.checkpoint_dir={tmp_path / 'ckpt'}",
                 f"distributed.storage_path={tmp_path / 'ray'}", "train.progress=false"]
    job_id, status = launch_submit.submit(
        config.relative_to(REPO), address=ray_head.dashboard_url, working_dir=REPO, wait=True,
        overrides=overrides, timeout_s=500,
    )
    client = launch_submit.make_client(ray_head.dashboard_url)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    result = launch_submit.parse_result(logs)
    assert result, logs[-4000:]
    assert any(k.startswith("test/") for k in result), result  # final test metrics came back


def test_token_auth_cluster(tmp_path):
    """Ray 2.60 token auth: the submitter passes Ray's token (RAY_AUTH_MODE=token +
    RAY_AUTH_TOKEN_PATH) through Ray's own client; without the token the server answers 401 and
    `stackrec submit` exits 2 with Ray's message. The token shows up in no output."""
    from .conftest import start_ray_head

    token = hashlib.sha256(os.urandom(32)).hexdigest()
    token_path = tmp_path / "auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    heads = start_ray_head(auth_mode="token", auth_token_path=token_path)
    head = next(heads)
    try:
        job_dir = _job_dir(tmp_path)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        argv = [sys.executable, str(REPO / "launch" / "submit.py"), "--address", head.dashboard_url,
                "--working-dir", str(job_dir), "--entrypoint", ENTRY, "--wait", "--timeout", "240"]
        # A fresh process per case: Ray caches the auth mode and token per process.
        ok = subprocess.run(argv, env=dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path)),
                            capture_output=True, text=True, timeout=300, cwd=REPO)
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        assert "SUCCEEDED" in ok.stdout
        denied = subprocess.run(argv, env=dict(base, RAY_AUTH_MODE="disabled", HOME=str(tmp_path)),
                                capture_output=True, text=True, timeout=300, cwd=REPO)
        assert denied.returncode == 2, denied.stdout[-3000:] + denied.stderr[-3000:]
        assert "401" in denied.stderr or "uthentication" in denied.stderr
        for text in (ok.stdout, ok.stderr, denied.stdout, denied.stderr):
            assert token not in text
    finally:
        heads.close()  # runs the generator's finally: stop by pid, remove the temp dir
