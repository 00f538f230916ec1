"""The one training loop, whatever the parallelism (torchtitan's shape).

A single process is the world-size-1 case: :class:`TrainLoop` builds the model, the objective,
the reader of this rank and an engine (``train/engine.py``: a plain PyTorch optimizer in one
process, DeepSpeed ZeRO 0-3 on a process group), then ``fit()``::

    while not should_stop: step; every eval_every steps: validate, keep the best, checkpoint

One optimizer step (global batch of ``data.batch_size`` windows, ``b = batch_size / world`` per
rank, split into ``accum`` micro-batches):

* every rank computes the mean loss over its real (non-pad) targets; the per-rank loss is
  re-weighted by ``n_rank * world * accum / N_global`` (token counts all-reduced first), so that the
  engine's averaging over ranks and micro-batches gives exactly the gradient of the global
  token-mean loss: on one process that is the plain mean;
* a rank whose share of the epoch is exhausted runs all-pad micro-batches (zero gradient; the
  ZeRO-3 gathers are collectives) until every rank's is, then the epoch ends.

Checkpoints go through a *sink*: :class:`LocalSink` writes ``<train.checkpoint_dir>/last`` (and
``best``) atomically; the Ray sink (``train/ray_job.py``) hands a directory to ``ray.train.report``.
Either way the directory has the one layout of ``train/checkpoint.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from stackrec_dist.config import JobConfig, config_to_dict
from stackrec_dist.data.errors import DataError
from stackrec_dist.errors import CheckpointError, TrainingError
from stackrec_dist.train import distributed as D
from stackrec_dist.train.checkpoint import (
    BEST_MODEL_FILE,
    CURSOR_FILE,
    Checkpoint,
    open_checkpoint,
    save_model_checkpoint,
    write_atomically,
    write_train_state,
)
from stackrec_dist.train.device import DeviceChoice

log = logging.getLogger(__name__)

EARLY_STOP_METRIC = "ndcg@5"


@dataclass
class TrainState:
    """Counters and history of one train stage; plain types (JSON in every checkpoint)."""

    step: int = 0
    epoch: int = 0
    best_metric: float = -1.0
    best_step: int = -1
    bad_validations: int = 0
    elapsed_s: float = 0.0
    last_report_step: int = -1
    finished: bool = False  # the stage's stop rule fired; its last checkpoint is final
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in TrainState.__dataclass_fields__:
            if key in state:
                setattr(self, key, state[key])

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


@dataclass
class World:
    """This process's place: rank, world size, device; ``ctx`` is None for a lone process
    (plain engine, no process group)."""

    choice: DeviceChoice
    ctx: D.DistContext | None = None

    @property
    def rank(self) -> int:
        return self.ctx.rank if self.ctx else 0

    @property
    def world_size(self) -> int:
        return self.ctx.world_size if self.ctx else 1

    @property
    def device(self) -> torch.device:
        return self.ctx.device if self.ctx else self.choice.torch_device()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class LoopOptions:
    """Run-time switches of the loop that are not part of a job's configuration."""

    data_source: str = "stream"  # "stream" (the Parquet reader) or "synthetic" (in-memory batches)
    synthetic_steps_per_epoch: int = 20  # data_source=synthetic: global batches per epoch
    evaluate: bool = True  # validate (and early-stop) at each checkpoint
    checkpoint: bool = True  # save a checkpoint at each validation point
    consumed_log_dir: str = ""  # per-rank JSONL of the windows consumed at each step (tests)
    fail_at_step: int = 0  # test hook: rank `fail_rank` dies right after this step, once
    fail_rank: int = 1
    fail_marker: str = ""  # file created before dying; its existence disarms the hook

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> LoopOptions:
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown loop option(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


class CheckpointSink(Protocol):
    def latest(self) -> Checkpoint | None:
        """The checkpoint to resume this stage from, if any."""

    def release(self) -> None:
        """Called once what :meth:`latest` returned has been loaded (or not used)."""

    def save(self, loop: TrainLoop, metrics: dict[str, Any]) -> None:
        """Persist the loop's named states (every rank calls it) and publish ``metrics``."""


class LocalSink:
    """One process: ``<dir>/last`` (full state) and ``<dir>/best`` (best weights), atomically."""

    def __init__(self, directory: str | Path, resume: bool = True):
        self.directory = Path(directory)
        self.resume = resume

    def latest(self) -> Checkpoint | None:
        last = self.directory / "last"
        if not self.resume or not last.exists():
            return None
        return open_checkpoint(last)

    def release(self) -> None:
        """The checkpoint from :meth:`latest` has been read (nothing to clean up here)."""

    def save(self, loop: TrainLoop, metrics: dict[str, Any]) -> None:
        write_atomically(self.directory / "last", loop.write_parts)
        if loop.best_state is not None and loop.state.best_step == loop.state.step:
            save_model_checkpoint(self.directory / "best", loop.best_state, loop.model_cfg,
                                  {"step": loop.state.step, "stage": loop.stage, "history": loop.state.history})


# ---------------------------------------------------------------------------------------------


def open_tracker(job: JobConfig, rank: int, run_name: str = ""):
    """Rank 0's experiment tracker (TensorBoard under ``<train.checkpoint_dir>/tensorboard`` unless
    ``tracking.dir`` says otherwise; MLflow when configured); a no-op on other ranks."""
    from stackrec_dist.train.tracking import RunTracker

    cfg = job.tracking.with_default_dir(str(Path(job.train.checkpoint_dir).resolve())
                                        if "://" not in job.train.checkpoint_dir else job.train.checkpoint_dir)
    return RunTracker.create(cfg, run_name=(run_name or job.name).replace("/", "-"), enabled=rank == 0)


def _progress_factory() -> Callable[..., Any]:
    from tqdm.auto import tqdm

    return tqdm


class TrainLoop:
    """Trains one stage of one model on this rank's share of the data."""

    def __init__(self, job: JobConfig, world: World, init_state: dict[str, torch.Tensor] | None = None,
                 options: LoopOptions | None = None, sink: CheckpointSink | None = None, stage: str = "",
                 run_id: str = "", progress: Callable[..., Any] | None = None, tracker: Any = None,
                 step_offset: int = 0, schedule_slot: Any = None):
        from stackrec_dist.models import build_model
        from stackrec_dist.train.engine import build_engine
        from stackrec_dist.train.optim import build_optimizer
        from stackrec_dist.train.schedule import lr_lambda, step_budget
        from stackrec_dist.train.step import RecommenderLoss

        self.init_start_t = time.time()  # wall-clock marks of the stage, for the growth-pause breakdown
        self.job, self.world = job, world
        self.options = options or LoopOptions()
        self.sink = sink if sink is not None else LocalSink(job.train.checkpoint_dir, resume=False)
        self.stage, self.run_id = stage or job.name, run_id
        self.progress = progress or _progress_factory()
        self.tracker = tracker
        self.step_offset = step_offset  # steps of earlier stages: one step axis for the whole plan
        torch.manual_seed(job.train.seed)
        if job.train.threads > 0 and not world.choice.use_gpu:
            torch.set_num_threads(job.train.threads)

        model_cfg = job.model
        if model_cfg.num_items == 0:
            from stackrec_dist.train.data_info import dataset_num_items

            model_cfg = dataclasses.replace(model_cfg, num_items=dataset_num_items(job.data))
        self.model_cfg = model_cfg
        model = build_model(model_cfg)  # same seed on every rank: identical initial weights
        if init_state is not None:
            try:
                model.load_state_dict(init_state)
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0]
                raise CheckpointError(f"initial weights do not fit the model of stage {self.stage}: {first}") from None
        if world.ctx is None:
            model = model.to(world.device)
        data_for_proposal = None if self.options.data_source == "synthetic" else job.data
        objective = RecommenderLoss.for_data(model, job.loss, data_for_proposal)
        optimizer = build_optimizer(model, job.optim)
        self.train_loader = self._build_loader()
        if self.options.data_source == "synthetic":
            self.steps_per_epoch = self.options.synthetic_steps_per_epoch
        else:
            from stackrec_dist.train.data_info import steps_per_epoch

            self.steps_per_epoch = steps_per_epoch(job.data, job.data.train_split)
        self.total_steps = step_budget(job.train, lambda: self.steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job.optim, self.total_steps, schedule_slot))
        self.engine = build_engine(objective, optimizer, scheduler, job, world.ctx, world.choice)
        if not math.isfinite(self.engine.lr()):
            raise TrainingError(f"optim.lr gives a non-finite learning rate ({self.engine.lr()})")
        self.model = self.engine.model
        self.state = TrainState()
        self.best_state: dict[str, torch.Tensor] | None = None
        self._iter = None
        self.exhausted = False
        self.first_step_start_t = 0.0  # wall-clock (time.time) of this stage's first optimizer step
        self.last_step_end_t = 0.0
        self.fit_end_t = 0.0
        self.consumed_path: Path | None = None
        if self.options.consumed_log_dir:
            Path(self.options.consumed_log_dir).mkdir(parents=True, exist_ok=True)
            self.consumed_path = Path(self.options.consumed_log_dir) / f"consumed-rank{world.rank}.jsonl"
        self.built_t = time.time()

    # -- data ---------------------------------------------------------------------------------

    def _build_loader(self):
        job, world = self.job, self.world
        if self.options.data_source == "synthetic":
            from stackrec_dist.train.batches import SyntheticBatches

            return SyntheticBatches(self.model_cfg.num_items, job.data.max_len, job.data.batch_size,
                                    self.options.synthetic_steps_per_epoch, job.data.seed, world.rank,
                                    world.world_size)
        from stackrec_dist.data.loader import build_train_loader

        return build_train_loader(job.data, job.data.train_split, rank=world.rank, world_size=world.world_size)

    def _eval_batches(self, split: str):
        from stackrec_dist.data.eval_stream import iter_eval_batches

        return iter_eval_batches(self.job.data, split, self.job.eval.batch_size,
                                 rank=self.world.rank, world_size=self.world.world_size)

    def _next_batch(self) -> dict[str, torch.Tensor] | None:
        """This rank's next batch of the epoch, or None once its share is exhausted."""
        if self.exhausted:
            return None
        if self._iter is None:
            self._iter = iter(self.train_loader)
        try:
            return next(self._iter)
        except StopIteration:
            self.exhausted, self._iter = True, None
            return None

    # -- weights ------------------------------------------------------------------------------

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """CPU copy of the full weights on every rank (a collective under ZeRO-3)."""
        return self.engine.full_model_state()

    # -- checkpoints --------------------------------------------------------------------------

    def write_parts(self, directory: Path) -> None:
        """Every rank writes its parts of one checkpoint into ``directory`` (see train/checkpoint.py)."""
        engine_meta = self.engine.save(directory, self.world.rank)
        cursor = {"loader": self.train_loader.state_dict(), "exhausted": self.exhausted}
        (directory / CURSOR_FILE.format(rank=self.world.rank)).write_text(json.dumps(cursor))
        if self.world.is_main:
            write_train_state(directory, {
                **self.state.state_dict(), "stage": self.stage, "run_id": self.run_id,
                "device": self.world.choice.kind,
                "model_config": config_to_dict(self.model_cfg), "engine": engine_meta,
            })
            if self.best_state is not None:
                torch.save(self.best_state, directory / BEST_MODEL_FILE)

    def belongs_here(self, checkpoint: Checkpoint) -> bool:
        """A checkpoint resumes this loop only if it was written by this stage of this plan run."""
        ts = checkpoint.train_state
        return ts.get("stage", self.stage) == self.stage and ts.get("run_id", self.run_id) == self.run_id

    def load(self, checkpoint: Checkpoint) -> None:
        """Resume every named state: engine (model, optimizer, schedule), counters, cursor, best weights."""
        from stackrec_dist.train.checkpoint import check_catalogue

        check_catalogue(checkpoint, self.model_cfg.num_items, self.job.data.path)
        self.engine.load(checkpoint.path, checkpoint.engine)
        self.state.load_state_dict(checkpoint.train_state)
        cursor = checkpoint.cursor(self.world.rank)
        if cursor is None:
            raise CheckpointError(f"{checkpoint.source} has no data cursor of rank {self.world.rank}")
        try:
            self.train_loader.load_state_dict(cursor["loader"])
        except ValueError as err:  # another dataset, split, seed or window layout (data.window_stride)
            raise CheckpointError(f"{checkpoint.source}: {err}") from None
        # A rank that had finished its share of the epoch waits (all-pad steps) for the others.
        self.exhausted, self._iter = bool(cursor["exhausted"]), None
        self.best_state = checkpoint.best_model_state() if self.world.is_main else None
        if self.consumed_path is not None and self.consumed_path.exists():
            # Forget windows of steps after the checkpoint: they are trained again.
            lines = self.consumed_path.read_text().splitlines()
            kept = [ln for ln in lines if json.loads(ln)["step"] <= self.state.step]
            self.consumed_path.write_text("".join(ln + "\n" for ln in kept))

    # -- one step -----------------------------------------------------------------------------

    def _micro_batches(self, batch: dict[str, torch.Tensor] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly ``accum`` micro-batches on every rank; an empty share becomes one all-pad row."""
        device, accum = self.world.device, self.engine.accum
        pad = torch.zeros((1, self.job.data.max_len), dtype=torch.int64, device=device)
        if batch is None:
            return [(pad, pad)] * accum
        inputs = batch["inputs"].to(device, non_blocking=True)
        targets = batch["targets"].to(device, non_blocking=True)
        out = []
        for x, y in zip(inputs.tensor_split(accum), targets.tensor_split(accum)):
            out.append((x, y) if x.shape[0] else (pad, pad))
        return out

    def train_step(self, batch: dict[str, torch.Tensor] | None) -> float | None:
        """One optimizer step on this rank's share of the global batch -> global mean loss.

        ``batch`` is None when this rank's epoch is exhausted; returns None (and does not step)
        when every rank's is. One small all-reduce agrees on both and on the global token count.
        """
        device, accum = self.world.device, self.engine.accum
        micro = self._micro_batches(batch)
        counts = torch.stack([(y != 0).sum() for _, y in micro]).to(torch.float64)
        if batch is None:
            counts.zero_()
        agreed = D.all_reduce_sum(
            torch.stack([torch.tensor(float(batch is not None), dtype=torch.float64, device=device),
                         counts.sum().to(device)]), device=device)
        if agreed[0].item() == 0:
            return None
        total = max(agreed[1].item(), 1.0)
        scale = self.world.world_size * accum / total
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.engine.train()
        for (x, y), n in zip(micro, counts):
            loss = self.engine(x, y)
            self.engine.backward(loss * (n.item() * scale))
            self.engine.step()
            loss_sum += loss.detach().to(torch.float64) * n
        return D.all_reduce_sum(loss_sum.reshape(1), device=device).item() / total

    # -- validation ---------------------------------------------------------------------------

    def validate(self, split: str = "valid", model: torch.nn.Module | None = None) -> dict[str, float]:
        """Full-ranking metrics of ``split``: each rank ranks its share, metric sums all-reduced."""
        from stackrec_dist.eval.evaluate import evaluate_accumulator
        from stackrec_dist.eval.metrics import MetricAccumulator

        eval_cfg = self.job.eval
        model = model if model is not None else self.engine.eval_model()
        acc = evaluate_accumulator(model, self._eval_batches(split), eval_cfg.ks, self.world.device,
                                   max_batches=eval_cfg.max_batches)
        total = D.all_reduce_sum(acc.state(), device=self.world.device)
        merged = MetricAccumulator.from_state(total.cpu(), eval_cfg.ks)
        if merged.count == 0:
            raise DataError(f"split {split!r} has no row to evaluate", path=self.job.data.path)
        return {**merged.compute(), "count": merged.count}

    def best_model(self) -> torch.nn.Module:
        """A local full model holding the best validation weights (the final ones when none)."""
        from stackrec_dist.models import build_model

        state = self.best_state if self.best_state is not None else self.full_model_state()
        model = build_model(self.model_cfg).to(self.world.device)
        model.load_state_dict(state)
        return model

    # -- the loop -----------------------------------------------------------------------------

    def should_stop(self) -> bool:
        cfg = self.job.train
        patience = cfg.patience if self.options.evaluate else 0
        if patience > 0 and self.state.bad_validations >= patience:
            return True
        if cfg.max_steps == 0 and float(cfg.epochs).is_integer():
            # Whole epochs: stop when every rank has read its share, however uneven the shares.
            return self.state.epoch >= int(cfg.epochs)
        return self.state.step >= self.total_steps

    def _validation_point(self, running_loss: float, steps_since: int, bar: Any) -> None:
        metrics: dict[str, Any] = {"train/loss": running_loss / max(steps_since, 1), "lr": self.engine.lr(),
                                   "elapsed_s": self.state.elapsed_s, "depth": self.model_cfg.num_blocks}
        if self.step_times:
            median = sorted(self.step_times)[len(self.step_times) // 2]  # robust to warm-up
            metrics["train/step_time_s"] = median
            metrics["train/sequences_per_s"] = self.job.data.batch_size / median
            self.step_times = []
        line = f"[{self.stage} | {self.model_cfg.num_blocks} blocks] step {self.state.step}/{self.total_steps}"
        line += f" loss {metrics['train/loss']:.4f}"
        if self.options.evaluate:
            valid = self.validate()
            new_best = self.state.record_validation(valid)
            if new_best:
                best = self.full_model_state()  # every rank joins the gather; rank 0 keeps it
                self.best_state = best if self.world.is_main else None
            metrics.update({f"valid/{k}": v for k, v in valid.items()})
            line += f"  valid ndcg@5 {valid['ndcg@5']:.4f} hr@5 {valid['hr@5']:.4f}" + ("  (best)" if new_best else "")
            if bar is not None:
                bar.postfix(f"loss {metrics['train/loss']:.4f} ndcg@5 {valid['ndcg@5']:.4f}")
        metrics.update({"step": self.state.step, "epoch": self.state.epoch,
                        "best_valid_ndcg@5": self.state.best_metric, "best_step": self.state.best_step})
        self.state.last_report_step = self.state.step
        if self.world.is_main:
            _write_line(bar, line)
            if self.tracker is not None:
                self.tracker.log_scalars(self.step_offset + self.state.step,
                                         {k: v for k, v in metrics.items() if k not in ("step", "epoch")})
                self.tracker.flush()
        if self.options.checkpoint:
            self.sink.save(self, metrics)

    def fit(self) -> dict[str, Any]:
        """Train until the stage's stop rule; returns a summary (steps, timings, best metric, history)."""
        checkpoint = self.sink.latest() if self.options.checkpoint else None
        try:
            if checkpoint is not None and self.belongs_here(checkpoint):
                self.load(checkpoint)
            elif self.consumed_path is not None and self.consumed_path.exists():
                self.consumed_path.unlink()  # a (re)start from scratch consumes everything again
        finally:
            self.sink.release()
        eval_every = self.job.train.eval_every or self.steps_per_epoch
        start = time.perf_counter() - self.state.elapsed_s
        running, since, steps_this_epoch = 0.0, 0, 0
        self.step_times: list[float] = []
        bar = None
        if self.tracker is not None and self.state.step == 0:
            self.tracker.log_stage(self.step_offset, self.stage, self.model_cfg.num_blocks)
        if self.world.is_main and self.job.train.progress and (self.world.ctx is not None or sys.stdout.isatty()):
            bar = _Bar(self.progress, self.total_steps, min(self.state.step, self.total_steps),
                       f"{self.stage} ({self.model_cfg.num_blocks} blocks)")
        try:
            while not self.state.finished and not self.should_stop():
                batch = self._next_batch()
                t0 = time.perf_counter()
                wall0 = time.time()
                loss = self.train_step(batch)
                if loss is None:
                    # Every rank has read its share of the epoch; the loaders start the next one.
                    if steps_this_epoch == 0 and self.state.step == 0:
                        raise TrainingError(_empty_epoch_message(self.job))
                    self._report_quarantine()
                    self.state.epoch += 1
                    self.exhausted, steps_this_epoch = False, 0
                    continue
                if self.first_step_start_t == 0.0:
                    self.first_step_start_t = wall0
                self.last_step_end_t = time.time()
                self.state.step += 1
                steps_this_epoch += 1
                if batch is not None:
                    self._log_consumed(batch, loss)
                self._maybe_fail()
                if not math.isfinite(loss):
                    raise TrainingError(f"training loss became {loss} at step {self.state.step} of stage "
                                        f"{self.stage}: lower optim.lr or set optim.grad_clip")
                self.step_times.append(time.perf_counter() - t0)
                running, since = running + loss, since + 1
                self.state.elapsed_s = time.perf_counter() - start
                if bar is not None:
                    bar.update(1)
                    if self.state.step % self.job.train.log_every == 0:
                        bar.postfix(f"loss {running / since:.4f}")
                if self.state.step % eval_every == 0:
                    self._validation_point(running, since, bar)
                    running, since = 0.0, 0
            self.state.elapsed_s = time.perf_counter() - start
            self.state.finished = True
            if self.state.last_report_step != self.state.step:
                self._validation_point(running, since, bar)
        finally:
            if bar is not None:
                bar.close()
        self.fit_end_t = time.time()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {"steps": self.state.step, "epochs": self.state.epoch, "train_s": self.state.elapsed_s,
                "best_valid_ndcg@5": self.state.best_metric, "best_step": self.state.best_step,
                "init_start_t": self.init_start_t, "built_t": self.built_t,
                "first_step_start_t": self.first_step_start_t, "last_step_end_t": self.last_step_end_t,
                "fit_end_t": self.fit_end_t,
                "history": list(self.state.history)}

    # -- diagnostics, test hooks --------------------------------------------------------------

    def _report_quarantine(self) -> None:
        stats = getattr(self.train_loader, "stats", {}) or {}
        bad = int(stats.get("bad_rows", 0))
        if bad and self.world.is_main:
            files = stats.get("quarantine_files", [])
            where = f" written to {files[0]}" + (f" and {len(files) - 1} more" if len(files) > 1 else "") if files else ""
            log.warning("epoch %d of %s: %d bad row(s) set aside (quarantine)%s", self.state.epoch,
                        self.job.data.path, bad, where)

    def _log_consumed(self, batch: dict[str, torch.Tensor], loss: float) -> None:
        if self.consumed_path is None:
            return
        from stackrec_dist.train.batches import window_fingerprints

        record = {"step": self.state.step, "epoch": self.state.epoch, "loss": loss,
                  "windows": window_fingerprints(batch)}
        with open(self.consumed_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _maybe_fail(self) -> None:
        o = self.options
        if o.fail_at_step and self.state.step == o.fail_at_step and self.world.rank == o.fail_rank:
            marker = Path(o.fail_marker) if o.fail_marker else None
            if marker is None or not marker.exists():
                if marker is not None:
                    marker.write_text(f"rank {self.world.rank} died after step {self.state.step}\n")
                os._exit(1)  # a hard crash: no cleanup, no exception for Ray to see

    def close(self) -> None:
        close = getattr(self.train_loader, "close", None)
        if close is not None:
            close()
        self._iter = None


class _Bar:
    """One progress bar per stage over tqdm or Ray's ``tqdm_ray`` (which renders workers' bars on
    the driver but knows only desc/total/update): stage, depth, step/total, loss, NDCG@5, ETA."""

    def __init__(self, factory: Callable[..., Any], total: int, initial: int, desc: str):
        self.desc = desc
        self.bar = factory(total=total, desc=desc, unit="step")
        if initial:
            self.bar.update(initial)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def postfix(self, text: str) -> None:
        self.bar.set_description(f"{self.desc} {text}")

    def write(self, line: str) -> None:
        write = getattr(self.bar, "write", None)
        write(line) if write is not None else print(line, flush=True)

    def close(self) -> None:
        self.bar.close()


def _write_line(bar: _Bar | None, line: str) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def _empty_epoch_message(job: JobConfig) -> str:
    return (f"an epoch of split {job.data.train_split!r} of {job.data.path} yielded no training window on any "
            f"rank: every sequence is too short to give a (history, next item) pair after filtering. "
            f"Prepare the data with a larger prepare.min_sequence_length or fewer held-out items, "
            f"or train on another split")
