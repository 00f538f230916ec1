"""Grow weights: k trained blocks -> 2k (stacking), or a new softmax head for another catalogue.

Pure functions on state dicts and model configs: the coordinator, the in-place growth of a
running worker group and ``stackrec grow`` all call these, nothing here knows of Ray or DeepSpeed.
"""

from __future__ import annotations

import dataclasses

import torch

from stackrec_dist.config import GrowthConfig, ModelConfig
from stackrec_dist.growth.stacking import (
    KeyMapping,
    apply_plan,
    check_matches,
    grown_block_dilations,
    stacking_plan,
)
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


def model_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _fresh_values(cfg: ModelConfig, needed: set[str], seed: int) -> dict[str, torch.Tensor]:
    """Initial values of the re-initialised tensors only, from a seeded model of the new shape."""
    if not needed:
        return {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build_model(cfg).state_dict()
    return {k: v for k, v in state.items() if k in needed}


def grow_state(state: dict[str, torch.Tensor], cfg: ModelConfig, growth: GrowthConfig,
               seed: int = 0) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Stack the weights of a k-block model into a 2k-block one -> (state, config).

    Deterministic: every worker computes the same result from the same weights, so a running
    worker group grows without exchanging tensors, and a rerun after a crash grows identically.
    """
    new_cfg = grown_model_config(cfg, growth)
    plan: list[KeyMapping] = stacking_plan({k: v.shape for k, v in state.items()}, cfg.num_blocks, growth)
    fresh = _fresh_values(new_cfg, {m.source for m in plan if m.role == "fresh"}, seed)
    new_state = apply_plan(plan, state, fresh)
    check_matches(new_state, model_shapes(new_cfg))
    return new_state, new_cfg


def new_head_state(state: dict[str, torch.Tensor], cfg: ModelConfig, num_items: int,
                   seed: int = 0) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Transfer (TF): keep embedding and blocks, attach a freshly initialised head of ``num_items``."""
    new_cfg = dataclasses.replace(cfg, num_items=num_items)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_model(new_cfg).state_dict()
    state = dict(state)
    for key in ("head.weight", "head.bias"):
        state[key] = fresh[key]
    if state["item_embedding.weight"].shape[0] != num_items:
        # The target domain's catalogue differs: the input embedding must cover it too. Items are
        # the same ids in both domains (one id map), so existing rows are kept, new ones fresh.
        emb = fresh["item_embedding.weight"]
        rows = min(emb.shape[0], state["item_embedding.weight"].shape[0])
        emb[:rows] = state["item_embedding.weight"][:rows]
        state["item_embedding.weight"] = emb
    return state, new_cfg


def grow_model(model: SequentialRecommender, growth: GrowthConfig, seed: int = 0) -> SequentialRecommender:
    """Return a new model with twice the blocks; ``seed`` fixes the init of re-initialised tensors."""
    reference = next(model.parameters())
    state, new_cfg = grow_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.cfg, growth, seed)
    grown = build_model(new_cfg).to(dtype=reference.dtype)
    grown.load_state_dict(state)
    return grown.to(reference.device)
