"""Stacking variants compared under one budget: adjacent vs cross, alpha policies, copy vs re-init.

Each variant is the same TS plan (train k blocks, grow to 2k, continue) on the same prepared
dataset with the same seed and step budget; the from-scratch 2k-block model is the baseline.
Reported: final test NDCG@5 / HR@5, best validation NDCG@5, and the speedup at equal quality
(see stackrec_dist/scenarios/report.py). Writes a table to docs/results.md's ``growth-policies``
section and the runs under runs/policies/.

    python benchmarks/growth_policies.py --data runs/data/ml-1m --blocks 2 --steps 150
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stackrec_dist.config import config_from_dict
from stackrec_dist.scenarios.plan import run_plan
from stackrec_dist.scenarios.report import load_summary, markdown_table

from common import write_section

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"

VARIANTS = {
    "adjacent-zero_new": {"method": "adjacent", "alpha_policy": "zero_new"},
    "adjacent-reset": {"method": "adjacent", "alpha_policy": "reset"},
    "adjacent-copy": {"method": "adjacent", "alpha_policy": "copy"},
    "cross-zero_new": {"method": "cross", "alpha_policy": "zero_new"},
    "cross-reset": {"method": "cross", "alpha_policy": "reset"},
    "adjacent-reset-reinit (authors' code)": {"method": "adjacent", "alpha_policy": "reset",
                                              "copy_layernorm": False, "copy_head": False,
                                              "dilations": "position"},
}


def job(args, name: str, plan: list[dict], blocks: int, growth: dict | None = None):
    return config_from_dict({
        "name": name,
        "data": {"path": args.data, "max_len": 50, "batch_size": args.batch_size},
        "model": {"dim": 64, "num_blocks": blocks},
        "optim": {"lr": args.lr, "warmup_steps": 30},
        "growth": growth or {},
        "train": {"eval_every": args.eval_every, "patience": 0, "progress": False, "threads": args.threads,
                  "checkpoint_dir": str(Path(args.out) / name.replace(" ", "_").replace("'", ""))},
        "plan": plan,
    })


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="runs/data/ml-1m")
    parser.add_argument("--blocks", type=int, default=2, help="depth before growth (after: 2x)")
    parser.add_argument("--steps", type=int, default=150, help="steps per stage (baseline: 2x)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/policies")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args(argv)
    k, deep = args.blocks, 2 * args.blocks
    runs = {}
    baseline = f"scratch-{deep}"
    cfg = job(args, baseline, [{"name": f"train-{deep}", "action": "train", "max_steps": 2 * args.steps}], deep)
    run_plan(cfg)
    runs[baseline] = load_summary(cfg.train.checkpoint_dir)
    for name, growth in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        plan = [{"name": f"train-{k}", "action": "train", "max_steps": args.steps},
                {"name": f"grow-{deep}", "action": "grow"},
                {"name": f"train-{deep}", "action": "train", "max_steps": args.steps}]
        cfg = job(args, name, plan, k, growth)
        run_plan(cfg)
        runs[name] = load_summary(cfg.train.checkpoint_dir)
        print(name, json.dumps(runs[name]["test"]))
    body = "\n".join([
        f"## Stacking variants ({Path(args.data).name}, {k} -> {deep} blocks)",
        "",
        f"`python benchmarks/growth_policies.py --data {args.data} --blocks {k} --steps {args.steps}`: "
        f"every stacked run trains {k} blocks for {args.steps} steps, grows, and trains {deep} blocks for "
        f"{args.steps} steps; the baseline trains {deep} blocks from scratch for {2 * args.steps} steps. "
        f"B={args.batch_size}, L=50, C=64, AdamW lr={args.lr} (restarted after growth, as in the paper), "
        "full softmax, validation every "
        f"{args.eval_every} steps. Test metrics are of the final model (leave-last-out).",
        "",
        markdown_table(runs, baseline),
    ])
    print(body)
    write_section("growth-policies", body, RESULTS)


if __name__ == "__main__":
    main()
