"""The single-process loop's own train step on synthetic global batches: the reference the
distributed equivalence tests compare DeepSpeed workers against."""

from __future__ import annotations

import torch


def single_process_reference(job, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The world-size-1 loop (plain PyTorch engine) on the same global batches as the workers."""
    import dataclasses

    from stackrec_dist.train.device import DeviceChoice
    from stackrec_dist.train.loop import LoopOptions, TrainLoop, World

    one = dataclasses.replace(job, distributed=dataclasses.replace(job.distributed, num_workers=0),
                              train=dataclasses.replace(job.train, max_steps=steps))
    loop = TrainLoop(one, World(DeviceChoice("cpu")),
                     options=LoopOptions(data_source="synthetic", synthetic_steps_per_epoch=steps,
                                         evaluate=False, checkpoint=False))
    losses = [loop.train_step(batch) for batch in loop.train_loader]
    return losses, loop.full_model_state()
