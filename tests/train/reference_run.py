"""The single-process trainer's own train step on synthetic global batches: the reference the
distributed equivalence tests compare DeepSpeed workers against."""

from __future__ import annotations

import types

import torch


def single_process_reference(job, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The single-process Trainer's own train_step on the same global batches."""
    from stackrec_dist.models import build_model
    from stackrec_dist.train.optim import build_optimizer
    from stackrec_dist.train.schedule import lr_lambda
    from stackrec_dist.train.step import RecommenderLoss
    from stackrec_dist.train.trainer import Trainer, TrainState
    from stackrec_dist.train.worker import SyntheticBatches

    torch.manual_seed(job.train.seed)
    model = build_model(job.model)
    optimizer = build_optimizer(model, job.optim)
    trainer = types.SimpleNamespace(
        cfg=job, model=model, device=torch.device("cpu"), objective=RecommenderLoss(model, job.loss),
        optimizer=optimizer, state=TrainState(),
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job.optim, steps)),
        _autocast=lambda: torch.autocast("cpu", enabled=False),
    )
    batches = SyntheticBatches(job.model.num_items, job.data.max_len, job.data.batch_size, steps, job.data.seed)
    losses = [Trainer.train_step(trainer, batch) for batch in batches]
    return losses, model.state_dict()
