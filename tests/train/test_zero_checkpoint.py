"""ZeRO checkpoints saved by 2 real gloo processes consolidate on CPU, tensor by tensor, into the
full state dict (equal to the parameters gathered in the run) and load into one process.

The same runs check the worker's step against the single-process trainer's at stages 0, 1 and 3
with gradient clipping active (stage 0 clips on the client, see deepspeed_config)."""

from __future__ import annotations

import json
import os
import socket
import types
from pathlib import Path

import pytest
import torch

from stackrec_dist.config import config_from_dict, config_to_dict
from tests.train.reference_run import single_process_reference

WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(stage: int):
    return config_from_dict({
        "model": {"num_items": 97, "dim": 16, "num_blocks": 2, "alpha_init": 0.5},
        "data": {"batch_size": 8, "max_len": 12},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "grad_clip": 0.05, "weight_decay": 0.01},
        "train": {"max_steps": STEPS},
        "distributed": {"num_workers": WORLD, "zero_stage": stage},
    })


def _save_worker(rank: int, port: int, job_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    from stackrec_dist.train import distributed as D
    from stackrec_dist.train.device import DeviceChoice
    from stackrec_dist.train.loop import LoopOptions, TrainLoop, World

    job = config_from_dict(job_dict)
    choice = DeviceChoice("cpu")
    loop = TrainLoop(job, World(choice, D.init_worker(choice)),
                     options=LoopOptions(data_source="synthetic", synthetic_steps_per_epoch=STEPS))
    losses = [loop.train_step(loop._next_batch()) for _ in range(STEPS)]
    loop.engine.engine.save_checkpoint(out, tag="t")
    full = loop.full_model_state()  # a collective under ZeRO-3
    if rank == 0:
        torch.save(full, Path(out) / "gathered.pt")
        (Path(out) / "losses.json").write_text(json.dumps(losses))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_checkpoint_consolidates_and_loads_in_one_process(tmp_path, stage):
    import torch.multiprocessing as mp

    from stackrec_dist.models import build_model
    from stackrec_dist.train.zero_checkpoint import (
        inspect_checkpoint,
        iter_consolidated_tensors,
        load_consolidated_state_dict,
        load_into_module,
    )

    job = _job(stage)
    out = tmp_path / "ckpt"
    mp.spawn(_save_worker, args=(_free_port(), config_to_dict(job), str(out)), nprocs=WORLD, join=True)

    info = inspect_checkpoint(out)  # resolves the tag through DeepSpeed's `latest` file
    assert (info.zero_stage, info.world_size, info.path.name) == (stage, WORLD, "t")
    gathered = torch.load(out / "gathered.pt")
    stream = iter_consolidated_tensors(out, tag="t")
    assert isinstance(stream, types.GeneratorType)  # one tensor at a time
    full = load_consolidated_state_dict(out, tag="t")
    assert list(full) == [k for k in full]  # no duplicates
    assert sorted(full) == sorted(gathered)
    for name, tensor in gathered.items():
        assert full[name].dtype == torch.float32
        assert full[name].shape == tensor.shape, name  # incl. 0-dim alphas
        torch.testing.assert_close(full[name], tensor, rtol=0, atol=0, msg=name)

    # Loads strictly into an unsharded model in this (single) process and computes the same thing.
    model = build_model(job.model)
    load_into_module(model, out)
    reference = build_model(job.model)
    reference.load_state_dict(gathered)
    items = torch.randint(1, job.model.num_items, (3, job.data.max_len))
    torch.testing.assert_close(model(items), reference(items), rtol=0, atol=0)
    # Same trajectory and weights as the single-process trainer's step on the global batches.
    ref_losses, ref_state = single_process_reference(job, STEPS)
    torch.testing.assert_close(torch.tensor(json.loads((out / "losses.json").read_text()), dtype=torch.float64),
                               torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-4, atol=0)
    for name, ref in ref_state.items():
        torch.testing.assert_close(full[name], ref, rtol=1e-4, atol=1e-6, msg=name)
    # Training really moved the weights away from the seed's initialisation.
    torch.manual_seed(job.train.seed)
    init = build_model(job.model).state_dict()
    assert any(not torch.equal(init[k], full[k]) for k in init)
    assert all(torch.isfinite(torch.tensor(json.loads((out / "losses.json").read_text()))))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from stackrec_dist.train.zero_checkpoint import load_consolidated_state_dict

    with pytest.raises(FileNotFoundError):
        load_consolidated_state_dict(tmp_path)
