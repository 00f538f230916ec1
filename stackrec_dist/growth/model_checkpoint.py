"""Read a model checkpoint of either kind, for the growth coordinator.

- single-process checkpoints (``model.pt`` + ``train_state.pt``, see train/checkpoint.py);
- DeepSpeed checkpoints of any ZeRO stage and world size (``latest`` + ``<tag>/...`` shards and a
  ``model_config.json`` written by the Ray workers), assembled on CPU by train/zero_checkpoint.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stackrec_dist.config import ModelConfig
from stackrec_dist.train.checkpoint import load_checkpoint, model_config_from_state

DEEPSPEED_MODEL_CONFIG = "model_config.json"


@dataclass
class ModelCheckpoint:
    path: Path
    model_config: ModelConfig
    _load: Callable[[], dict[str, torch.Tensor]]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full (consolidated) model state dict on CPU."""
        return self._load()

    def shapes(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.state_dict().items()}


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DeepSpeed engines wrap the RecommenderLoss objective, whose model lives under "model.".
    if state and all(k.startswith("model.") for k in state):
        return {k[len("model."):]: v for k, v in state.items()}
    return state


def open_model_checkpoint(path: str | Path) -> ModelCheckpoint:
    path = Path(path)
    if (path / "model.pt").exists():
        meta = load_checkpoint(path, names=("train_state",))["train_state"]
        cfg = model_config_from_state(meta["model_config"])
        cache: dict[str, dict[str, torch.Tensor]] = {}

        def load() -> dict[str, torch.Tensor]:
            if "s" not in cache:
                cache["s"] = load_checkpoint(path, names=("model",))["model"]
            return cache["s"]

        return ModelCheckpoint(path, cfg, load)
    if (path / DEEPSPEED_MODEL_CONFIG).exists():
        from stackrec_dist.config import from_dict
        from stackrec_dist.train.zero_checkpoint import load_consolidated_state_dict

        cfg = from_dict(ModelConfig, json.loads((path / DEEPSPEED_MODEL_CONFIG).read_text()), "model")
        cache = {}

        def load_ds() -> dict[str, torch.Tensor]:
            if "s" not in cache:
                cache["s"] = _strip_prefix(load_consolidated_state_dict(path))
            return cache["s"]

        return ModelCheckpoint(path, cfg, load_ds)
    raise FileNotFoundError(
        f"{path} is neither a single-process checkpoint (model.pt) nor a DeepSpeed checkpoint "
        f"with {DEEPSPEED_MODEL_CONFIG}"
    )
