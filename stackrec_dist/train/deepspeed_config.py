"""The DeepSpeed JSON, generated from the typed config (never a hand-kept JSON file that drifts).

``build_deepspeed_config(dist_cfg, optim_cfg, data_cfg, use_gpu)`` is the only producer of the
dict handed to ``deepspeed.initialize``. Batch arithmetic is checked here, with errors that name
the config fields, rather than deep inside DeepSpeed:

    data.batch_size (global, sequences per optimizer step)
        = micro_batch_per_worker * distributed.gradient_accumulation_steps * world_size

Precision: bf16 on GPU, fp32 on CPU (DeepSpeed's CPU accelerator has no fused bf16 optimizer
path and the distributed-equivalence tests need fp32). The optimizer is always the client's
torch AdamW (``stackrec_dist.train.optim``), so ``zero_allow_untested_optimizer`` is set for
ZeRO stages >= 1 and no ``optimizer`` / ``scheduler`` section is emitted.
"""

from __future__ import annotations

from typing import Any

from stackrec_dist.config import ConfigError, DataConfig, DistributedConfig, OptimConfig

# Far beyond any run: DeepSpeed's own step logging is replaced by ray.train.report.
_NEVER = 10**12


def world_size_of(dist_cfg: DistributedConfig) -> int:
    """Processes taking part: ``num_workers`` Ray workers, or 1 for the single-process trainer."""
    return max(1, dist_cfg.num_workers)


def micro_batch_per_worker(dist_cfg: DistributedConfig, data_cfg: DataConfig, world_size: int | None = None) -> int:
    """Sequences one worker feeds through forward/backward per micro-step."""
    world = world_size or world_size_of(dist_cfg)
    per_step = world * dist_cfg.gradient_accumulation_steps
    if data_cfg.batch_size % per_step != 0:
        raise ConfigError(
            f"data.batch_size ({data_cfg.batch_size}) must be divisible by "
            f"distributed.num_workers ({world}) * distributed.gradient_accumulation_steps "
            f"({dist_cfg.gradient_accumulation_steps}) = {per_step}"
        )
    return data_cfg.batch_size // per_step


def client_clip_norm(dist_cfg: DistributedConfig, optim_cfg: OptimConfig, use_gpu: bool) -> float:
    """Max grad norm the worker must apply itself before ``engine.step()`` (0 = none).

    DeepSpeed 0.19.8's stage-0 fp32 clipping (``runtime.utils.clip_grad_norm_``) multiplies each
    gradient in place by a shape-(1,) coefficient, which fails for 0-dim parameters (the blocks'
    ``alpha``): "output with shape [] doesn't match the broadcast shape [1]". At stage 0 on CPU every
    rank holds full, already all-reduced gradients at the accumulation boundary, so clipping them
    with ``torch.nn.utils.clip_grad_norm_`` is the same global-norm clip. Stages 1-3 clip inside
    the ZeRO optimizer, which handles scalars. On GPU (bf16, DeepSpeed's BF16 optimizer at stage 0)
    DeepSpeed keeps clipping (not verified on a GPU here).
    """
    return float(optim_cfg.grad_clip) if dist_cfg.zero_stage == 0 and not use_gpu else 0.0


def build_deepspeed_config(
    dist_cfg: DistributedConfig,
    optim_cfg: OptimConfig,
    data_cfg: DataConfig,
    use_gpu: bool,
    world_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize(config=...)``.

    ``world_size`` defaults to ``distributed.num_workers`` (1 when 0); pass the real world size
    when it can differ (e.g. a checkpoint loaded by fewer workers).
    """
    dist_cfg.validate("distributed")
    optim_cfg.validate("optim")
    data_cfg.validate("data")
    world = world_size or world_size_of(dist_cfg)
    micro = micro_batch_per_worker(dist_cfg, data_cfg, world)
    stage = dist_cfg.zero_stage

    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        # Plain collectives on CPU/gloo; overlap and bucket sizes only matter on GPU.
        zero.update({
            "overlap_comm": bool(use_gpu),
            "contiguous_gradients": True,
            "reduce_bucket_size": 50_000_000,
        })
    if stage == 2:
        zero["allgather_bucket_size"] = 50_000_000
    if stage == 3:
        zero.update({
            # Gather every parameter at use: the model is small per layer, the win is memory.
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 100_000_000,
            "stage3_prefetch_bucket_size": 5_000_000,
            # Save shards, not a gathered 16-bit copy: zero_checkpoint.py consolidates on CPU.
            "stage3_gather_16bit_weights_on_model_save": False,
        })

    config: dict[str, Any] = {
        "train_batch_size": data_cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": dist_cfg.gradient_accumulation_steps,
        # DeepSpeed wants the max norm (a float); 0.0 disables clipping. A bool here would be a bug.
        # CPU stage 0: the worker clips instead (see client_clip_norm).
        "gradient_clipping": 0.0 if client_clip_norm(dist_cfg, optim_cfg, use_gpu) > 0 else float(optim_cfg.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": stage >= 1,
        "bf16": {"enabled": bool(use_gpu)},
        "fp16": {"enabled": False},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if use_gpu:
        # Reduce gradients in fp32 even when weights/activations are bf16.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    validate_deepspeed_config(config)
    return config


def validate_deepspeed_config(config: dict[str, Any]) -> None:
    """Structural checks of a generated config (types DeepSpeed silently mis-reads)."""
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"deepspeed {key} must be a positive int (got {value!r})")
    clip = config["gradient_clipping"]
    if not isinstance(clip, float) or clip < 0:
        raise ConfigError(f"deepspeed gradient_clipping must be a float >= 0 (got {clip!r})")
    stage = config["zero_optimization"]["stage"]
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed zero_optimization.stage must be 0-3 (got {stage!r})")
    if config["bf16"]["enabled"] and config["fp16"]["enabled"]:
        raise ConfigError("deepspeed bf16 and fp16 cannot both be enabled")
    if config["train_batch_size"] % (config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]):
        raise ConfigError("deepspeed train_batch_size must equal micro batch * accumulation * world size")
