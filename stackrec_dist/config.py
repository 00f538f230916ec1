"""Typed job configuration: one dataclass per component, loaded from YAML with dotted overrides.

Each component receives only its own sub-config (``ModelConfig`` for the model, ``DataConfig``
for the reader, ...). Raw dicts never travel past :func:`load_config`; every field is checked
there and an error names the dotted field (``optim.lr``) and the file it came from.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from stackrec_dist.errors import ConfigErrorBase


class ConfigError(ConfigErrorBase, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose docstring travels in its metadata (shown by ``stackrec config``)."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class ModelConfig:
    backbone: Literal["nextitnet", "sasrec"] = _doc("Residual block family.", default="nextitnet")
    num_items: int = _doc(
        "Output vocabulary size including the pad id 0. 0 = take it from the dataset manifest.",
        default=0,
    )
    dim: int = _doc("Embedding / channel width C.", default=64)
    num_blocks: int = _doc("Number of residual blocks (NextItNet-k: k blocks).", default=4)
    dilations: list[int] = _doc(
        "Per-block base dilation d, cycled over blocks; a block's convs use d and 2d.",
        default_factory=lambda: [1, 4],
    )
    block_dilations: list[int] = _doc(
        "Explicit per-block base dilations (length num_blocks); empty = cycle `dilations`. "
        "Grown models record theirs here (see growth.dilations).",
        default_factory=list,
    )
    kernel_size: int = _doc("Causal conv kernel width (the paper uses 3).", default=3)
    num_heads: int = _doc("Attention heads (sasrec only).", default=2)
    max_len: int = _doc("Longest input window; sasrec position table size.", default=50)
    dropout: float = _doc("Dropout inside residual branches (sasrec only).", default=0.0)
    layer_norm_eps: float = _doc("LayerNorm epsilon.", default=1e-5)
    alpha_init: float = _doc(
        "Initial value of each block's residual scale alpha (StackRec: 0; 1 = plain residual).",
        default=0.0,
    )
    use_alpha: bool = _doc(
        "Scale residual branches by a learnable alpha. False = plain x + F(x) (ablation).",
        default=True,
    )
    impl: Literal["auto", "torch", "triton"] = _doc(
        "Residual-block kernel: auto = Triton on CUDA, fastest PyTorch path on CPU.",
        default="auto",
    )

    def validate(self, prefix: str = "model") -> None:
        _check(self.dim > 0, f"{prefix}.dim", "must be > 0", self.dim)
        _check(self.num_blocks > 0, f"{prefix}.num_blocks", "must be > 0", self.num_blocks)
        _check(self.num_items >= 0, f"{prefix}.num_items", "must be >= 0", self.num_items)
        _check(
            len(self.dilations) > 0 and all(d > 0 for d in self.dilations),
            f"{prefix}.dilations",
            "must be a non-empty list of positive ints",
            self.dilations,
        )
        _check(
            not self.block_dilations
            or (len(self.block_dilations) == self.num_blocks and all(d > 0 for d in self.block_dilations)),
            f"{prefix}.block_dilations",
            f"must be empty or {self.num_blocks} positive ints (one per block)",
            self.block_dilations,
        )
        _check(self.kernel_size >= 1, f"{prefix}.kernel_size", "must be >= 1", self.kernel_size)
        _check(self.max_len > 1, f"{prefix}.max_len", "must be > 1", self.max_len)
        _check(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", "must be in [0, 1)", self.dropout)
        if self.backbone == "sasrec":
            _check(
                self.dim % self.num_heads == 0,
                f"{prefix}.num_heads",
                f"must divide model.dim={self.dim}",
                self.num_heads,
            )

    def block_dilation(self, index: int) -> int:
        """Base dilation d of block ``index`` (its convs use d and 2d)."""
        if self.block_dilations:
            return self.block_dilations[index]
        return self.dilations[index % len(self.dilations)]


@dataclass
class LossConfig:
    kind: Literal["full", "chunked", "sampled"] = _doc(
        "full softmax CE; chunked = same value without materialising B*L*V logits; "
        "sampled = sampled softmax with log-Q correction.",
        default="full",
    )
    chunk_size: int = _doc("Catalogue chunk for kind=chunked.", default=8192)
    num_samples: int = _doc("Negatives per batch for kind=sampled.", default=1024)
    sampler: Literal["uniform", "unigram"] = _doc(
        "Proposal distribution Q for kind=sampled (unigram = item frequency ** 0.75).",
        default="uniform",
    )

    def validate(self, prefix: str = "loss") -> None:
        _check(self.chunk_size > 0, f"{prefix}.chunk_size", "must be > 0", self.chunk_size)
        _check(self.num_samples > 0, f"{prefix}.num_samples", "must be > 0", self.num_samples)


@dataclass
class OptimConfig:
    lr: float = _doc("Peak learning rate (AdamW).", default=1e-3)
    weight_decay: float = _doc("AdamW decoupled weight decay.", default=0.0)
    betas: list[float] = _doc("AdamW betas.", default_factory=lambda: [0.9, 0.98])
    eps: float = _doc("AdamW epsilon.", default=1e-8)
    warmup_steps: int = _doc("Linear warm-up steps from 0 to lr.", default=100)
    decay: Literal["cosine", "linear", "constant"] = _doc("Shape after warm-up.", default="cosine")
    min_lr_ratio: float = _doc("Floor of the decay as a fraction of lr.", default=0.1)
    grad_clip: float = _doc("Max global grad norm; 0 disables clipping.", default=1.0)
    schedule: Literal["stage", "plan"] = _doc(
        "Scope of warm-up and decay in a growth plan. stage: every train stage restarts them over its "
        "own budget (at its plan lr / warmup_steps). plan: one curve over the sum of the plan's train "
        "budgets (warm-up optim.warmup_steps); each train stage runs its slot of it, a grown stage "
        "continuing at the rate the curve has reached, ramped over its own plan warmup_steps (default 0) "
        "because its AdamW moments start fresh. Same thing without a plan.", default="stage")

    def validate(self, prefix: str = "optim") -> None:
        _check(self.lr > 0, f"{prefix}.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0", self.weight_decay)
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{prefix}.betas",
            "must be two numbers in [0, 1)",
            self.betas,
        )
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0", self.grad_clip)


@dataclass
class DataConfig:
    path: str = _doc(
        "Prepared dataset directory (file://, s3:// or memory:// URI or a local path).",
        default="runs/data/ml-100k",
    )
    max_len: int = _doc("Training window length L (inputs and targets).", default=50)
    train_split: str = _doc("Split to train on: train, or a CL time slice (slice-1, slice-2, ...).", default="train")
    batch_size: int = _doc("Sequences per optimizer step, over all workers.", default=256)
    shuffle_buffer: int = _doc("Bounded shuffle buffer (sequences) of the streaming reader.", default=4096)
    num_workers: int = _doc("DataLoader worker processes per rank.", default=0)
    pack: Literal["pad", "concat"] = _doc(
        "pad: one sequence per window, left-padded; concat: join short sequences into full windows.",
        default="pad",
    )
    window_stride: int = _doc(
        "Step S between training windows, 1 <= S <= max_len (0 = max_len: non-overlapping windows). "
        "Windows of L + 1 items are cut from the end every S transitions and only the last S "
        "positions of each are targets, so every transition is still a target once and has at "
        "least L - S + 1 items of history (or all it has, near a sequence's start). Costs L/S times "
        "the windows, steps and tokens per epoch at the same batch_size (S = L/2: twice; "
        "docs/data.md, Windows).",
        default=0,
    )
    seed: int = _doc("Shuffle seed.", default=0)
    storage_options: dict[str, Any] = _doc(
        "fsspec storage options (e.g. endpoint_url). Credentials come from the environment.",
        default_factory=dict,
    )
    quarantine: bool = _doc(
        "Write bad rows aside (and count them) instead of failing on the first one.", default=False
    )
    verify_checksums: bool = _doc(
        "Check each shard's footer sha256 against the manifest on its first read (one small ranged "
        "read) and every Parquet page's CRC32 as it is read (no extra I/O; docs/data.md). Sizes, "
        "footers and row counts are always checked.",
        default=True,
    )
    storage_retry_s: float = _doc(
        "Seconds a transient storage failure (connection refused/reset, timeout, 5xx) is retried "
        "before the run fails: long enough to ride out a server restart, short on a dead endpoint.",
        default=10.0,
    )

    @property
    def stride(self) -> int:
        """The step S between training windows: ``window_stride``, or ``max_len`` when it is 0."""
        return self.window_stride or self.max_len

    def validate(self, prefix: str = "data") -> None:
        _check(bool(self.path), f"{prefix}.path", "must be set", self.path)
        _check(self.storage_retry_s >= 0, f"{prefix}.storage_retry_s", "must be >= 0", self.storage_retry_s)
        _check(self.max_len > 1, f"{prefix}.max_len", "must be > 1", self.max_len)
        _check(0 <= self.window_stride <= self.max_len, f"{prefix}.window_stride",
               f"must be in [0, max_len={self.max_len}] (0 = max_len)", self.window_stride)
        _check(self.batch_size > 0, f"{prefix}.batch_size", "must be > 0", self.batch_size)
        _check(self.shuffle_buffer >= 1, f"{prefix}.shuffle_buffer", "must be >= 1", self.shuffle_buffer)
        _check(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0", self.num_workers)


@dataclass
class PrepareConfig:
    source: str = _doc(
        "Raw interactions: 'movielens-1m', 'movielens-100k', 'synthetic', or a CSV/Parquet URI "
        "with columns user, item, timestamp.",
        default="movielens-100k",
    )
    output: str = _doc("Where the prepared dataset goes.", default="runs/data/ml-100k")
    split: Literal["leave_last_out", "held_out"] = _doc(
        "leave_last_out: per user, 2nd-last item = valid target, last = test target; "
        "held_out: whole users' sequences split into train/valid/test, last item is the target.",
        default="leave_last_out",
    )
    held_out_fraction: float = _doc("Fraction of users for valid and test each (held_out).", default=0.1)
    min_sequence_length: int = _doc(
        "Drop users with fewer interactions (counted, reported). With user_core/item_core on, a "
        "user needs max(min_sequence_length, user_core) interactions inside the k-core loop.",
        default=3,
    )
    time_slices: int = _doc("CL scenario: also write D1, D1+D2, ... cumulative slices by time.", default=0)
    num_shards: int = _doc("Output shards per split.", default=4)
    row_group_size: int = _doc("Sequences per Parquet row group.", default=4096)
    memory_limit_mb: int = _doc("Memory bound of the external partition/sort.", default=1024)
    synthetic_users: int = _doc("source=synthetic: number of users.", default=2000)
    synthetic_items: int = _doc("source=synthetic: number of items.", default=500)
    seed: int = _doc(
        "Seed for synthetic data, the held-out user split and the source/target user split.", default=0
    )
    quarantine: bool = _doc("Write bad raw rows to <output>/_quarantine/ (counted) instead of failing.", default=False)
    user_column: str = _doc("Raw log column holding the user id.", default="user")
    item_column: str = _doc("Raw log column holding the item id.", default="item")
    timestamp_column: str = _doc("Raw log column holding the timestamp.", default="timestamp")
    user_subset: Literal["all", "source", "target"] = _doc(
        "TF scenario: keep only one domain's users. Users are split by a seeded hash of the "
        "original user id (seed = prepare.seed): target = the lowest target_user_fraction of the "
        "hash range, source = the rest. The item id map (and num_items) is built over all users, "
        "so it is identical for all, source and target (docs/data.md, Transfer (TF) split).",
        default="all",
    )
    target_user_fraction: float = _doc(
        "Fraction of users in the target domain (user_subset source/target), in (0, 1).", default=0.2
    )
    min_rating: float | None = _doc(
        "Drop raw rows whose rating_column value is < min_rating before any other filter (counted "
        "as rows_below_min_rating, not as bad rows); null = no rating filter, the column is not read. "
        "A null or non-numeric rating is a bad row.",
        default=None,
    )
    rating_column: str = _doc("Raw log column holding the rating (read only when min_rating is set).", default="rating")
    user_core: int = _doc(
        "k-core on users (0 = off): repeatedly drop users with fewer than max(min_sequence_length, "
        "user_core) interactions and items with fewer than item_core, counting only surviving rows, "
        "until nothing changes (docs/data.md, Rating and k-core filters).",
        default=0,
    )
    item_core: int = _doc("k-core on items (0 = off): see user_core.", default=0)

    def validate(self, prefix: str = "prepare") -> None:
        _check(
            self.user_subset in ("all", "source", "target"),
            f"{prefix}.user_subset",
            "must be one of ['all', 'source', 'target']",
            self.user_subset,
        )
        _check(
            isinstance(self.target_user_fraction, (int, float)) and 0 < self.target_user_fraction < 1,
            f"{prefix}.target_user_fraction",
            "must be in (0, 1)",
            self.target_user_fraction,
        )
        _check(0 < self.held_out_fraction < 0.5, f"{prefix}.held_out_fraction", "must be in (0, 0.5)", self.held_out_fraction)
        _check(self.min_sequence_length >= 3, f"{prefix}.min_sequence_length", "must be >= 3", self.min_sequence_length)
        _check(self.num_shards >= 1, f"{prefix}.num_shards", "must be >= 1", self.num_shards)
        _check(self.row_group_size >= 1, f"{prefix}.row_group_size", "must be >= 1", self.row_group_size)
        _check(self.time_slices >= 0, f"{prefix}.time_slices", "must be >= 0", self.time_slices)
        _check(
            self.min_rating is None
            or (isinstance(self.min_rating, (int, float)) and not isinstance(self.min_rating, bool)
                and math.isfinite(self.min_rating)),
            f"{prefix}.min_rating",
            "must be a finite number or null",
            self.min_rating,
        )
        _check(
            self.min_rating is None
            or self.rating_column not in ("", self.user_column, self.item_column, self.timestamp_column),
            f"{prefix}.rating_column",
            "must be a column name other than user_column, item_column and timestamp_column",
            self.rating_column,
        )
        _check(self.user_core >= 0, f"{prefix}.user_core", "must be >= 0 (0 = off)", self.user_core)
        _check(self.item_core >= 0, f"{prefix}.item_core", "must be >= 0 (0 = off)", self.item_core)


@dataclass
class EvalConfig:
    ks: list[int] = _doc("Cut-offs N of MRR@N, HR@N, NDCG@N.", default_factory=lambda: [5, 10, 20])
    batch_size: int = _doc("Evaluation batch size.", default=512)
    max_batches: int = _doc("Evaluate at most this many batches (0 = all).", default=0)

    def validate(self, prefix: str = "eval") -> None:
        _check(len(self.ks) > 0 and all(k > 0 for k in self.ks), f"{prefix}.ks", "must be positive ints", self.ks)
        _check(self.batch_size > 0, f"{prefix}.batch_size", "must be > 0", self.batch_size)


@dataclass
class TrainConfig:
    max_steps: int = _doc("Optimizer steps of this stage (0 = use epochs).", default=0)
    epochs: float = _doc("Passes over the training split when max_steps = 0.", default=5.0)
    eval_every: int = _doc("Validate every N steps (0 = once per epoch).", default=0)
    patience: int = _doc("Early stopping: validations without NDCG@5 gain (0 = off).", default=3)
    log_every: int = _doc("Log the training loss every N steps.", default=50)
    checkpoint_dir: str = _doc("Where checkpoints of this run go.", default="runs/ckpt")
    device: str = _doc(
        "auto, cpu, cuda or cuda:N. auto: a GPU where there is one (one process: this machine's CUDA; "
        "Ray: one GPU per worker when the cluster offers GPUs), with nccl + bf16; else CPU, gloo, fp32.",
        default="auto",
    )
    seed: int = _doc("Seed of model init and dropout.", default=0)
    threads: int = _doc("torch intra-op threads on CPU (0 = torch default).", default=0)
    progress: bool = _doc("Show a progress bar.", default=True)

    def validate(self, prefix: str = "train") -> None:
        _check(self.max_steps >= 0, f"{prefix}.max_steps", "must be >= 0", self.max_steps)
        _check(self.epochs > 0 or self.max_steps > 0, f"{prefix}.epochs", "must be > 0 when max_steps = 0", self.epochs)
        _check(self.eval_every >= 0, f"{prefix}.eval_every", "must be >= 0", self.eval_every)
        _check(self.patience >= 0, f"{prefix}.patience", "must be >= 0", self.patience)
        _check(self.log_every > 0, f"{prefix}.log_every", "must be > 0", self.log_every)
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None, f"{prefix}.device",
               "must be auto, cpu, cuda or cuda:N", self.device)
        blocker = _file_in_path(self.checkpoint_dir)
        _check(blocker is None, f"{prefix}.checkpoint_dir",
               f"must be a directory, but {blocker} is a file", self.checkpoint_dir)


@dataclass
class GrowthConfig:
    method: Literal["adjacent", "cross"] = _doc(
        "adjacent: new blocks 2i, 2i+1 copy old i; cross: new blocks i, i+k copy old i.",
        default="adjacent",
    )
    alpha_policy: Literal["reset", "copy", "zero_new"] = _doc(
        "reset: every alpha 0 (authors' code); copy: both copies keep the old alpha; "
        "zero_new: old alphas kept, new blocks 0 (function-preserving).",
        default="zero_new",
    )
    dilations: Literal["follow", "position"] = _doc(
        "follow: a copied block keeps its source's dilation (its weights were learned for it; "
        "zero_new then preserves the function exactly); position: the standard cyclic pattern "
        "of the new depth, as the authors' code.",
        default="follow",
    )
    copy_layernorm: bool = _doc("Copy LayerNorm parameters (False: re-initialise, as the authors' code).", default=True)
    copy_head: bool = _doc("Copy the output softmax layer (False: re-initialise).", default=True)


@dataclass
class DistributedConfig:
    num_workers: int = _doc("Ray Train workers (processes); 0 = single-process trainer.", default=0)
    cpus_per_worker: float = _doc("Ray CPU resources per worker.", default=1.0)
    zero_stage: int = _doc("DeepSpeed ZeRO stage 0-3.", default=0)
    gradient_accumulation_steps: int = _doc("Micro-batches per optimizer step.", default=1)
    address: str = _doc("Ray address; '' = RAY_ADDRESS or an embedded local cluster.", default="")
    storage_path: str = _doc("Ray Train storage (local dir or s3://).", default="runs/ray")
    max_failures: int = _doc("Ray Train FailureConfig.max_failures.", default=0)
    object_store_mb: int = _doc("Object store size of an embedded local Ray.", default=256)

    def validate(self, prefix: str = "distributed") -> None:
        _check(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0", self.num_workers)
        _check(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", "must be 0, 1, 2 or 3", self.zero_stage)
        _check(
            self.gradient_accumulation_steps >= 1,
            f"{prefix}.gradient_accumulation_steps",
            "must be >= 1",
            self.gradient_accumulation_steps,
        )
        _check(self.cpus_per_worker > 0, f"{prefix}.cpus_per_worker", "must be > 0", self.cpus_per_worker)
        _check(self.max_failures >= -1, f"{prefix}.max_failures", "must be >= -1", self.max_failures)


@dataclass
class TrackingConfig:
    """Experiment tracking of rank 0 (stackrec_dist.train.tracking): TensorBoard, optionally MLflow."""

    tensorboard: bool = _doc("Write TensorBoard event files (scalars, stage names).", default=True)
    dir: str = _doc(
        "TensorBoard log dir, local or s3:// ('' = <train.checkpoint_dir>/tensorboard); one sub-dir per run.",
        default="",
    )
    storage_options: dict[str, Any] = _doc(
        "fsspec options for an s3:// dir (endpoint_url, key, secret); '' endpoint = $AWS_ENDPOINT_URL.",
        default_factory=dict,
    )
    mlflow_uri: str = _doc("MLflow tracking URI ('' = no MLflow); needs `pip install mlflow`.", default="")
    mlflow_experiment: str = _doc("MLflow experiment name.", default="stackrec")

    @property
    def enabled(self) -> bool:
        """Whether any tracking sink is configured."""
        return bool(self.tensorboard or self.mlflow_uri)

    def with_default_dir(self, checkpoint_dir: str) -> "TrackingConfig":
        """This config with ``dir`` resolved: ``<checkpoint_dir>/tensorboard`` when empty."""
        return self if self.dir else dataclasses.replace(self, dir=f"{str(checkpoint_dir).rstrip('/')}/tensorboard")


@dataclass
class StageConfig:
    """One stage of a growth plan (see stackrec_dist.scenarios)."""

    name: str = _doc("Stage name, unique within the plan.", default="")
    action: Literal["train", "grow", "new_head"] = _doc("What the stage does.", default="train")
    data_path: str = _doc("Dataset for a train stage ('' = data.path).", default="")
    train_split: str = _doc("Split a train stage trains on ('' = data.train_split), e.g. slice-1.", default="")
    max_steps: int = _doc("Steps of a train stage (0 = train.max_steps / epochs).", default=0)
    epochs: float = _doc("Epochs of a train stage when max_steps = 0 (0 = train.epochs).", default=0.0)
    num_workers: int = _doc("Ray workers of a train stage (-1 = distributed.num_workers).", default=-1)
    zero_stage: int = _doc("DeepSpeed ZeRO stage of a train stage (-1 = distributed.zero_stage).", default=-1)
    patience: int = _doc(
        "A train stage ends after this many validations without NDCG@5 gain, or at its step/epoch cap, "
        "whichever comes first (-1 = train.patience; 0 = fixed budget).", default=-1)
    eval_every: int = _doc("Validate a train stage every N steps (0 = train.eval_every).", default=0)
    lr: float = _doc(
        "Peak learning rate of a train stage (0 = optim.lr). With optim.schedule=stage every train stage "
        "restarts warm-up and decay, and a grown model usually wants a lower peak than training from "
        "scratch, or the jump back to the full rate undoes what the shallow stage learnt (docs/results.md).",
        default=0.0)
    warmup_steps: int = _doc(
        "Warm-up steps of a train stage (-1 = optim.warmup_steps). With optim.schedule=plan: the stage's "
        "own ramp onto the plan-wide curve (-1 = none; the first stage has the curve's warm-up).", default=-1)


@dataclass
class JobConfig:
    name: str = _doc("Job name; names run directories and reports.", default="stackrec")
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    plan: list[StageConfig] = _doc("Stages of a growth scenario (empty: a single train stage).", default_factory=list)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)
        _check(
            self.data.max_len <= self.model.max_len or self.model.backbone != "sasrec",
            "data.max_len",
            f"must be <= model.max_len={self.model.max_len} for sasrec",
            self.data.max_len,
        )
        names = [s.name for s in self.plan]
        _check(len(names) == len(set(names)), "plan", "stage names must be unique", names)
        for i, stage in enumerate(self.plan):
            _check(stage.lr >= 0, f"plan[{i}].lr", "must be >= 0 (0 = optim.lr)", stage.lr)
            _check(stage.warmup_steps >= -1, f"plan[{i}].warmup_steps", "must be >= 0 (-1 = optim.warmup_steps)",
                   stage.warmup_steps)


# ---------------------------------------------------------------------------------------------
# Loading


def _file_in_path(path: str) -> str | None:
    """The first existing non-directory on a local ``path`` (itself or a parent), if any."""
    if not path or "://" in path:
        return None
    p = Path(path)
    for candidate in (p, *p.parents):
        if candidate.exists():
            return None if candidate.is_dir() else str(candidate)
    return None


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} {rule} (got {value!r})")


def _finite(value: float, name: str) -> float:
    # nan passes every `x > 0` check as False and inf passes most as True: refuse both here.
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number (got {value!r})")
    return value


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming the field."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping (got {value!r})")
        return _build(tp, value, name)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)} (got {value!r})")
        return value
    if origin in (list, typing.List):
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list (got {value!r})")
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping (got {value!r})")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name} has the wrong type (got {value!r})")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer (got {value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), name)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string.
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None:
                return _finite(number, name)
        raise ConfigError(f"{name} must be a number (got {value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string (got {value!r})")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown field {where}{unknown[0]} (known fields of {prefix or 'the job'}: {sorted(known)})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a mapping")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", c) with c parsed as YAML (so 3 is an int, [1,4] a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty field name")
    return key, yaml.safe_load(value) if value.strip() else ""


def config_from_dict(raw: dict[str, Any], overrides: list[str] = (), source: str = "<dict>") -> JobConfig:
    raw = dict(raw or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    try:
        cfg = _build(JobConfig, raw, "")
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Load a job config from YAML (or the embedded defaults when ``path`` is None)."""
    if path is None:
        return config_from_dict({}, overrides, source="<defaults>")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return config_from_dict(raw, overrides, source=str(path))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: JobConfig, docs: bool = True) -> str:
    """The resolved config as YAML that loads back to the same config; with ``docs``, each field
    carries its doc line as a comment (``stackrec config``)."""
    if not docs:
        return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

    def value(v: Any) -> str:
        return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()

    def line(indent: str, f: dataclasses.Field, v: Any) -> str:
        doc = f.metadata.get("doc", "")
        return f"{indent}{f.name}: {value(v)}" + (f"  # {doc}" if doc else "")

    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            doc = (type(v).__doc__ or "").strip().splitlines()
            explicit = doc and not doc[0].startswith(f"{type(v).__name__}(")  # not dataclass's signature
            lines.append(f"{f.name}:" + (f"  # {doc[0]}" if explicit else ""))
            lines += [line("  ", sub, getattr(v, sub.name)) for sub in dataclasses.fields(v)]
        elif f.name == "plan":
            lines.append(f"plan:  # {f.metadata.get('doc', '')}" if v else line("", f, []))
            lines += [f"  - {value(dataclasses.asdict(stage))}" for stage in v]
        else:
            lines.append(line("", f, v))
    return "\n".join(lines) + "\n"


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build and validate one config dataclass (e.g. a ModelConfig stored in a checkpoint)."""
    obj = _build(cls, raw, prefix)
    if hasattr(obj, "validate"):
        obj.validate(prefix) if prefix else obj.validate()
    return obj
