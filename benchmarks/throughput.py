"""Training throughput: this project's NextItNet step vs a plain eager PyTorch NextItNet loop.

Both run the same config in the same process on the same synthetic batches; the ratio
(project / plain) is what to read, not the absolute numbers. Prints a table and rewrites the
``throughput`` section of docs/benchmarks.md.

    python benchmarks/throughput.py                 # C in {64, 256} x blocks in {4, 8}, L=50, B=256
    python benchmarks/throughput.py --quick         # fewer steps (smoke)
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from stackrec_dist.config import LossConfig, ModelConfig, OptimConfig
from stackrec_dist.models import build_model
from stackrec_dist.train.step import RecommenderLoss
from stackrec_dist.train.optim import build_optimizer

from common import write_section  # benchmarks/common.py, beside this script

class PlainBlock(nn.Module):
    """Textbook NextItNet block in (B, C, L) layout: what a user would write without this project."""

    def __init__(self, c: int, d: int):
        super().__init__()
        self.d = d
        self.conv1, self.conv2 = nn.Conv1d(c, c, 3, dilation=d), nn.Conv1d(c, c, 3, dilation=2 * d)
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x):  # x: (B, C, L)
        h = self.conv1(F.pad(x, (2 * self.d, 0)))
        h = F.relu(self.ln1(h.transpose(1, 2))).transpose(1, 2)
        h = self.conv2(F.pad(h, (4 * self.d, 0)))
        h = F.relu(self.ln2(h.transpose(1, 2))).transpose(1, 2)
        return x + self.alpha * h


class PlainNextItNet(nn.Module):
    def __init__(self, v: int, c: int, blocks: int):
        super().__init__()
        self.emb = nn.Embedding(v, c, padding_idx=0)
        self.blocks = nn.Sequential(*[PlainBlock(c, [1, 4][i % 2]) for i in range(blocks)])
        self.out = nn.Linear(c, v)

    def forward(self, x, y):
        h = self.blocks(self.emb(x).transpose(1, 2)).transpose(1, 2)
        return F.cross_entropy(self.out(h).flatten(0, 1), y.flatten(), ignore_index=0)


def _time_steps(step, batches, warmup: int) -> float:
    for b in batches[:warmup]:
        step(*b)
    start = time.perf_counter()
    for b in batches[warmup:]:
        step(*b)
    return time.perf_counter() - start


def bench_one(dim: int, blocks: int, seq_len: int, batch: int, items: int, steps: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps + warmup):
        x = torch.randint(1, items, (batch, seq_len + 1), generator=g)
        x[: batch // 4, : seq_len // 2] = 0  # some left padding, as real windows have
        batches.append((x[:, :-1].contiguous(), torch.where(x[:, :-1] == 0, 0, x[:, 1:]).contiguous()))
    targets = sum(int((y != 0).sum()) for _, y in batches[warmup:])

    torch.manual_seed(0)
    model = build_model(ModelConfig(num_items=items, dim=dim, num_blocks=blocks, impl="auto"))
    objective = RecommenderLoss(model, LossConfig(kind="full"))
    opt = build_optimizer(model, OptimConfig())

    def project_step(x, y):
        loss = objective(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    torch.manual_seed(0)
    plain = PlainNextItNet(items, dim, blocks)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)

    def plain_step(x, y):
        loss = plain(x, y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()

    # Interleave the two twice so drift of the shared machine hits both alike.
    t_plain = _time_steps(plain_step, batches, warmup)
    t_proj = _time_steps(project_step, batches, warmup)
    t_plain += _time_steps(plain_step, batches, warmup)
    t_proj += _time_steps(project_step, batches, warmup)
    n = 2 * steps
    return {
        "C": dim, "blocks": blocks, "L": seq_len, "B": batch, "V": items,
        "project_seq_s": n * batch / t_proj, "plain_seq_s": n * batch / t_plain,
        "project_tgt_s": 2 * targets / t_proj, "plain_tgt_s": 2 * targets / t_plain,
        "ratio": t_plain / t_proj,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--items", type=int, default=3707, help="catalogue size V (MovieLens-1M's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, warmup = (3, 1) if args.quick else (args.steps, 2)
    rows = [bench_one(c, k, 50, 256, args.items, steps, warmup) for c in (64, 256) for k in (4, 8)]
    lines = [
        "## Training throughput: project step vs plain PyTorch NextItNet (CPU)",
        "",
        f"`python benchmarks/throughput.py` — {platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, L=50, B=256, V={args.items}, full softmax, AdamW + clipping, "
        f"{2 * steps} timed steps each (two interleaved rounds).",
        "",
        "| C | blocks | project seq/s | plain seq/s | project targets/s | plain targets/s | project / plain |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['C']} | {r['blocks']} | {r['project_seq_s']:.0f} | {r['plain_seq_s']:.0f} | "
                     f"{r['project_tgt_s']:.0f} | {r['plain_tgt_s']:.0f} | {r['ratio']:.2f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("throughput", body)


if __name__ == "__main__":
    main()
