"""Distributed evaluation (2 real gloo processes, strided rows, all-reduced metric sums) equals
single-process evaluation of the same model on the same data."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from stackrec_dist.config import DataConfig, EvalConfig, ModelConfig

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_worker(rank: int, port: int, data_path: str, model_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    from stackrec_dist.data.eval_stream import iter_eval_batches
    from stackrec_dist.eval.evaluate import evaluate_accumulator
    from stackrec_dist.eval.metrics import MetricAccumulator
    from stackrec_dist.models import build_model
    from stackrec_dist.train import distributed as D
    from stackrec_dist.train.device import resolve_device

    ctx = D.init_worker(resolve_device("cpu"))
    saved = torch.load(model_path)
    model = build_model(ModelConfig(**saved["config"]))
    model.load_state_dict(saved["state"])
    data_cfg = DataConfig(path=data_path, max_len=12)
    eval_cfg = EvalConfig(ks=[1, 5, 10], batch_size=7)
    # What TrainLoop.validate does: each rank ranks its own rows, the metric sums are all-reduced.
    acc = evaluate_accumulator(model, iter_eval_batches(data_cfg, "valid", 7, rank=ctx.rank, world_size=WORLD),
                               eval_cfg.ks, ctx.device)
    merged = MetricAccumulator.from_state(D.all_reduce_sum(acc.state(), device=ctx.device).cpu(), eval_cfg.ks)
    metrics = {**merged.compute(), "count": merged.count}
    Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    D.teardown(ctx)


@pytest.mark.slow
def test_distributed_evaluation_equals_single_process(tmp_path):
    import dataclasses

    import torch.multiprocessing as mp

    from stackrec_dist.data.eval_stream import iter_eval_batches
    from stackrec_dist.data.synthetic import generate_sequence_dataset
    from stackrec_dist.eval.evaluate import evaluate
    from stackrec_dist.models import build_model

    data = tmp_path / "data"
    # 101 users: an odd row count, so the ranks get different numbers of rows and batches.
    generate_sequence_dataset(str(data), num_sequences=101, num_items=50, seed=7, num_shards=3, row_group_size=16)
    model_cfg = ModelConfig(num_items=50, dim=16, num_blocks=2, alpha_init=0.3)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    with torch.no_grad():  # non-trivial weights, so that ranks spread over many values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save({"config": dataclasses.asdict(model_cfg), "state": model.state_dict()}, tmp_path / "model.pt")

    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_eval_worker, args=(_free_port(), str(data), str(tmp_path / "model.pt"), str(out)), nprocs=WORLD)

    data_cfg = DataConfig(path=str(data), max_len=12)
    single = evaluate(model, iter_eval_batches(data_cfg, "valid", 7), [1, 5, 10], "cpu")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert results[0] == results[1]  # every rank gets the same reduced numbers
    assert single["count"] == results[0]["count"] == 101
    assert 0 < single["hr@10"] < 1
    for key, value in single.items():
        assert results[0][key] == pytest.approx(value, rel=0, abs=1e-12), key
