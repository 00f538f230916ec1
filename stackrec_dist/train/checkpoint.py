"""Single-process checkpoints: a directory of named state dicts, written atomically.

Layout of ``<dir>/``::

    model.pt        model state dict
    optimizer.pt    optimizer state dict (absent in a weights-only checkpoint)
    scheduler.pt    LR scheduler state dict
    train_state.pt  step, epoch, best metric, data cursor, model config (plain types only)
    COMPLETE        written last; a directory without it is never loaded

Everything is read back with ``torch.load(weights_only=True)``: no pickled code runs on load.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from stackrec_dist.config import ModelConfig, from_dict
from stackrec_dist.errors import CheckpointError
from stackrec_dist.models import SequentialRecommender, build_model

COMPLETE_MARKER = "COMPLETE"




def save_checkpoint(path: str | Path, states: dict[str, dict[str, Any]]) -> Path:
    """Write ``{name: state_dict}`` to ``path`` atomically (temporary directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, state in states.items():
        torch.save(state, tmp / f"{name}.pt")
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    if path.exists():
        # Rename the old one out of the way first so a crash leaves either the old or the new copy.
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def load_checkpoint(path: str | Path, names: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Read the named state dicts of a complete checkpoint (all when ``names`` is None)."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    files = sorted(path.glob("*.pt")) if names is None else [path / f"{n}.pt" for n in names]
    out = {}
    for file in files:
        if not file.exists():
            raise CheckpointError(f"checkpoint {path} lacks {file.name}")
        out[file.stem] = torch.load(file, map_location="cpu", weights_only=True)
    return out


def model_config_to_state(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def model_config_from_state(state: dict[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, dict(state), "model")


def load_model(path: str | Path) -> SequentialRecommender:
    """A model from a checkpoint directory (``best`` or ``last``), its config taken from the checkpoint."""
    states = load_checkpoint(path, names=("model", "train_state"))
    model = build_model(model_config_from_state(states["train_state"]["model_config"]))
    model.load_state_dict(states["model"])
    return model
