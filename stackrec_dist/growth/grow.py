"""Grow a live model: build the 2k-block model and load the stacked state into it."""

from __future__ import annotations

import dataclasses

import torch

from stackrec_dist.config import GrowthConfig, ModelConfig
from stackrec_dist.growth.stacking import check_matches, grown_block_dilations, stack_state_dict
from stackrec_dist.models import SequentialRecommender, build_model


def grown_model_config(cfg: ModelConfig, growth: GrowthConfig) -> ModelConfig:
    """The config of the 2k-block model grown from ``cfg``: doubled depth, per-block dilations
    chosen by ``growth.dilations``."""
    k = cfg.num_blocks
    old_dilations = [cfg.block_dilation(i) for i in range(k)]
    return dataclasses.replace(
        cfg,
        num_blocks=2 * k,
        block_dilations=grown_block_dilations(old_dilations, growth.method, growth.dilations, cfg.dilations),
    )


def grow_model(model: SequentialRecommender, growth: GrowthConfig, seed: int = 0) -> SequentialRecommender:
    """Return a new model with twice the blocks; ``seed`` fixes the init of re-initialised tensors."""
    old_cfg = model.cfg
    new_cfg = grown_model_config(old_cfg, growth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = build_model(new_cfg)
    reference = next(model.parameters())
    grown = grown.to(dtype=reference.dtype)
    fresh = grown.state_dict()
    state = stack_state_dict({k: v.cpu() for k, v in model.state_dict().items()}, old_cfg.num_blocks, growth, fresh)
    check_matches(state, {k: v.shape for k, v in fresh.items()})
    grown.load_state_dict(state)
    return grown.to(reference.device)
