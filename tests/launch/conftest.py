"""A real single-node Ray head with the job server (dashboard), on loopback only, for launch tests.

Not ``ray stop``: that command kills *every* Ray process on the machine, including other test
sessions' clusters. The head runs as ``ray start --head --block`` in its own session; teardown
sends it SIGTERM (it stops the processes it started) and then kills whatever is left in that
session by pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.fixtures.processes import free_port, session_pids, stop_session

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@dataclass
class RayHead:
    dashboard_url: str
    gcs_address: str
    temp_dir: Path
    pid: int
    log_path: Path

    def pids(self) -> list[int]:
        return session_pids(self.pid)


def _dashboard_dependency_error() -> str | None:
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError as err:  # pragma: no cover
        return str(err)
    err = get_dashboard_dependency_error()
    return str(err) if err else None


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    yield from start_ray_head(auth_mode="disabled")


def start_ray_head(auth_mode: str = "disabled", auth_token_path: Path | None = None) -> Iterator[RayHead]:
    """Start a head (skipping when the dashboard cannot run), yield it, stop it by pid."""
    missing = _dashboard_dependency_error()
    if missing:
        pytest.skip(
            f"Ray job server needs the dashboard, which needs ray[default] ({missing}): "
            "pip install 'ray[default]==<ray version>'"
        )
    # Not under pytest's basetemp: concurrent pytest sessions of the same user prune old
    # /tmp/pytest-of-<user>/pytest-N dirs, which would pull the sockets from under a live head.
    temp_dir = Path(tempfile.mkdtemp(prefix="stackrec-ray-"))
    gcs_port, dash_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and not k.startswith("AWS_")}
    env.update(
        # The job's `python` / `stackrec` must be this venv's: the driver inherits the raylet's PATH.
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # On Linux, Ray 2.60 swaps --node-ip-address=127.0.0.1 for the host's routable IP and binds
        # every interface; with this switch it keeps the loopback address (checked in a test).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        # Ray 2.60 turns token auth on by itself whenever ~/.ray/auth_token exists (any local
        # `ray.init()` writes one). Pin the mode so the fixture does not depend on that file;
        # token auth is exercised by its own test with its own token.
        RAY_AUTH_MODE=auth_mode,
    )
    if auth_token_path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(auth_token_path)
    log_path = temp_dir / "ray-start.log"
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        # Ray's fixed default ports (dashboard agent 52365, client server 10001) collide with any
        # other Ray on the machine (a colleague's test session): then "No available agent to
        # submit job". Free ports for those too.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        "--object-store-memory=100000000",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=temp_dir)
    head = RayHead(f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", temp_dir, proc.pid, log_path)
    try:
        _wait_ready(head, proc, timeout_s=180)
        yield head
    finally:
        stop_session(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_ready(head: RayHead, proc: subprocess.Popen, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{head.log_path.read_text()[-4000:]}")
        try:
            r = requests.get(f"{head.dashboard_url}/api/version", timeout=2)
            if r.status_code in (200, 401):  # 401: up, with token auth
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    dash_logs = "".join(p.read_text()[-3000:] for p in head.temp_dir.glob("session_*/logs/dashboard.*"))
    raise RuntimeError(f"Ray dashboard not ready in {timeout_s} s:\n{head.log_path.read_text()[-3000:]}\n"
                       f"dashboard logs:\n{dash_logs}")
