"""Distributed training throughput: DeepSpeed's overhead over the bare PyTorch loop, and Ray workers.

Same synthetic global batches throughout (NextItNet C=64, 4 blocks, L=50, B=256, full softmax over
V items, fp32, AdamW, grad clipping), in one run:

1. overhead: the one loop's step with the plain PyTorch engine and with the DeepSpeed engine
   (``TrainLoop.train_step`` with the DeepSpeed engine, ZeRO 0 and 2, a 1-rank gloo group) in this process with ``--threads``
   threads, interleaved step by step, so that the load of this shared machine hits both alike;
2. Ray Train: 1 worker (``--threads`` CPUs) and 2 workers (half each: on a 2-core machine they share
   the same cores, so this shows communication/partitioning cost, not a speed-up), ZeRO 0 and 2;
   median step time measured inside the workers (Ray/DeepSpeed start-up excluded).

Writes the ``distributed`` section of docs/benchmarks.md.

    python benchmarks/throughput_distributed.py [--steps 20] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_model_args, write_section  # noqa: E402

from stackrec_dist.config import config_from_dict  # noqa: E402


def _job(args, workers: int, stage: int, storage: str):
    return config_from_dict({
        "name": f"bench-w{workers}-z{stage}",
        "model": {"num_items": args.items, "dim": args.dim, "num_blocks": args.blocks},
        "data": {"batch_size": args.batch, "max_len": args.seq_len},
        "optim": {"warmup_steps": 2},
        "train": {"max_steps": args.steps, "eval_every": args.steps, "patience": 0, "progress": False,
                  "threads": args.threads if workers == 1 else max(1, args.threads // workers)},
        "distributed": {"num_workers": max(1, workers), "zero_stage": stage, "storage_path": storage,
                        "cpus_per_worker": float(args.threads if workers == 1 else max(1, args.threads // workers))},
    })


def _loop(args, stage: int, deepspeed: bool):
    """The one training loop on synthetic batches: plain engine (no process group) or DeepSpeed
    on a 1-rank gloo group."""
    import dataclasses

    from stackrec_dist.train import distributed as D
    from stackrec_dist.train.device import DeviceChoice
    from stackrec_dist.train.loop import LoopOptions, TrainLoop, World

    job = _job(args, 1, stage, "/tmp/unused")
    if not deepspeed:
        job = dataclasses.replace(job, distributed=dataclasses.replace(job.distributed, num_workers=0))
    choice = DeviceChoice("cpu")
    world = World(choice, D.init_worker(choice) if deepspeed else None)
    return TrainLoop(job, world, options=LoopOptions(data_source="synthetic", synthetic_steps_per_epoch=10**6,
                                                     evaluate=False, checkpoint=False))


def overhead_in_process(args) -> dict[str, float]:
    """Median step time of the plain engine's step and of DeepSpeed's (ZeRO 0, 2) in this one
    process (1-rank gloo group), interleaved step by step so machine load hits all alike."""
    from stackrec_dist.train.batches import SyntheticBatches

    torch.set_num_threads(args.threads)
    loops = {"bare": _loop(args, 0, deepspeed=False), "zero0": _loop(args, 0, deepspeed=True),
             "zero2": _loop(args, 2, deepspeed=True)}
    batches = iter(SyntheticBatches(args.items, args.seq_len, args.batch, 10**6, seed=0))
    times: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(args.steps + 2):
        batch = next(batches)
        for name, loop in loops.items():
            t0 = time.perf_counter()
            loop.train_step(batch)  # world size 1: the whole global batch
            times[name].append(time.perf_counter() - t0)
    return {k: sorted(v[2:])[len(v[2:]) // 2] for k, v in times.items()}  # drop 2 warm-up steps


def ray_run(args, workers: int, stage: int, storage: str) -> tuple[float, float]:
    """(median step time reported by the workers, wall time of the whole Ray run)."""
    from stackrec_dist.train.loop import LoopOptions
    from stackrec_dist.train.ray_job import fit_distributed

    job = _job(args, workers, stage, storage)
    t0 = time.perf_counter()
    result = fit_distributed(job, LoopOptions(data_source="synthetic", synthetic_steps_per_epoch=args.steps,
                                              evaluate=False))  # V2 Result.metrics = the latest checkpoint's metrics
    wall = time.perf_counter() - t0
    return result.metrics["train/step_time_s"], wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="cores for the bare loop and a lone worker")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--items", type=int, default=3707, help="catalogue size V (MovieLens-1M's)")
    add_model_args(parser)
    parser.add_argument("--quick", action="store_true", help="few steps, small catalogue (smoke test)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.items = 6, 500

    load_before = os.getloadavg()[0]
    # 1) DeepSpeed's own overhead, same process, interleaved with the bare loop.
    inproc = overhead_in_process(args)
    print({k: f"{v * 1e3:.1f} ms" for k, v in inproc.items()}, flush=True)
    import torch.distributed as dist

    dist.destroy_process_group()

    # 2) Ray workers (median step time measured by the workers themselves).
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=args.threads, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    rows = []
    try:
        time.sleep(5)  # let Ray's start-up processes settle before timing anything
        with tempfile.TemporaryDirectory(prefix="bench-dist-") as storage:
            for workers, stage in ((1, 0), (1, 2), (2, 0), (2, 2)):
                step, wall = ray_run(args, workers, stage, storage)
                rows.append((workers, stage, step, wall))
                print(f"workers={workers} zero={stage}: {step * 1e3:.1f} ms/step (run {wall:.0f} s)", flush=True)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()[0]

    bare = inproc["bare"]
    lines = [
        "## Ray Train + DeepSpeed: overhead vs the bare step, 1 and 2 workers (CPU)",
        "",
        f"NextItNet C={args.dim}, {args.blocks} blocks, L={args.seq_len}, global B={args.batch}, V={args.items}, "
        f"full softmax, fp32, AdamW + clipping, gloo; {os.cpu_count()} cores; median optimizer-step time "
        f"(`python benchmarks/throughput_distributed.py`). Shared machine: load average {load_before:.1f} "
        f"before / {load_after:.1f} after (other jobs running), so compare rows of the same table only.",
        "",
        f"DeepSpeed overhead, one process, {args.threads} threads, the plain-engine loop step and the DeepSpeed engine's "
        f"DeepSpeed step interleaved step by step on the same batches ({args.steps} steps each):",
        "",
        "| step | ms / step | sequences / s | vs bare |",
        "|---|---|---|---|",
        f"| bare PyTorch (the loop's plain engine, `TrainLoop.train_step`) | {bare * 1e3:.1f} | {args.batch / bare:.0f} | 1.000x |",
    ]
    for stage in (0, 2):
        t = inproc[f"zero{stage}"]
        lines.append(f"| DeepSpeed engine, ZeRO-{stage}, world 1 | {t * 1e3:.1f} | {args.batch / t:.0f} | "
                     f"{t / bare:.3f}x ({(t / bare - 1) * 100:+.1f}%) |")
    lines += [
        "",
        f"Ray Train workers (median step time measured inside the workers over {args.steps} steps; Ray and "
        f"DeepSpeed start-up excluded, shown separately as the run's wall time). 1 worker: {args.threads} CPUs/"
        f"threads; 2 workers: {max(1, args.threads // 2)} each, sharing the same {args.threads} cores:",
        "",
        "| workers | ZeRO | ms / step | sequences / s | Ray run wall (s) |",
        "|---|---|---|---|---|",
    ]
    for workers, stage, step, wall in rows:
        lines.append(f"| {workers} | {stage} | {step * 1e3:.1f} | {args.batch / step:.0f} | {wall:.0f} |")
    lines += [
        "",
        "Reading: the overhead target (<= 10 %) is judged on the interleaved same-process table. The Ray rows "
        "are not comparable with it: on this shared, oversubscribed machine, Ray's worker processes (run at "
        "nice 15) measured faster steps than the driver process with the same thread count, an effect of "
        "the OS scheduler, not of the code (the same DeepSpeed step runs in both). Between Ray rows: 2 "
        "workers on 2 cores do the same work as 1 worker with 2 threads plus gradient all-reduces over gloo.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("distributed", body)


if __name__ == "__main__":
    main()
