"""Deep NextItNet stability: 64 blocks (128 dilated conv layers) with and without the alpha residual.

Same data, seed, optimizer and schedule for every variant; only the residual differs:
- ``alpha=0``: ``x + alpha * F(x)``, alpha learnable, initialised to 0 (StackRec);
- ``plain``: ``x + F(x)`` (original NextItNet, no alpha);
- ``alpha=1``: learnable alpha initialised to 1 (the same function as plain at init).

Synthetic next-item data with a learnable structure (each item's successor is drawn from a small
fixed set), so a model that trains drives the loss far below log(V). Prints the loss curves and
rewrites the ``deep`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from stackrec_dist.config import LossConfig, ModelConfig, OptimConfig
from stackrec_dist.models import build_model
from stackrec_dist.train.schedule import lr_lambda
from stackrec_dist.train.step import RecommenderLoss
from stackrec_dist.train.optim import build_optimizer

from common import write_section  # benchmarks/common.py


def markov_batches(num_items: int, length: int, batch: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(1, num_items, (num_items, 3), generator=g)
    out = []
    for _ in range(steps):
        seq = torch.empty(batch, length + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(1, num_items, (batch,), generator=g)
        for t in range(1, length + 1):
            choice = torch.randint(0, 3, (batch,), generator=g)
            seq[:, t] = successors[seq[:, t - 1], choice]
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def train_variant(name: str, model_cfg: ModelConfig, optim: OptimConfig, batches, log_every: int) -> dict:
    torch.manual_seed(0)
    model = build_model(model_cfg)
    objective = RecommenderLoss(model, LossConfig(kind="full"))
    opt = build_optimizer(model, optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, len(batches)))
    curve, start = [], time.perf_counter()
    for step, (x, y) in enumerate(batches, 1):
        loss = objective(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip or float("inf")))
        opt.step()
        sched.step()
        value = loss.item()
        if step % log_every == 0 or step == 1 or not math.isfinite(value):
            curve.append((step, value, grad_norm))
        if not math.isfinite(value):
            break
    return {"name": name, "curve": curve, "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = markov_batches(args.items, 20, 64, args.steps)
    optim = OptimConfig(lr=args.lr, warmup_steps=10, grad_clip=1.0)
    base = ModelConfig(num_items=args.items, dim=args.dim, num_blocks=args.blocks, dilations=[1, 4])
    variants = {
        "alpha=0 (StackRec)": base,
        "plain x+F(x)": ModelConfig(**{**base.__dict__, "use_alpha": False}),
        "alpha=1 (learnable)": ModelConfig(**{**base.__dict__, "alpha_init": 1.0}),
    }
    log_every = max(1, args.steps // 10)
    results = [train_variant(n, c, optim, batches, log_every) for n, c in variants.items()]
    chance = math.log(args.items - 1)
    lines = [
        f"## Deep NextItNet: {args.blocks} blocks ({2 * args.blocks} conv layers), with and without alpha",
        "",
        f"`python benchmarks/deep_stability.py` — C={args.dim}, V={args.items}, L=20, B=64, AdamW lr={args.lr}, "
        f"warm-up 10, cosine, clip 1.0, {args.steps} steps, same batches and seed for every variant. "
        f"Loss at chance = ln(V-1) = {chance:.3f}; the data's floor is ln 3 = {math.log(3):.3f}. "
        "Cells: training loss (grad norm before clipping).",
        "",
        "| step | " + " | ".join(r["name"] for r in results) + " |",
        "|---:|" + "---:|" * len(results),
    ]
    steps = sorted({s for r in results for s, _, _ in r["curve"]})
    for step in steps:
        cells = []
        for r in results:
            point = next(((v, g) for s, v, g in r["curve"] if s == step), None)
            cells.append("-" if point is None else f"{point[0]:.3f} ({point[1]:.2g})")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Wall-clock: " + ", ".join(f"{r['name']} {r['seconds']:.0f}s" for r in results) + ".")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("deep", body)


if __name__ == "__main__":
    main()
