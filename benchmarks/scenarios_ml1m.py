"""StackRec's three scenarios at convergence on RecBole's MovieLens-1M: TS, CL, TF, each against a
from-scratch model of the same final depth, timed one run after another on an idle machine.

Every run goes through the production path (`stackrec train` on a plan: embedded Ray, one
DeepSpeed worker) and trains each stage until validation NDCG@5 plateaus (`patience`) or its cap.
The speedup is the paper's: the baseline's wall-clock to its best validation NDCG@5 divided by the
stacked run's wall-clock to first reach that value (`stackrec report`). The load average is read
before and after every run and written beside its figures; a run that starts on a busy machine
(1-minute load above ``--max-load``) waits for it to calm down first.

    python benchmarks/scenarios_ml1m.py                        # prepare + every run (about 1.5 h on 2 cores)
    python benchmarks/scenarios_ml1m.py --only ts --seeds 0,1  # one scenario
    python benchmarks/scenarios_ml1m.py --from-runs            # tables from finished runs only

Writes docs/results.md (section ``scenarios``), the curves docs/results/<scenario>_ml1m_s<seed>.png
and the speedup fields of docs/results/headline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import write_section  # noqa: E402
from stackrec_dist.scenarios.report import (  # noqa: E402
    load_summary, markdown_table, plot_curves, speedups)

RESULTS = REPO / "docs" / "results.md"
HEADLINE = REPO / "docs" / "results" / "headline.json"
DEFAULT_RUNS = REPO / "runs" / "scenarios"

@dataclass
class Scenario:
    name: str
    title: str
    stacked: str  # config of the stacked plan
    baseline: str  # config of the from-scratch baseline of the same final depth
    seeded: bool = False  # repeated for every --seeds value (TS); else seed 0 only
    baseline_run: str = ""  # reuse another scenario's baseline run (same data, same config)


SCENARIOS = [
    Scenario("ts", "TS: NextItNet 4 -> 8 -> 16 vs NextItNet-16 from scratch", "configs/ml1m_ts.yaml",
             "configs/ml1m_ts_scratch.yaml", seeded=True),
    # The CL dataset's train/valid/test shards are byte-identical to ml-1m-recbole's (it only adds the
    # time slices), so its baseline is the TS baseline's seed-0 run.
    Scenario("cl", "CL: NextItNet 4 (D1) -> 8 (D1+D2) -> 16 (all) vs NextItNet-16 from scratch on all",
             "configs/ml1m_cl.yaml", "configs/ml1m_ts_scratch.yaml", baseline_run="ts-scratch-s0"),
    Scenario("tf", "TF: NextItNet 4 -> 8 -> 16 on the source users, new head, fine-tuned on the target "
             "users vs NextItNet-16 from scratch on the target", "configs/ml1m_tf.yaml",
             "configs/ml1m_tf_scratch.yaml"),
    Scenario("ts-sasrec", "TS: SASRec 1 -> 2 vs SASRec-2 from scratch", "configs/ml1m_ts_sasrec.yaml",
             "configs/ml1m_ts_sasrec_scratch.yaml", seeded=True),
]


PROTOCOL = (
    "Data: RecBole's MovieLens-1M (ratings >= 3, 10-core: 6,033 users, 3,123 items), leave-last-out, "
    "every item ranked. NextItNet C=64, dilations [1, 4], L=50, B=128 non-overlapping windows; training "
    "loss a sampled softmax (1,024 negatives drawn from item frequency ** 0.75, log-Q corrected), "
    "validation and test a full ranking. AdamW, clip 1.0, peak lr 2e-3 after 200 warm-up steps, cosine "
    "to 0.1x. TS (`optim.schedule: plan`): one curve over the plan's 20 epochs, the baseline's; the "
    "shallow stages have fixed budgets (NextItNet 4 blocks 12 epochs, 8 blocks 4; SASRec 1 block 12), "
    "grown models continue at the rate the curve has reached, ramped over 50 steps. CL and TF "
    "(`optim.schedule: stage`): each train stage warms up and decays over its own epoch cap, grown and "
    "fine-tuning stages peaking at 5e-4 (warm-up 50). A final stage or baseline ends when validation "
    "NDCG@5 (every 75 steps; TF target: every 25) has not improved for `patience` validations (6; 8 on "
    "the TF target; CL and TF shallow stages 4) or at its cap; a grow stacks the stage's final "
    "weights (adjacent, `zero_new` alphas: the grown model computes the same function). Every run is "
    "`stackrec train` on its config: an embedded Ray, one DeepSpeed worker (ZeRO-0, CPU fp32, 2 torch "
    "threads), so wall-clock includes Ray and worker start-up. Runs go one after another, each "
    "started only once the 1-minute load average is <= 1.0 (a run itself holds it near 2: two "
    "threads); nothing else ran on the machine. Speedup: the baseline's wall-clock to its best "
    "validation NDCG@5 / the stacked run's wall-clock to first reach that value; 'final data' times "
    "start at the stacked run's first stage on the final data (CL: all data; TF: the target).")


def _load() -> float:
    return os.getloadavg()[0]


def _wait_quiet(max_load: float, timeout_s: float = 600.0) -> None:
    start = time.time()
    while _load() > max_load and time.time() - start < timeout_s:
        print(f"  load {_load():.2f} > {max_load}: waiting for a quiet machine", flush=True)
        time.sleep(30)


def _prepare(configs: list[str]) -> None:
    """Each config's own ``prepare:`` section (RecBole's filtering plus the scenario's cut), once."""
    from stackrec_dist.config import load_config

    for config in configs:
        output = load_config(REPO / config).prepare.output
        if not (REPO / output / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "stackrec_dist.cli", "prepare", "--config", config], cwd=REPO, check=True)


def _run(runs: Path, run: str, config: str, seed: int, max_load: float, overrides: list[str]) -> None:
    out = runs / run
    cmd = [sys.executable, "-m", "stackrec_dist.cli", "train", "--config", config,
           "--set", f"name={run}", "--set", f"train.checkpoint_dir={out}",
           "--set", f"train.seed={seed}", "--set", f"data.seed={seed}", "--set", "train.progress=false",
           "--set", f"distributed.storage_path={out / 'ray'}"]
    for kv in overrides:
        cmd += ["--set", kv]
    _wait_quiet(max_load)
    before = os.getloadavg()
    print(f"[{run}] load {before[0]:.2f}: {' '.join(cmd[2:])}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with (out.parent / f"{run}.log").open("w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    after = os.getloadavg()
    if rc != 0:
        raise SystemExit(f"[{run}] failed (exit {rc}); log: {out.parent / f'{run}.log'}")
    (out / "load.json").write_text(json.dumps({"before_1m": before[0], "after_1m": after[0],
                                               "before_5m": before[1], "after_5m": after[1],
                                               "command_s": time.time() - t0}) + "\n")
    print(f"[{run}] done in {time.time() - t0:.0f} s, load after {after[0]:.2f}", flush=True)


def _pairs(scenario: Scenario, seeds: list[int]) -> list[tuple[int, str, str]]:
    """(seed, baseline run name, stacked run name) of a scenario."""
    return [(s, scenario.baseline_run or f"{scenario.name}-scratch-s{s}", f"{scenario.name}-stacked-s{s}")
            for s in (seeds if scenario.seeded else [0])]


def _load_figures(runs: Path, run: str) -> dict:
    path = runs / run / "load.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _section(scenario: Scenario, seeds: list[int], runs_dir: Path, plots: bool) -> tuple[str, dict]:
    """The scenario's markdown (one table per seed) and its speedups; ``plots``: also draw the curves."""
    lines, figures = [f"### {scenario.title}", "",
                      f"`{scenario.stacked}` vs `{scenario.baseline}`.", ""], {"total": [], "final": []}
    for seed, base, stacked in _pairs(scenario, seeds):
        if not all((runs_dir / r / "summary.json").exists() for r in (base, stacked)):
            lines += [f"Seed {seed}: not run.", ""]
            continue
        runs = {stacked: load_summary(runs_dir / stacked), base: load_summary(runs_dir / base)}
        ups = speedups(runs, base)[stacked]
        figures["total"].append(ups["speedup"])
        figures["final"].append(ups["speedup_final_data"])
        if plots:
            plot_curves(runs, REPO / "docs" / "results" / f"{scenario.name}_ml1m_s{seed}.png",
                        title=f"{scenario.name} seed {seed}")
        loads = ", ".join(f"`{r}` {f['before_1m']:.2f} -> {f['after_1m']:.2f}"
                          for r in (base, stacked) if (f := _load_figures(runs_dir, r)))
        lines += [f"**Seed {seed}** (1-minute load average before -> after: {loads}; "
                  f"curves: `docs/results/{scenario.name}_ml1m_s{seed}.png`)", "",
                  markdown_table(runs, base), ""]
    return "\n".join(lines), figures


def _mean(xs: list) -> float | None:
    """Mean of the seeds' speedups; None when any seed did not reach the baseline's quality."""
    return statistics.mean(xs) if xs and all(x is not None for x in xs) else None


def _headline(figures: dict[str, dict], max_load: float | None) -> None:
    head = json.loads(HEADLINE.read_text()) if HEADLINE.exists() else {}
    ts = figures.get("ts", {})
    cl = figures.get("cl", {})
    tf = figures.get("tf", {})

    def first(xs):
        return xs[0] if xs else None

    if ts:
        head["ts_speedup"] = _mean(ts["total"])
        head["ts_speedup_seeds"] = ts["total"]
    if cl:
        head["cl_speedup"] = first(cl["final"])
        head["cl_speedup_total"] = first(cl["total"])
    if tf:
        head["tf_speedup_finetune"] = first(tf["final"])
        head["tf_speedup_total"] = first(tf["total"])
    if "ts-sasrec" in figures:
        head["sasrec_ts_speedup_seeds"] = figures["ts-sasrec"]["total"]
    head["load_average_max"] = max_load
    HEADLINE.write_text(json.dumps(head, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(s.name for s in SCENARIOS), help="scenarios, comma-separated")
    ap.add_argument("--seeds", default="0,1", help="seeds of the seeded scenarios (TS)")
    ap.add_argument("--max-load", type=float, default=0.8, help="1-minute load above which a run waits")
    ap.add_argument("--from-runs", action="store_true", help="no training: tables from runs/scenarios/")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field of every run (smoke runs: --set train.max_steps=20)")
    ap.add_argument("--runs-dir", default=str(DEFAULT_RUNS), help="where the runs go (default runs/scenarios)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    runs_dir = Path(args.runs_dir).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [s for s in SCENARIOS if s.name in args.only.split(",")]
    if not args.from_runs:
        for scenario in wanted:
            _prepare([scenario.stacked, scenario.baseline])
            for seed, base, stacked in _pairs(scenario, seeds):
                # Alternate the order by seed so that a slow drift of the machine does not favour one side.
                order = [(base, scenario.baseline), (stacked, scenario.stacked)]
                for run, config in (order if seed % 2 == 0 else order[::-1]):
                    if not (runs_dir / run / "summary.json").exists():
                        _run(runs_dir, run, config, seed, args.max_load, args.overrides)
    texts, figures, loads = [], {}, []
    for scenario in SCENARIOS:
        text, figs = _section(scenario, seeds, runs_dir, plots=not args.no_write)
        texts.append(text)
        if figs["total"]:
            figures[scenario.name] = figs
        for seed, base, stacked in _pairs(scenario, seeds):
            loads += [v for r in (base, stacked) for k, v in _load_figures(runs_dir, r).items() if k.endswith("_1m")]
    body = "\n".join(["## TS, CL, TF at convergence on RecBole's MovieLens-1M (issue 11)", "",
                      "```bash", "python benchmarks/scenarios_ml1m.py   # prepares, then runs every pair alone", "```",
                      "", PROTOCOL, ""] + texts)
    print(body)
    if not args.no_write:
        write_section("scenarios", body, RESULTS)
        _headline(figures, max(loads) if loads else None)


if __name__ == "__main__":
    main()
