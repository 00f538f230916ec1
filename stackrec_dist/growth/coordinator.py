"""Growth coordinator: runs a plan of stages (train, grow, new_head) crash-safely.

After a train stage the coordinator snapshots the stage's checkpoint (a single-process checkpoint
or a DeepSpeed ZeRO checkpoint of any stage and world size, assembled tensor by tensor on CPU),
applies the stacking plan, writes the grown initial checkpoint atomically and starts the next
train stage from it, possibly with another number of workers.

Crash safety: the coordinator's only memory is ``<run_dir>/plan_state.json``, replaced
atomically after each stage. A grown checkpoint is written under a temporary name, renamed into
place, and a ``MANIFEST.json`` with checksums is written last; a stage output without a valid
manifest is deleted and redone, never loaded. Rerunning the same command after a crash at any
point resumes at the first stage not recorded as done; a train stage resumes from its own last
checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from stackrec_dist.config import GrowthConfig, JobConfig, StageConfig
from stackrec_dist.growth.grow import grown_model_config
from stackrec_dist.growth.model_checkpoint import open_model_checkpoint
from stackrec_dist.growth.stacking import KeyMapping, check_matches, stacking_plan
from stackrec_dist.models import build_model
from stackrec_dist.train.checkpoint import COMPLETE_MARKER, model_config_to_state, save_checkpoint

log = logging.getLogger(__name__)

PLAN_STATE = "plan_state.json"
STAGE_MANIFEST = "MANIFEST.json"
# Fault injection for the crash-safety tests: STACKREC_CRASH_AT=<point>[:<stage name>].
CRASH_ENV = "STACKREC_CRASH_AT"


def maybe_crash(point: str, stage: str) -> None:
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return
    want_point, _, want_stage = spec.partition(":")
    if want_point == point and (not want_stage or want_stage == stage):
        log.warning("fault injection: crashing at %s of stage %s", point, stage)
        os._exit(17)


# -- atomic files --------------------------------------------------------------------------------


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


# -- plan state ----------------------------------------------------------------------------------


@dataclass
class StageRecord:
    name: str
    action: str
    output: str = ""
    blocks: int = 0
    elapsed_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlanState:
    """Which stages are done, in order, with their outputs; persisted after every stage."""

    done: list[StageRecord] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path) -> "PlanState":
        path = run_dir / PLAN_STATE
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls([StageRecord(**r) for r in raw["done"]])

    def save(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / PLAN_STATE, {"done": [dataclasses.asdict(r) for r in self.done]})

    @property
    def elapsed_s(self) -> float:
        return sum(r.elapsed_s for r in self.done)


# -- stage runners -------------------------------------------------------------------------------


class StageRunner(Protocol):
    def train(self, cfg: JobConfig, init_checkpoint: Path | None, stage_dir: Path) -> tuple[Path, dict[str, Any]]:
        """Train one stage; return (model checkpoint directory, summary incl. ``history``)."""


class LocalRunner:
    """Single-process trainer (CPU or one GPU)."""

    def train(self, cfg: JobConfig, init_checkpoint: Path | None, stage_dir: Path) -> tuple[Path, dict[str, Any]]:
        from stackrec_dist.train.checkpoint import load_model
        from stackrec_dist.train.trainer import Trainer

        model = load_model(init_checkpoint) if init_checkpoint is not None else None
        trainer = Trainer(cfg, model=model)
        last = stage_dir / "last"
        if (last / COMPLETE_MARKER).exists():
            trainer.load(last)
        summary = trainer.fit()
        summary["history"] = trainer.state.history
        # The stage's result is its final weights (``last``), as for the Ray runner: TS stages stop
        # on purpose before convergence, and the next stage grows what training ended with.
        return last, summary


class RayRunner:
    """Ray Train + DeepSpeed workers; the checkpoint handed on is the ZeRO-partitioned one."""

    def train(self, cfg: JobConfig, init_checkpoint: Path | None, stage_dir: Path) -> tuple[Path, dict[str, Any]]:
        from stackrec_dist.train.ray_job import run_distributed
        from stackrec_dist.train.worker import TRAIN_STATE_FILE

        result = run_distributed(cfg, init_checkpoint=init_checkpoint)
        checkpoint = Path(result["checkpoint"])
        state = json.loads((checkpoint / TRAIN_STATE_FILE).read_text())
        return checkpoint, {**result, "steps": state["step"], "history": state.get("history", [])}


# -- grow / new head -----------------------------------------------------------------------------


def grow_checkpoint(source: Path, output: Path, growth: GrowthConfig, info: dict[str, Any], stage: str = "") -> Path:
    """Stack a k-block checkpoint into a 2k-block one at ``output`` (atomic; manifest last).

    Only the parent's weights and the tensor being produced are held in memory: copies alias the
    parent's tensors (``torch.save`` writes a shared storage once), and fresh tensors come one at
    a time from a freshly initialised model of the grown shape.
    """
    maybe_crash("snapshot", stage)
    parent = open_model_checkpoint(source)
    old_cfg = parent.model_config
    k = old_cfg.num_blocks
    new_cfg = grown_model_config(old_cfg, growth)
    plan = stacking_plan(parent.shapes(), k, growth)
    fresh = _fresh_state(new_cfg, plan, seed=info.get("seed", 0))
    old_state = parent.state_dict()
    maybe_crash("stacking", stage)
    new_state: dict[str, torch.Tensor] = {}
    for m in plan:
        new_state[m.key] = _produce(m, old_state, fresh)
    check_matches(new_state, build_model_shapes(new_cfg))
    return _write_model_checkpoint(output, new_state, new_cfg, {**info, "parent": str(source), "blocks": 2 * k})


def _produce(m: KeyMapping, old: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> torch.Tensor:
    if m.role == "fresh":
        return fresh[m.key]
    if m.role == "zero":
        return torch.zeros_like(old[m.source])
    return old[m.source]


def _fresh_state(cfg, plan: list[KeyMapping], seed: int) -> dict[str, torch.Tensor]:
    """Initial values of the re-initialised tensors only (empty when the policy copies everything)."""
    needed = {m.key for m in plan if m.role == "fresh"}
    if not needed:
        return {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build_model(cfg).state_dict()
    return {k: v for k, v in state.items() if k in needed}


def build_model_shapes(cfg) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def new_head_checkpoint(source: Path, output: Path, num_items: int, info: dict[str, Any], seed: int = 0) -> Path:
    """Transfer (TF): keep embedding and blocks, attach a freshly initialised head of ``num_items`` outputs."""
    parent = open_model_checkpoint(source)
    old_cfg = parent.model_config
    state = parent.state_dict()
    new_cfg = dataclasses.replace(old_cfg, num_items=num_items)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_model(new_cfg).state_dict()
    for key in ("head.weight", "head.bias"):
        state[key] = fresh[key]
    if state["item_embedding.weight"].shape[0] != num_items:
        # The target domain's catalogue differs: the input embedding must cover it too. Items are
        # the same ids in both domains (one id map), so existing rows are kept, new ones fresh.
        emb = fresh["item_embedding.weight"]
        rows = min(emb.shape[0], state["item_embedding.weight"].shape[0])
        emb[:rows] = state["item_embedding.weight"][:rows]
        state["item_embedding.weight"] = emb
    return _write_model_checkpoint(output, state, new_cfg, {**info, "parent": str(source), "num_items": num_items})


def _write_model_checkpoint(output: Path, state: dict[str, torch.Tensor], cfg, info: dict[str, Any]) -> Path:
    """A weights-only checkpoint (atomic, see train/checkpoint.py), then its manifest, last."""
    save_checkpoint(output, {"model": state, "train_state": {"step": 0, "model_config": model_config_to_state(cfg)}})
    maybe_crash("before_manifest", info.get("stage", ""))
    write_stage_manifest(output, info)
    return output


# -- the coordinator -----------------------------------------------------------------------------


def stage_job_config(cfg: JobConfig, stage: StageConfig, blocks: int, num_items: int, stage_dir: Path) -> JobConfig:
    """The job config of one train stage: its data, budget, depth and checkpoint directory."""
    data = dataclasses.replace(cfg.data, path=stage.data_path or cfg.data.path,
                               train_split=stage.train_split or cfg.data.train_split)
    train = dataclasses.replace(
        cfg.train,
        checkpoint_dir=str(stage_dir),
        max_steps=stage.max_steps or cfg.train.max_steps,
        epochs=stage.epochs or cfg.train.epochs,
    )
    model = dataclasses.replace(cfg.model, num_blocks=blocks, num_items=num_items or cfg.model.num_items)
    distributed = dataclasses.replace(
        cfg.distributed,
        num_workers=cfg.distributed.num_workers if stage.num_workers < 0 else stage.num_workers,
        zero_stage=cfg.distributed.zero_stage if stage.zero_stage < 0 else stage.zero_stage,
    )
    # One Ray run per stage: its own name, so stages never resume each other's checkpoints.
    return dataclasses.replace(cfg, name=f"{cfg.name}-{stage.name}", data=data, train=train, model=model,
                               distributed=distributed, plan=[])


class Coordinator:
    def __init__(self, cfg: JobConfig, run_dir: str | Path, runner: StageRunner | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.runner = runner

    def _load_verified_state(self) -> PlanState:
        """Recorded stages, cut at the first whose output no longer verifies (it is redone)."""
        state = PlanState.load(self.run_dir)
        names = [s.name for s in self.cfg.plan]
        for i, record in enumerate(state.done):
            output = Path(record.output)
            ok = record.name in names and (
                verify_stage_output(output) if record.action in ("grow", "new_head")
                else (output / COMPLETE_MARKER).exists() or (output / "model_config.json").exists()
            )
            if not ok:
                log.warning("stage %s: recorded output %s does not verify; redoing from here", record.name, output)
                state.done = state.done[:i]
                state.save(self.run_dir)
                break
        # Temporary and set-aside directories of a crashed run are never loaded; remove them.
        for leftover in [*self.run_dir.glob("*/.*.tmp-*"), *self.run_dir.glob("*/.*.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        return state

    def run(self) -> PlanState:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = self._load_verified_state()
        done = {r.name: r for r in state.done}
        current: Path | None = None
        blocks, num_items = self.cfg.model.num_blocks, self.cfg.model.num_items
        for position, stage in enumerate(self.cfg.plan):
            record = done.get(stage.name)
            if record is not None:
                current, blocks = Path(record.output), record.blocks
                num_items = record.metrics.get("num_items", num_items)
                continue
            stage_dir = self.run_dir / stage.name
            start = time.perf_counter()
            info = {"stage": stage.name, "plan_position": position, "seed": self.cfg.train.seed}
            metrics: dict[str, Any] = {}
            if stage.action == "train":
                job = stage_job_config(self.cfg, stage, blocks, num_items, stage_dir)
                runner = self.runner or (RayRunner() if job.distributed.num_workers > 0 else LocalRunner())
                current, metrics = runner.train(job, current, stage_dir)
                metrics = {**metrics, "data_path": job.data.path}
                maybe_crash("after_train", stage.name)
            elif stage.action == "grow":
                if current is None:
                    raise ValueError(f"plan stage {stage.name!r}: grow needs a trained model before it")
                current = grow_checkpoint(current, stage_dir / "grown", self.cfg.growth, info, stage.name)
                blocks *= 2
            elif stage.action == "new_head":
                if current is None:
                    raise ValueError(f"plan stage {stage.name!r}: new_head needs a trained model before it")
                from stackrec_dist.train.data_info import dataset_num_items

                target = dataclasses.replace(self.cfg.data, path=stage.data_path or self.cfg.data.path)
                num_items = dataset_num_items(target)
                current = new_head_checkpoint(current, stage_dir / "new_head", num_items, info, self.cfg.train.seed)
            maybe_crash("before_record", stage.name)
            metrics = {**{k: v for k, v in metrics.items() if k != "history"}, "num_items": num_items,
                       "history": metrics.get("history", [])}
            state.done.append(StageRecord(stage.name, stage.action, str(current), blocks,
                                          time.perf_counter() - start, metrics))
            state.save(self.run_dir)
        return state
