"""Step time by depth with a full vs a sampled softmax: how much cheaper a shallow stage is.

StackRec saves time only where a shallow step costs much less than a deep one. At C=64 on
MovieLens-1M's 3.1k items a full softmax (B*L*V logits) costs about as much as a dozen blocks, so
the 4-block step is hardly cheaper than the 16-block one; a sampled softmax (the authors' choice)
takes the head out of the way. Same process, same random batches, one config after another;
ratios against the 16-block step of the same loss.

    python benchmarks/head_cost.py                  # writes the head-cost section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from stackrec_dist.config import LossConfig, ModelConfig, OptimConfig
from stackrec_dist.models import build_model
from stackrec_dist.train.optim import build_optimizer
from stackrec_dist.train.step import RecommenderLoss

from common import write_section  # benchmarks/common.py, beside this script


def step_seconds(blocks: int, loss: LossConfig, items: int, batch: int, seq_len: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_items=items, dim=64, num_blocks=blocks, dilations=[1, 4]))
    objective = RecommenderLoss(model, loss)
    opt = build_optimizer(model, OptimConfig())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(1, items, (batch, seq_len), generator=g), torch.randint(1, items, (batch, seq_len), generator=g)

    def step():
        value = objective(x, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=3124, help="catalogue incl. pad (RecBole's ML-1M: 3,124)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    losses = {"full softmax": LossConfig(kind="full"),
              "sampled, 1024 negatives": LossConfig(kind="sampled", num_samples=1024)}
    depths = (4, 8, 16)
    load_before = os.getloadavg()[0]
    times = {name: {k: step_seconds(k, loss, args.items, 128, 50, args.steps) for k in depths}
             for name, loss in losses.items()}
    load_after = os.getloadavg()[0]
    lines = ["## Step time by depth: full vs sampled softmax (CPU)", "",
             f"`python benchmarks/head_cost.py` - {platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
             f"NextItNet C=64, L=50, B=128, V={args.items}, AdamW, {args.steps} timed steps each; "
             f"load average {load_before:.2f} before, {load_after:.2f} after.", "",
             "| loss | " + " | ".join(f"{k} blocks s/step (x of 16)" for k in depths) + " |",
             "|---|" + "---:|" * len(depths)]
    for name, row in times.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f} ({row[k] / row[16]:.2f})" for k in depths) + " |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("head-cost", body)


if __name__ == "__main__":
    main()
