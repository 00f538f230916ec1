"""The bad-input corpus: small generated faults, each run through the real ``stackrec`` CLI.

``run_cli`` starts ``python -m stackrec_dist.cli`` in a subprocess (this tree first on the path)
and ``assert_one_line`` checks the contract of docs/errors.md: the exit code of the error class,
and stderr ending in the one line ``stackrec: <kind> error: ...`` with no traceback anywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.datasets import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]


class Result:
    def __init__(self, proc: subprocess.CompletedProcess, wall_s: float) -> None:
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.wall_s = wall_s
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        self.last = lines[-1] if lines else ""


def run_cli(*args: str, tmp_path: Path, timeout: float = 120, env: dict[str, str] | None = None) -> Result:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "STACKREC_ERROR_LOG": str(tmp_path / "last-error.log"),
                "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "stackrec_dist.cli", *args], cwd=tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # say where it stood, not just that it timed out
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"stackrec {' '.join(args)} still running after {timeout:.0f} s; stderr tail:\n{err[-4000:]}")
    return Result(proc, time.monotonic() - start)


def assert_one_line(res: Result, code: int, kind: str, *fragments: str) -> str:
    """Exit ``code``; the last stderr line is ``stackrec: <kind> error: ...`` holding ``fragments``."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.code == code, (res.code, res.stderr[-3000:])
    assert res.last.startswith(f"stackrec: {kind} error: "), res.stderr[-3000:]
    for fragment in fragments:
        assert fragment in res.last, (fragment, res.last)
    return res.last


@pytest.fixture(scope="session")
def corpus_source(tmp_path_factory) -> Path:
    """A tiny prepared dataset (60 users, 20 items, 2 shards) that tests copy before damaging."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("errors-src") / "ds", users=60, items=20)


@pytest.fixture
def dataset(corpus_source, tmp_path) -> Path:
    """A private copy of the tiny dataset: damage it freely."""
    out = tmp_path / "ds"
    shutil.copytree(corpus_source, out)
    return out


def write_job(tmp_path: Path, data_path: Path | str, **sections) -> Path:
    """A job YAML for a tiny single-process run on ``data_path``; ``sections`` override fields."""
    job = {
        "name": "errors",
        "model": {"dim": 8, "num_blocks": 1, "dilations": [1]},
        "data": {"path": str(data_path), "max_len": 8, "batch_size": 16, "shuffle_buffer": 1},
        "train": {"max_steps": 2, "eval_every": 2, "progress": False, "patience": 0,
                  "checkpoint_dir": str(tmp_path / "ckpt")},
        "eval": {"batch_size": 64},
        "distributed": {"num_workers": 0},
    }
    for section, fields in sections.items():
        job.setdefault(section, {}).update(fields)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture
def checkpoint(tmp_path, corpus_source) -> Path:
    """A complete single-process checkpoint of a tiny model that fits the corpus dataset."""
    import json

    from stackrec_dist.config import ModelConfig
    from stackrec_dist.models import build_model
    from stackrec_dist.train.checkpoint import save_model_checkpoint

    num_items = json.loads((corpus_source / "manifest.json").read_text())["num_items"]
    cfg = ModelConfig(dim=8, num_blocks=1, dilations=[1], num_items=num_items)
    model = build_model(cfg)
    return save_model_checkpoint(tmp_path / "model-ckpt", model.state_dict(), cfg)
