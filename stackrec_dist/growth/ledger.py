"""The growth coordinator's memory, written crash-safely: ``<run_dir>/plan_state.json`` and the
outputs of finished stages.

A stage's output is a weights-only checkpoint (``train/checkpoint.py`` layout): the final weights
of a train stage (with its best weights beside them), a grown model, or a model with a new head.
It is written under a temporary name, renamed into place, then its ``MANIFEST.json`` with a sha256
per file is written last, and only then is the stage appended to the plan state (replaced
atomically). A stage output without a valid manifest is never loaded: the stage is redone.

The ledger lives where the coordinator runs. Ray workers growing in place reach it through a small
actor pinned to the driver's node (``train/ray_job.py``), so no worker ever writes the run
directory itself: nothing assumes a disk shared between nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stackrec_dist.config import ModelConfig
from stackrec_dist.train.checkpoint import save_model_checkpoint

log = logging.getLogger(__name__)

PLAN_STATE = "plan_state.json"
STAGE_MANIFEST = "MANIFEST.json"
# Fault injection for the crash-safety tests: STACKREC_CRASH_AT=<point>[:<stage name>]; with
# STACKREC_CRASH_ONCE=<file>, only the first process to get there dies (it creates the file), so
# a worker group that Ray restarts gets past the point.
CRASH_ENV = "STACKREC_CRASH_AT"
CRASH_ONCE_ENV = "STACKREC_CRASH_ONCE"


def maybe_crash(point: str, stage: str) -> None:
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return
    want_point, _, want_stage = spec.partition(":")
    if want_point == point and (not want_stage or want_stage == stage):
        once = os.environ.get(CRASH_ONCE_ENV, "")
        if once:
            if os.path.exists(once):
                return
            with open(once, "w") as f:
                f.write(f"{point}:{stage}\n")
        log.warning("fault injection: crashing at %s of stage %s", point, stage)
        os._exit(17)


def fault_injection_env() -> dict[str, str]:
    """The fault-injection variables of this process, for the processes it starts (Ray workers)."""
    return {k: os.environ[k] for k in (CRASH_ENV, CRASH_ONCE_ENV) if os.environ.get(k)}


# Test-only, beside the fault injection: STACKREC_WIPE_AT_STAGE_END=<dir>[<os.pathsep><dir>...];
# every process that ends a stage of a plan segment (each Ray worker; the driver of a
# single-process plan) empties these directories. Set it in the environment a Ray node is started
# with (not forwarded by fault_injection_env), naming that node's scratch (TMPDIR, STACKREC_CACHE):
# each worker then empties its own node's, and a later stage can only use what was stored
# elsewhere (tests/growth/test_two_nodes.py).
WIPE_ENV = "STACKREC_WIPE_AT_STAGE_END"


def maybe_wipe_scratch(stage: str) -> None:
    for directory in filter(None, os.environ.get(WIPE_ENV, "").split(os.pathsep)):
        root = Path(directory)
        for child in list(root.iterdir()) if root.is_dir() else []:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        log.warning("test hook: emptied %s at the end of stage %s", directory, stage)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_stage_manifest(directory: Path, info: dict[str, Any]) -> None:
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != STAGE_MANIFEST}
    write_json_atomic(directory / STAGE_MANIFEST, {**info, "files": files})


def verify_stage_output(directory: Path) -> bool:
    """True only for a stage output whose manifest exists and whose files match their checksums."""
    manifest = directory / STAGE_MANIFEST
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((directory / name).exists() and sha256_file(directory / name) == digest for name, digest in files.items())


@dataclass
class StageRecord:
    name: str
    action: str
    output: str = ""
    blocks: int = 0
    elapsed_s: float = 0.0  # wall-clock of the stage, its set-up and the pause before it included
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlanState:
    """Which stages are done, in order, with their outputs; persisted after every stage."""

    run_id: str = ""
    done: list[StageRecord] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path) -> PlanState:
        path = run_dir / PLAN_STATE
        if not path.exists():
            return cls(run_id=uuid.uuid4().hex[:12])
        raw = json.loads(path.read_text())
        return cls(raw.get("run_id") or uuid.uuid4().hex[:12], [StageRecord(**r) for r in raw["done"]])

    def save(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / PLAN_STATE,
                          {"run_id": self.run_id, "done": [dataclasses.asdict(r) for r in self.done]})

    @property
    def elapsed_s(self) -> float:
        return sum(r.elapsed_s for r in self.done)


class PlanLedger:
    """Records finished stages: their weights (atomically, manifest last), then the plan state."""

    def __init__(self, run_dir: str | Path, plan_names: list[str] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = self._load_verified(plan_names)

    def _load_verified(self, plan_names: list[str] | None) -> PlanState:
        """Recorded stages, cut at the first whose output no longer verifies (it is redone)."""
        state = PlanState.load(self.run_dir)
        for i, record in enumerate(state.done):
            known = plan_names is None or record.name in plan_names
            if not known or not verify_stage_output(Path(record.output)):
                log.warning("stage %s: recorded output %s does not verify; redoing from here", record.name,
                            record.output)
                state.done = state.done[:i]
                break
        state.save(self.run_dir)
        # Temporary and set-aside directories of a crashed run are never loaded; remove them.
        for leftover in [*self.run_dir.glob("*/.*.tmp-*"), *self.run_dir.glob("*/.*.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        return state

    @property
    def run_id(self) -> str:
        return self.state.run_id

    def done(self) -> dict[str, StageRecord]:
        return {r.name: r for r in self.state.done}

    def record(self, record: StageRecord, weights: dict[str, torch.Tensor], model_cfg: ModelConfig,
               info: dict[str, Any], best: dict[str, torch.Tensor] | None = None) -> str:
        """Write the stage's output checkpoint and append the stage; idempotent per stage name
        (a worker group restarted after a crash may report a stage twice)."""
        existing = self.done().get(record.name)
        if existing is not None:
            return existing.output
        output = Path(record.output)
        save_model_checkpoint(output, weights, model_cfg,
                              {"stage": record.name, "history": record.metrics.get("history", [])}, best_state=best)
        maybe_crash("before_manifest", record.name)
        write_stage_manifest(output, {**info, "stage": record.name, "blocks": record.blocks})
        maybe_crash("before_record", record.name)
        self.state.done.append(record)
        self.state.save(self.run_dir)
        return str(output)

    def amend(self, name: str, **fields: Any) -> None:
        """Adjust a recorded stage's bookkeeping (not its output), e.g. add a worker group's start-up."""
        for r in self.state.done:
            if r.name == name:
                for key, value in fields.items():
                    setattr(r, key, value)
        self.state.save(self.run_dir)

    def reload(self) -> None:
        self.state = PlanState.load(self.run_dir)
