"""``stackrec train`` without a plan: one training run in this process or on Ray workers, then the
test metrics of its best weights. Either way the run leaves ``<train.checkpoint_dir>/last`` (the
full state, for resume or ``--init``) and ``<train.checkpoint_dir>/best`` (the best weights), both
in the one checkpoint format."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from stackrec_dist.config import JobConfig
from stackrec_dist.train.checkpoint import check_catalogue, open_checkpoint, save_model_checkpoint

log = logging.getLogger(__name__)


def initial_weights(cfg: JobConfig, init: str) -> tuple[JobConfig, dict]:
    """``--init``: the checkpoint's model config and best weights start the run (its catalogue
    must be the dataset's)."""
    from stackrec_dist.train.data_info import dataset_num_items

    checkpoint = open_checkpoint(init, cfg.data.storage_options)
    check_catalogue(checkpoint, dataset_num_items(cfg.data), cfg.data.path)
    which, state = checkpoint.weights("best")
    log.info("initial weights: %s weights of %s (%d blocks)", which, init, checkpoint.model_config.num_blocks)
    return dataclasses.replace(cfg, model=checkpoint.model_config), state


def train_job(cfg: JobConfig, init: str = "", resume: bool = False) -> tuple[dict[str, Any], dict[str, float], str]:
    """-> (summary, test metrics, model label)."""
    init_state = None
    if init:
        cfg, init_state = initial_weights(cfg, init)
    if cfg.distributed.num_workers == 0:
        return _train_here(cfg, init_state, resume)
    return _train_on_ray(cfg, init_state)


def _train_here(cfg: JobConfig, init_state, resume: bool):
    from stackrec_dist.train.device import resolve_device
    from stackrec_dist.train.loop import LocalSink, TrainLoop, World, open_tracker

    choice = resolve_device(cfg.train.device)
    print(f"stackrec: {cfg.name}: {choice.describe()}", flush=True)
    with open_tracker(cfg, 0) as tracker:
        loop = TrainLoop(cfg, World(choice), init_state, sink=LocalSink(cfg.train.checkpoint_dir, resume=resume),
                         tracker=tracker)
        try:
            summary = loop.fit()
            test = loop.validate("test", loop.best_model())
        finally:
            loop.close()
    summary = {**summary, "device": choice.name, "precision": "bf16" if choice.use_gpu else "fp32"}
    return summary, test, f"{cfg.model.backbone}-{loop.model_cfg.num_blocks}"


def _train_on_ray(cfg: JobConfig, init_state):
    from stackrec_dist.eval.evaluate import evaluate_split
    from stackrec_dist.train.device import resolve_device
    from stackrec_dist.train.ray_job import fit_distributed, local_checkpoint_dir

    result = fit_distributed(cfg, init_state=init_state)
    last = local_checkpoint_dir(cfg, result)
    checkpoint = open_checkpoint(last)
    best = checkpoint.best_model_state()
    if best is not None:
        save_model_checkpoint(Path(cfg.train.checkpoint_dir) / "best", best, checkpoint.model_config,
                              {"step": checkpoint.train_state.get("best_step", 0)})
    model, _ = checkpoint.load_model("best")
    device = resolve_device(cfg.train.device).torch_device()
    test = evaluate_split(model, cfg.data, "test", cfg.eval, device)
    keys = ("steps", "epochs", "step", "epoch", "best_valid_ndcg@5", "best_step", "train/loss")
    summary = {k: v for k, v in (result.metrics or {}).items() if k in keys}
    summary.setdefault("steps", checkpoint.step)
    summary["checkpoint"] = str(last)
    kind = checkpoint.train_state.get("device", "")
    summary.update({"device": kind, "precision": "bf16" if kind == "cuda" else "fp32"})
    return summary, test, f"{cfg.model.backbone}-{model.cfg.num_blocks}"
