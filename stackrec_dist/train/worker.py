"""The per-worker loop run by every Ray Train worker: DeepSpeed engine, sharded data, resume.

``train_loop_per_worker(config)`` receives Ray's ``train_loop_config``:

    {"job": <JobConfig as a dict>, "options": <WorkerOptions as a dict>}

and rebuilds the typed ``JobConfig`` at once (the only place a raw dict arrives). ``options``
carries run-time switches that are not part of a job's configuration (where consumed-window
logs go, a test-only crash hook, the synthetic data source of benchmarks and equivalence tests).

One optimizer step (global batch of ``data.batch_size`` windows, ``b = batch_size / world`` per
rank, split into ``gradient_accumulation_steps`` micro-batches):

* every rank computes the mean loss over its real (non-pad) targets; the per-rank loss is
  re-weighted by ``n_rank * world * accum / N_global`` (token counts all-reduced first), so that
  DeepSpeed's gradient averaging over ranks and micro-batches gives exactly the gradient of the
  global token-mean loss, which is what the single-process trainer computes;
* ``engine.backward`` / ``engine.step`` (clipping, AdamW, LR schedule inside DeepSpeed).

Every ``train.eval_every`` steps (0 = once per epoch) the ranks evaluate their strided share of the
validation rows, all-reduce the metric sums, and then every rank saves its DeepSpeed shard, its
data cursor (``cursor-rank{r}.json``) and rank 0 the train state and best weights into a local
directory that is passed to ``ray.train.report``; Ray merges the ranks' directories into one
checkpoint in storage. On restart ``ray.train.get_checkpoint()`` gives that merged directory back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stackrec_dist.config import EvalConfig, JobConfig, config_from_dict, config_to_dict
from stackrec_dist.train import distributed as D
from stackrec_dist.train.deepspeed_config import build_deepspeed_config, client_clip_norm
from stackrec_dist.train.trainer import TrainState

log = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
BEST_MODEL_FILE = "best-model.pt"
MODEL_CONFIG_FILE = "model_config.json"
CURSOR_FILE = "cursor-rank{rank}.json"


@dataclass
class WorkerOptions:
    """Run-time switches of the worker loop (not part of the job's configuration)."""

    data_source: str = "stream"  # "stream" (the Parquet reader) or "synthetic" (in-memory batches)
    synthetic_steps_per_epoch: int = 20  # data_source=synthetic: global batches per epoch
    evaluate: bool = True  # validate (and early-stop) at each checkpoint
    # Save + report a checkpoint at each validation point. False: metrics-only reports, which
    # Ray Train V2 does not keep: Result.metrics is the metrics of the latest *checkpoint*.
    checkpoint: bool = True
    # Block after each checkpoint report until Ray's controller has registered it (it polls
    # workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S = 2 s): a worker dying inside that window
    # would otherwise lose the checkpoint, and the run would resume from an older one.
    wait_for_commit: bool = True
    consumed_log_dir: str = ""  # per-rank JSONL of the windows consumed at each step (tests)
    fail_at_step: int = 0  # test hook: rank `fail_rank` dies right after this step, once
    fail_rank: int = 1
    fail_marker: str = ""  # file created before dying; its existence disarms the hook

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> WorkerOptions:
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown worker option(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


@dataclass
class WorkerTrainState(TrainState):
    """The single-process trainer's counters plus the DeepSpeed checkpoint tag and report step."""

    tag: str = ""
    last_report_step: int = -1


# ---------------------------------------------------------------------------------------------
# Data sources


class SyntheticBatches:
    """Deterministic in-memory training windows, for benchmarks and the equivalence tests.

    Global batch ``t`` of epoch ``e`` is a fixed function of (seed, e, t): ``batch_size`` windows
    of length L with random left padding. Rank r gets rows ``r::world`` of it, so the union of
    the ranks' batches at a step is exactly the single-process batch. Same loader protocol as
    the Parquet reader: iteration resumes at the cursor; ``state_dict``/``load_state_dict``.
    """

    def __init__(self, num_items: int, max_len: int, batch_size: int, steps_per_epoch: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_items, self.max_len, self.batch_size = num_items, max_len, batch_size
        self.steps_per_epoch, self.seed, self.rank, self.world_size = steps_per_epoch, seed, rank, world_size
        self.epoch, self.position = 0, 0

    def global_batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 10_007 + index)
        seq = torch.randint(1, self.num_items, (self.batch_size, self.max_len + 1), generator=g)
        lengths = torch.randint(2, self.max_len + 2, (self.batch_size,), generator=g)
        keep = torch.arange(self.max_len + 1)[None, :] >= (self.max_len + 1 - lengths)[:, None]
        seq = seq * keep
        return {"inputs": seq[:, :-1].contiguous(), "targets": torch.where(seq[:, :-1] > 0, seq[:, 1:], 0)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.position < self.steps_per_epoch:
            batch = self.global_batch(self.epoch, self.position)
            self.position += 1
            yield {k: v[self.rank::self.world_size] for k, v in batch.items()}
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def window_fingerprints(batch: dict[str, torch.Tensor]) -> list[str]:
    """A short content hash per window (inputs + targets), to prove exactly-once consumption."""
    inputs = batch["inputs"].to(torch.int64).cpu()
    targets = batch["targets"].to(torch.int64).cpu()
    return [
        hashlib.blake2b(inputs[i].numpy().tobytes() + targets[i].numpy().tobytes(), digest_size=8).hexdigest()
        for i in range(inputs.shape[0])
    ]


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_distributed(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], eval_cfg: EvalConfig,
                         device: torch.device) -> dict[str, float]:
    """Each rank ranks its own share of rows; metric *sums* are all-reduced, so the result is the
    single-process evaluation of all rows (counts exact, reciprocal sums up to float64 order).

    ``model`` must hold full (unpartitioned) weights: no collective runs inside the loop, so ranks
    may have different numbers of rows. ``eval.max_batches`` then limits batches *per rank*.
    """
    from stackrec_dist.eval.evaluate import evaluate_accumulator
    from stackrec_dist.eval.metrics import MetricAccumulator

    acc = evaluate_accumulator(model, batches, eval_cfg.ks, device, max_batches=eval_cfg.max_batches)
    total = D.all_reduce_sum(acc.state(), device=device)
    merged = MetricAccumulator.from_state(total.cpu(), eval_cfg.ks)
    return {**merged.compute(), "count": merged.count}


# ---------------------------------------------------------------------------------------------
# The loop


class WorkerLoop:
    def __init__(self, job: JobConfig, options: WorkerOptions, init_state: dict[str, torch.Tensor] | None = None):
        self.job, self.options = job, options
        dist_cfg = job.distributed
        self.ctx = D.init_worker(dist_cfg)
        torch.manual_seed(job.train.seed)
        if job.train.threads > 0 and not dist_cfg.use_gpu:
            torch.set_num_threads(job.train.threads)

        from stackrec_dist.models import build_model
        from stackrec_dist.train.optim import build_optimizer
        from stackrec_dist.train.schedule import lr_lambda
        from stackrec_dist.train.step import RecommenderLoss

        model_cfg = job.model
        if model_cfg.num_items == 0:
            from stackrec_dist.train.data_info import dataset_num_items

            model_cfg = dataclasses.replace(model_cfg, num_items=dataset_num_items(job.data))
        self.model_cfg = model_cfg
        self.zero3 = dist_cfg.zero_stage == 3
        model = build_model(model_cfg)  # same seed on every rank: identical initial weights
        if init_state is not None:
            # Initial weights (e.g. a freshly grown model), loaded strictly before DeepSpeed
            # partitions the model; a Ray checkpoint to resume from overrides them in fit().
            model.load_state_dict(init_state)
        objective = RecommenderLoss.for_data(model, job.loss, None if options.data_source == "synthetic" else job.data)
        if self.zero3:
            # The loss reads head.weight/bias directly (not via head.forward).
            D.register_external_parameters(objective, [model.head.weight, model.head.bias], dist_cfg.use_gpu)
        optimizer = build_optimizer(model, job.optim)

        self.train_loader = self._build_loader()
        if options.data_source == "synthetic":
            self.steps_per_epoch = options.synthetic_steps_per_epoch
        else:
            from stackrec_dist.train.data_info import steps_per_epoch

            self.steps_per_epoch = steps_per_epoch(job.data, job.data.train_split)
        self.total_steps = job.train.max_steps or max(1, math.ceil(job.train.epochs * self.steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job.optim, self.total_steps))
        ds_config = build_deepspeed_config(dist_cfg, job.optim, job.data, dist_cfg.use_gpu, self.ctx.world_size)
        self.accum = dist_cfg.gradient_accumulation_steps
        self.client_clip = client_clip_norm(dist_cfg, job.optim)
        self.engine, self.scheduler = D.deepspeed_initialize(objective, optimizer, scheduler, ds_config,
                                                             dist_cfg.use_gpu)
        self.model = self.engine.module.model
        self.state = WorkerTrainState()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.consumed_path: Path | None = None
        if options.consumed_log_dir:
            Path(options.consumed_log_dir).mkdir(parents=True, exist_ok=True)
            self.consumed_path = Path(options.consumed_log_dir) / f"consumed-rank{self.ctx.rank}.jsonl"

    # -- data ---------------------------------------------------------------------------------

    def _build_loader(self):
        job, ctx = self.job, self.ctx
        if self.options.data_source == "synthetic":
            return SyntheticBatches(self.model_cfg.num_items, job.data.max_len, job.data.batch_size,
                                    self.options.synthetic_steps_per_epoch, job.data.seed, ctx.rank, ctx.world_size)
        from stackrec_dist.data.stream import build_train_loader

        return build_train_loader(job.data, job.data.train_split, rank=ctx.rank, world_size=ctx.world_size)

    def _eval_batches(self, split: str):
        from stackrec_dist.data.stream import iter_eval_batches

        return iter_eval_batches(self.job.data, split, self.job.eval.batch_size,
                                 rank=self.ctx.rank, world_size=self.ctx.world_size)

    # -- weights ------------------------------------------------------------------------------

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """CPU copy of the full model weights on every rank (a collective under ZeRO-3)."""
        params = list(self.model.parameters())
        with D.gathered_parameters(params, self.zero3, self.job.distributed.use_gpu):
            return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def eval_model(self) -> torch.nn.Module:
        if not self.zero3:
            return self.model
        # Partitioned weights: evaluate a local full copy, so that ranks with different numbers
        # of rows never wait on each other's parameter all-gathers.
        from stackrec_dist.models import build_model

        local = build_model(self.model_cfg).to(self.ctx.device)
        local.load_state_dict(self.full_model_state())
        return local

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        tag = f"step{self.state.step:08d}"
        self.state.tag = tag
        self.engine.save_checkpoint(str(directory), tag=tag)
        rank = self.ctx.rank
        cursor = {"loader": self.train_loader.state_dict(), "exhausted": self.exhausted}
        (directory / CURSOR_FILE.format(rank=rank)).write_text(json.dumps(cursor))
        if rank == 0:
            train_state = {**self.state.state_dict(), "model_config": config_to_dict(self.model_cfg),
                           "world_size": self.ctx.world_size, "zero_stage": self.job.distributed.zero_stage}
            (directory / TRAIN_STATE_FILE).write_text(json.dumps(train_state))
            # For the growth coordinator (growth/model_checkpoint.py reads it next to the shards).
            (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config_to_dict(self.model_cfg)))
            if self.best_state is not None:
                torch.save(self.best_state, directory / BEST_MODEL_FILE)

    def load(self, directory: Path) -> None:
        state = json.loads((directory / TRAIN_STATE_FILE).read_text())
        if state.get("world_size") != self.ctx.world_size:
            raise RuntimeError(
                f"checkpoint was written by {state.get('world_size')} workers, this run has "
                f"{self.ctx.world_size}; consolidate it (stackrec_dist.train.zero_checkpoint) instead"
            )
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=state["tag"])
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {state['tag']} in {directory}")
        self.state.load_state_dict({k: v for k, v in state.items() if k in WorkerTrainState.__dataclass_fields__})
        cursor = json.loads((directory / CURSOR_FILE.format(rank=self.ctx.rank)).read_text())
        self.train_loader.load_state_dict(cursor["loader"])
        # A rank that had finished its share of the epoch waits (all-pad steps) for the others.
        self.exhausted, self._iter = bool(cursor["exhausted"]), None
        if (directory / BEST_MODEL_FILE).is_file():
            self.best_state = torch.load(directory / BEST_MODEL_FILE, map_location="cpu", weights_only=True)
        if self.consumed_path is not None and self.consumed_path.exists():
            # Forget windows of steps after the checkpoint: they are trained again.
            lines = self.consumed_path.read_text().splitlines()
            kept = [ln for ln in lines if json.loads(ln)["step"] <= self.state.step]
            self.consumed_path.write_text("".join(ln + "\n" for ln in kept))

    # -- one step -----------------------------------------------------------------------------

    def _micro_batches(self, batch: dict[str, torch.Tensor] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly ``accum`` micro-batches on every rank (DeepSpeed counts micro-steps); an empty
        share (no batch left on this rank, or a short last batch) becomes one all-pad row, which
        runs forward/backward (ZeRO-3 gathers are collectives) and contributes zero gradient."""
        device = self.ctx.device
        L = self.job.data.max_len
        pad = torch.zeros((1, L), dtype=torch.int64, device=device)
        if batch is None:
            return [(pad, pad)] * self.accum
        inputs = batch["inputs"].to(device, non_blocking=True)
        targets = batch["targets"].to(device, non_blocking=True)
        out = []
        for x, y in zip(inputs.tensor_split(self.accum), targets.tensor_split(self.accum)):
            out.append((x, y) if x.shape[0] else (pad, pad))
        return out

    def train_step(self, batch: dict[str, torch.Tensor] | None) -> float | None:
        """One optimizer step on this rank's share of the global batch -> global mean loss.

        ``batch`` is None when this rank's epoch is exhausted; returns None (and does not step)
        when every rank's is. One small all-reduce agrees on both and on the global token count.
        """
        device = self.ctx.device
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
        # DeepSpeed averages gradients over ranks and micro-steps; re-weighting each micro-loss
        # by its share of the global token count makes that the global token-mean gradient.
        scale = self.ctx.world_size * self.accum / total
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.engine.train()
        for (x, y), n in zip(micro, counts):
            loss = self.engine(x, y)
            self.engine.backward(loss * (n.item() * scale))
            if self.client_clip > 0 and self.engine.is_gradient_accumulation_boundary():
                torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), self.client_clip)
            self.engine.step()
            loss_sum += loss.detach().to(torch.float64) * n
        return D.all_reduce_sum(loss_sum.reshape(1), device=device).item() / total

    def _log_consumed(self, batch: dict[str, torch.Tensor], loss: float) -> None:
        if self.consumed_path is None:
            return
        record = {"step": self.state.step, "epoch": self.state.epoch, "loss": loss,
                  "windows": window_fingerprints(batch)}
        with open(self.consumed_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _maybe_fail(self) -> None:
        o = self.options
        if o.fail_at_step and self.state.step == o.fail_at_step and self.ctx.rank == o.fail_rank:
            marker = Path(o.fail_marker) if o.fail_marker else None
            if marker is None or not marker.exists():
                if marker is not None:
                    marker.write_text(f"rank {self.ctx.rank} died after step {self.state.step}\n")
                os._exit(1)  # a hard crash: no cleanup, no exception for Ray to see

    # -- validation, reporting ----------------------------------------------------------------

    def validate(self, split: str = "valid") -> dict[str, float]:
        return evaluate_distributed(self.eval_model(), self._eval_batches(split), self.job.eval, self.ctx.device)

    def _after_validation(self, metrics: dict[str, float]) -> None:
        if self.state.record_validation(metrics):
            best = self.full_model_state()  # every rank joins the gather; rank 0 keeps it
            self.best_state = best if self.ctx.rank == 0 else None

    def checkpoint_and_report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        self.state.last_report_step = self.state.step
        metrics = {**metrics, "step": self.state.step, "epoch": self.state.epoch,
                   "best_valid_ndcg@5": self.state.best_metric, "best_step": self.state.best_step}
        if not self.options.checkpoint:
            ray.train.report(metrics)
            return
        directory = Path(tempfile.mkdtemp(prefix=f"stackrec-ckpt-r{self.ctx.rank}-"))
        try:
            self.save(directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                             checkpoint_dir_name=f"checkpoint-{self.state.tag}")
            if self.options.wait_for_commit and hasattr(ray.train, "get_all_reported_checkpoints"):  # Train V2
                ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _should_stop(self) -> bool:
        cfg = self.job.train
        patience = cfg.patience if self.options.evaluate else 0
        if patience > 0 and self.state.bad_validations >= patience:
            return True
        if cfg.max_steps == 0 and float(cfg.epochs).is_integer():
            # Whole epochs: stop when every rank has read its share, however uneven the shares
            # (an epoch can take a few more steps than the schedule's estimate).
            return self.state.epoch >= int(cfg.epochs)
        return self.state.step >= self.total_steps

    def _validation_point(self, running_loss: float, steps_since: int) -> None:
        metrics: dict[str, Any] = {"train/loss": running_loss / max(steps_since, 1),
                                   "lr": float(self.scheduler.get_last_lr()[0]),
                                   "elapsed_s": self.state.elapsed_s, "torch_threads": torch.get_num_threads()}
        times = sorted(getattr(self, "step_times", []))
        if times:
            # Median wall time of an optimizer step since the last report (robust to warm-up).
            median = times[len(times) // 2]
            metrics["train/step_time_s"] = median
            metrics["train/sequences_per_s"] = self.job.data.batch_size / median
            self.step_times = []
        if self.options.evaluate:
            valid = self.validate()
            self._after_validation(valid)
            metrics.update({f"valid/{k}": v for k, v in valid.items()})
        self.checkpoint_and_report(metrics)

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

    def fit(self) -> None:
        import ray.train

        self._iter = None
        self.exhausted = False
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                self.load(Path(directory))
        elif self.consumed_path is not None and self.consumed_path.exists():
            self.consumed_path.unlink()  # a (re)start from scratch consumes everything again
        cfg = self.job.train
        eval_every = cfg.eval_every or self.steps_per_epoch
        start = time.perf_counter() - self.state.elapsed_s
        running, since = 0.0, 0
        self.step_times: list[float] = []
        while not self._should_stop():
            batch = self._next_batch()
            t0 = time.perf_counter()
            loss = self.train_step(batch)
            if loss is None:
                # Every rank has read its share of the epoch; the loaders start the next one.
                self.state.epoch += 1
                self.exhausted = False
                continue
            self.state.step += 1
            if batch is not None:
                self._log_consumed(batch, loss)
            self._maybe_fail()
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {self.state.step}")
            self.step_times.append(time.perf_counter() - t0)
            running, since = running + loss, since + 1
            self.state.elapsed_s = time.perf_counter() - start
            if self.state.step % eval_every == 0:
                self._validation_point(running, since)
                running, since = 0.0, 0
        self.state.elapsed_s = time.perf_counter() - start
        if self.state.last_report_step != self.state.step:
            self._validation_point(running, since)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config = {"job": JobConfig dict, "options": WorkerOptions dict,
    "init_state": ObjectRef of a model state dict or None}``."""
    job = config_from_dict(config["job"], source="<train_loop_config>")
    options = WorkerOptions.from_dict(config.get("options"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    init_state = config.get("init_state")
    if init_state is not None:
        import ray

        init_state = ray.get(init_state)  # an ObjectRef of the initial weights
    loop = WorkerLoop(job, options, init_state)
    try:
        loop.fit()
    finally:
        D.teardown(loop.ctx)
