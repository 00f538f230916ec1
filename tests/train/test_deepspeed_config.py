"""The DeepSpeed config is generated from the typed config; batch arithmetic and types checked."""

import json

import pytest

from stackrec_dist.config import ConfigError, DataConfig, DistributedConfig, OptimConfig
from stackrec_dist.train.deepspeed_config import build_deepspeed_config, micro_batch_per_worker


def _build(stage=0, workers=2, accum=1, batch=256, clip=1.0, gpu=False):
    return build_deepspeed_config(
        DistributedConfig(num_workers=workers, zero_stage=stage, gradient_accumulation_steps=accum),
        OptimConfig(grad_clip=clip),
        DataConfig(batch_size=batch),
        use_gpu=gpu,
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stages_cpu_fp32(stage):
    cfg = _build(stage=stage)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_batch_size"] == 256
    assert cfg["train_micro_batch_size_per_gpu"] == 128
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    # A client torch AdamW is passed: DeepSpeed must be told it is allowed with ZeRO.
    assert cfg["zero_allow_untested_optimizer"] is (stage >= 1)
    assert "optimizer" not in cfg and "scheduler" not in cfg
    json.dumps(cfg)  # plain JSON types only


def test_gpu_is_bf16():
    cfg = _build(stage=2, gpu=True)
    assert cfg["bf16"]["enabled"] is True
    assert cfg["data_types"]["grad_accum_dtype"] == "fp32"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradient_clipping_is_a_float_norm(stage):
    assert _build(stage=stage, clip=1.0)["gradient_clipping"] == 1.0
    assert isinstance(_build(stage=stage, clip=0)["gradient_clipping"], float)
    assert _build(stage=stage, clip=0)["gradient_clipping"] == 0.0
    assert _build(stage=stage, clip=2.5)["gradient_clipping"] == 2.5


def test_stage0_clips_on_the_client():
    from stackrec_dist.train.deepspeed_config import client_clip_norm

    assert _build(stage=0, clip=1.0)["gradient_clipping"] == 0.0
    assert client_clip_norm(DistributedConfig(zero_stage=0), OptimConfig(grad_clip=1.5), use_gpu=False) == 1.5
    assert client_clip_norm(DistributedConfig(zero_stage=2), OptimConfig(grad_clip=1.5), use_gpu=False) == 0.0
    assert client_clip_norm(DistributedConfig(zero_stage=0), OptimConfig(grad_clip=1.5), use_gpu=True) == 0.0
    assert _build(stage=0, clip=1.0, gpu=True)["gradient_clipping"] == 1.0


def test_batch_arithmetic():
    cfg = _build(workers=2, accum=4, batch=256)
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2 == cfg["train_batch_size"]
    assert micro_batch_per_worker(DistributedConfig(num_workers=0), DataConfig(batch_size=64)) == 64


def test_indivisible_batch_names_fields():
    with pytest.raises(ConfigError, match=r"data.batch_size .*distributed.num_workers"):
        _build(workers=3, batch=256)


def test_invalid_stage_rejected():
    with pytest.raises(ConfigError, match="zero_stage"):
        _build(stage=4)


def test_world_size_override():
    cfg = build_deepspeed_config(DistributedConfig(num_workers=2), OptimConfig(), DataConfig(batch_size=64),
                                 use_gpu=False, world_size=1)
    assert cfg["train_micro_batch_size_per_gpu"] == 64
