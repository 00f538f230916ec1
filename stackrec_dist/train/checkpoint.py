"""One checkpoint format and one reader, whatever wrote it: a single process or Ray workers, any
ZeRO stage, any world size, a grown or new-head model, on local disk or ``s3://``.

Layout of a checkpoint directory (named stateful parts, as torchtitan's checkpointer)::

    train_state.json     counters and validation history, stage and plan run id, the model config,
                         and the engine part's description (kind, ZeRO stage, world size, tag)
    cursor-rank{r}.json  the data cursor of rank r (exactly-once resume)
    model.pt             full model weights (plain engine; alone in a weights-only checkpoint)
    optimizer.pt         plain engine: optimizer state
    scheduler.pt         plain engine: LR schedule state
    engine/, latest      DeepSpeed engine: ZeRO shards of model and optimizer (train/zero_checkpoint.py
                         consolidates them tensor by tensor)
    best-model.pt        full weights of the best validation so far (optional)
    COMPLETE             written last; a directory without it is never loaded

Torch files are read with ``weights_only=True`` (no pickled code runs), except DeepSpeed's own
shards, which DeepSpeed and the consolidator read and which only this project's runs write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stackrec_dist.config import ModelConfig, from_dict
from stackrec_dist.errors import CheckpointError, safe_torch_load

TRAIN_STATE_FILE = "train_state.json"
CURSOR_FILE = "cursor-rank{rank}.json"
MODEL_FILE = "model.pt"
BEST_MODEL_FILE = "best-model.pt"
COMPLETE_MARKER = "COMPLETE"


def write_atomically(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary directory, mark it complete, rename it to ``path``: a crash leaves either
    the old or the new copy, never a half-written one under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    fill(tmp)
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def model_config_to_state(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_train_state(directory: Path, train_state: dict[str, Any]) -> None:
    (directory / TRAIN_STATE_FILE).write_text(json.dumps(train_state, default=float))


def save_model_checkpoint(path: str | Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                          extra: dict[str, Any] | None = None,
                          best_state: dict[str, torch.Tensor] | None = None) -> Path:
    """A weights-only checkpoint (a grown model, a new head, a stage's final weights), atomically."""

    def fill(tmp: Path) -> None:
        torch.save(state, tmp / MODEL_FILE)
        if best_state is not None:
            torch.save(best_state, tmp / BEST_MODEL_FILE)
        write_train_state(tmp, {"step": 0, **(extra or {}), "model_config": model_config_to_state(model_cfg),
                                "engine": {"kind": "weights"}})

    return write_atomically(path, fill)


@dataclasses.dataclass
class Checkpoint:
    """A complete checkpoint directory on local disk (downloaded first when it lives on a store)."""

    path: Path
    source: str
    train_state: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        try:
            return from_dict(ModelConfig, dict(self.train_state["model_config"]), "model")
        except Exception as err:
            raise CheckpointError(f"{self.source}: its model config is unreadable ({err})") from None

    @property
    def engine(self) -> dict[str, Any]:
        return dict(self.train_state.get("engine", {}))

    @property
    def step(self) -> int:
        return int(self.train_state.get("step", 0))

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full model state dict on CPU (consolidated from ZeRO shards when needed)."""
        if (self.path / MODEL_FILE).is_file():
            return safe_torch_load(self.path / MODEL_FILE)
        if self.engine.get("kind") == "deepspeed":
            from stackrec_dist.train.zero_checkpoint import load_consolidated_state_dict

            try:
                return load_consolidated_state_dict(self.path, tag=self.engine.get("tag"))
            except (FileNotFoundError, ValueError, KeyError) as err:
                raise CheckpointError(f"{self.source}: its DeepSpeed shards are incomplete ({err})") from None
        raise CheckpointError(f"{self.source} holds no model weights ({MODEL_FILE} or DeepSpeed shards)")

    def best_model_state(self) -> dict[str, torch.Tensor] | None:
        return safe_torch_load(self.path / BEST_MODEL_FILE) if (self.path / BEST_MODEL_FILE).is_file() else None

    def weights(self, which: str = "best") -> tuple[str, dict[str, torch.Tensor]]:
        """("best" | "final", state): the best validation weights when recorded, else the final ones."""
        if which == "best":
            best = self.best_model_state()
            if best is not None:
                return "best", best
        return "final", self.model_state()

    def cursor(self, rank: int) -> dict[str, Any] | None:
        path = self.path / CURSOR_FILE.format(rank=rank)
        return json.loads(path.read_text()) if path.is_file() else None

    def load_model(self, which: str = "best"):
        """(model, "best" | "final"): the recommender with these weights, on CPU."""
        from stackrec_dist.models import build_model

        cfg = self.model_config
        kind, state = self.weights(which)
        model = build_model(cfg)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(f"{self.source}: weights do not fit its model config: {first}") from None
        return model, kind


def _local_copy(uri: str, storage_options: dict[str, Any] | None) -> Path:
    """Download a checkpoint directory from an object store into the user's cache."""
    from stackrec_dist.data.storage import open_fs

    fs, inside = open_fs(uri, storage_options or {})
    cache = Path(os.environ.get("STACKREC_CACHE", Path.home() / ".cache" / "stackrec")) / "checkpoints"
    local = cache / hashlib.sha1(uri.encode()).hexdigest()[:16]
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    if not fs.exists(f"{inside}/{COMPLETE_MARKER}"):
        raise CheckpointError(f"{uri} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    for remote in fs.find(inside):
        target = local / os.path.relpath(remote, inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
    return local


def open_checkpoint(path: str | Path, storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """The one reader: any complete checkpoint written by this project, local or on a store."""
    source = str(path)
    if "://" in source and not source.startswith("file://"):
        local = _local_copy(source, storage_options)
    else:
        local = Path(source[len("file://"):] if source.startswith("file://") else source)
    if not local.exists():
        raise CheckpointError(f"checkpoint {source} does not exist")
    if not local.is_dir():
        raise CheckpointError(f"checkpoint {source} is a file; a checkpoint is a directory")
    if not (local / COMPLETE_MARKER).exists():
        raise CheckpointError(f"{source} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    try:
        train_state = json.loads((local / TRAIN_STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{source} lacks {TRAIN_STATE_FILE}") from None
    except ValueError as err:
        raise CheckpointError(f"{source}/{TRAIN_STATE_FILE} is not valid JSON ({err})") from None
    if "model_config" not in train_state:
        raise CheckpointError(f"{source}/{TRAIN_STATE_FILE} lacks the model config")
    return Checkpoint(local, source, train_state)


def check_catalogue(checkpoint: Checkpoint, num_items: int, data_path: str) -> None:
    """A model meets a dataset only when both have the same catalogue (item ids 1..num_items-1)."""
    have = checkpoint.model_config.num_items
    if have != num_items:
        raise CheckpointError(
            f"checkpoint {checkpoint.source} has a catalogue of {have} items but dataset {data_path} has "
            f"{num_items}: they were not prepared from the same item id map")
