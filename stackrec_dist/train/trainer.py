"""Single-process trainer (CPU or one GPU): train, validate, early-stop, checkpoint, resume.

The loop is the torchtitan shape: build everything from sub-configs, then
``while not done: step; maybe validate; maybe save``. Everything needed to resume (model,
optimizer, scheduler, data cursor, step/epoch/best) is a named state dict in the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stackrec_dist.config import EvalConfig, JobConfig
from stackrec_dist.data.stream import build_train_loader, iter_eval_batches
from stackrec_dist.eval.evaluate import evaluate
from stackrec_dist.models import SequentialRecommender, build_model
from stackrec_dist.train.checkpoint import (
    load_checkpoint,
    model_config_to_state,
    save_checkpoint,
)
from stackrec_dist.train.data_info import dataset_num_items, steps_per_epoch
from stackrec_dist.train.optim import build_optimizer
from stackrec_dist.train.schedule import lr_lambda
from stackrec_dist.train.step import RecommenderLoss

log = logging.getLogger(__name__)

EARLY_STOP_METRIC = "ndcg@5"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainState:
    """Counters and history of a run; plain types so checkpoints load with weights_only=True."""

    step: int = 0
    epoch: int = 0
    best_metric: float = -1.0
    best_step: int = -1
    bad_validations: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record_validation(self, metrics: dict[str, float]) -> bool:
        """Append a validation point to the history; True when it is a new best (early-stop metric)."""
        record = {"step": self.step, "epoch": self.epoch, "elapsed_s": self.elapsed_s}
        record.update({f"valid/{k}": v for k, v in metrics.items()})
        self.history.append(record)
        if metrics[EARLY_STOP_METRIC] > self.best_metric:
            self.best_metric, self.best_step, self.bad_validations = metrics[EARLY_STOP_METRIC], self.step, 0
            return True
        self.bad_validations += 1
        return False

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


class Trainer:
    """Trains one stage. ``model`` may be passed in (e.g. a freshly grown one)."""

    def __init__(self, cfg: JobConfig, model: SequentialRecommender | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads > 0 and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        if model is None:
            model_cfg = cfg.model
            if model_cfg.num_items == 0:
                model_cfg = dataclasses.replace(model_cfg, num_items=dataset_num_items(cfg.data))
            model = build_model(model_cfg)
        self.model = model.to(self.device)
        self.objective = RecommenderLoss.for_data(self.model, cfg.loss, cfg.data).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.train_loader = build_train_loader(cfg.data, cfg.data.train_split, rank=0, world_size=1)
        self.steps_per_epoch = steps_per_epoch(cfg.data, cfg.data.train_split)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim, self.total_steps))
        self.state = TrainState()
        self.best_model_state: dict[str, torch.Tensor] | None = None
        self.checkpoint_dir = Path(cfg.train.checkpoint_dir)

    # -- checkpoints -------------------------------------------------------------------------

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_loader.state_dict(),
            "train_state": {**self.state.state_dict(), "model_config": model_config_to_state(self.model.cfg)},
        }

    def save(self, path: str | Path | None = None) -> Path:
        return save_checkpoint(path or self.checkpoint_dir / "last", self.state_dicts())

    def load(self, path: str | Path) -> None:
        states = load_checkpoint(path)
        self.model.load_state_dict(states["model"])
        self.optimizer.load_state_dict(states["optimizer"])
        self.scheduler.load_state_dict(states["scheduler"])
        self.train_loader.load_state_dict(states["data"])
        train_state = dict(states["train_state"])
        train_state.pop("model_config", None)
        self.state.load_state_dict(train_state)

    # -- loop --------------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        self.model.train()
        inputs = batch["inputs"].to(self.device, non_blocking=True)
        targets = batch["targets"].to(self.device, non_blocking=True)
        with self._autocast():
            loss = self.objective(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        return loss.item()

    def validate(self, split: str = "valid", eval_cfg: EvalConfig | None = None) -> dict[str, float]:
        eval_cfg = eval_cfg or self.cfg.eval
        batches = iter_eval_batches(self.cfg.data, split, eval_cfg.batch_size)
        return evaluate(self.model, batches, eval_cfg.ks, self.device, max_batches=eval_cfg.max_batches)

    def _should_stop(self) -> bool:
        return self.state.step >= self.total_steps or (
            self.cfg.train.patience > 0 and self.state.bad_validations >= self.cfg.train.patience
        )

    def _after_validation(self, metrics: dict[str, float]) -> None:
        if self.state.record_validation(metrics):
            self.best_model_state = copy.deepcopy(self.model.state_dict())
            save_checkpoint(self.checkpoint_dir / "best", {
                "model": self.model.state_dict(),
                "train_state": {**self.state.state_dict(), "model_config": model_config_to_state(self.model.cfg)},
            })

    def fit(self) -> dict[str, Any]:
        """Train until max steps/epochs or early stop; restore the best model; return a summary."""
        cfg = self.cfg.train
        eval_every = cfg.eval_every or self.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not cfg.progress,
                   desc=f"train {self.model.cfg.num_blocks} blocks", unit="step", dynamic_ncols=True)
        start = time.perf_counter() - self.state.elapsed_s
        running = None
        while not self._should_stop():
            # One pass = the rest of the current epoch from the loader's cursor.
            for batch in self.train_loader:
                loss = self.train_step(batch)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                self.state.elapsed_s = time.perf_counter() - start
                bar.update(1)
                if self.state.step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{running:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {self.state.step}")
                if self.state.step % eval_every == 0:
                    metrics = self.validate()
                    self._after_validation(metrics)
                    bar.write(f"step {self.state.step}: valid ndcg@5={metrics['ndcg@5']:.4f} "
                              f"hr@5={metrics['hr@5']:.4f} loss={running:.4f}")
                    self.save()
                if self._should_stop():
                    break
            else:
                self.state.epoch += 1
        bar.close()
        self.state.elapsed_s = time.perf_counter() - start
        if self.state.best_step < self.state.step:
            metrics = self.validate()
            self._after_validation(metrics)
        self.save()
        if self.best_model_state is not None:
            self.model.load_state_dict(self.best_model_state)
        return {
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "elapsed_s": self.state.elapsed_s,
            "best_valid_ndcg@5": self.state.best_metric,
            "best_step": self.state.best_step,
        }
