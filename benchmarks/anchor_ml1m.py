"""The quality anchor on MovieLens-1M: our models trained to convergence vs RecBole's published numbers.

Trains each anchor config from scratch to its early stop (validation NDCG@5, ``train.patience``),
one after the other, then writes the table into docs/results.md (section ``anchor``) and the test
NDCG@10 figures into docs/results/headline.json. Quality only: the runs may share the machine,
and no wall-clock from them is reported as a speed figure.

    python benchmarks/anchor_ml1m.py                       # prepare + the three runs (about 1-2 h on 2 cores)
    python benchmarks/anchor_ml1m.py --from-logs runs/     # tables from finished runs' logs only

Data: configs/ml1m_recbole.yaml (RecBole's filtering: ratings >= 3, 10-core until stable,
leave-last-out, all items ranked). Published numbers: RecBole's sequential benchmark on ML-1M
(max length 50, cross-entropy, embedding 64).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import write_section  # noqa: E402

RESULTS = REPO / "docs" / "results.md"
HEADLINE = REPO / "docs" / "results" / "headline.json"

NEXTITNET = {"ndcg@10": 0.1220, "hr@10": 0.2239, "mrr@10": 0.0911}
SASREC = {"ndcg@10": 0.1286, "hr@10": 0.2468}


def _variant(name: str, **overrides: object) -> list[str]:
    return [f"name=ml1m-anchor-{name}", f"train.checkpoint_dir=runs/ml1m-anchor-{name}"] + [
        f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]


# (run name, label, config, overrides, published test metrics)
RUNS = [
    ("nextitnet4", "NextItNet-4", "configs/ml1m_anchor_nextitnet4.yaml", [], NEXTITNET),
    ("nextitnet4s25", "NextItNet-4, stride 25", "configs/ml1m_anchor_nextitnet4.yaml",
     _variant("nextitnet4s25", data__window_stride=25), NEXTITNET),
    ("nextitnet16", "NextItNet-16", "configs/ml1m_anchor_nextitnet4.yaml",
     _variant("nextitnet16", model__num_blocks=16, train__epochs=20), NEXTITNET),
    ("nextitnet16s25", "NextItNet-16, stride 25", "configs/ml1m_anchor_nextitnet4.yaml",
     _variant("nextitnet16s25", model__num_blocks=16, train__epochs=20, data__window_stride=25), NEXTITNET),
    ("sasrec2", "SASRec-2", "configs/ml1m_anchor_sasrec2.yaml", [], SASREC),
    ("sasrec2s25", "SASRec-2, stride 25", "configs/ml1m_anchor_sasrec2.yaml",
     _variant("sasrec2s25", data__window_stride=25), SASREC),
]


def _result(log: Path) -> dict | None:
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("STACKREC_RESULT ")] if log.exists() else []
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else None


def _train(name: str, config: str, overrides: list[str], logs: Path) -> None:
    cmd = [sys.executable, "-m", "stackrec_dist.cli", "train", "--config", config, "--set", "train.progress=false"]
    for kv in overrides:
        cmd += ["--set", kv]
    log = logs / f"anchor-{name}.log"
    print(f"[{name}] {' '.join(cmd[2:])} > {log}", flush=True)
    with log.open("w") as out:
        rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"[{name}] failed (exit {rc}); log: {log}")


def _table(results: dict[str, dict]) -> str:
    lines = [
        "## The quality anchor: MovieLens-1M at convergence vs RecBole (issue 11)",
        "",
        "```bash",
        "stackrec prepare --config configs/ml1m_recbole.yaml",
        "python benchmarks/anchor_ml1m.py      # runs the three trainings below, one after the other",
        "```",
        "RecBole's ML-1M filtering (`configs/ml1m_recbole.yaml`: ratings >= 3, then 10-core on users and items "
        "until stable = 6,033 users / 3,123 items / 834,449 interactions; RecBole counts its pad token too: "
        "6,034 / 3,124), leave-last-out, all 3,123 items ranked, L=50, C=64, full softmax (cross-entropy). "
        "Each run trains from scratch until validation NDCG@5 has not improved for `train.patience` = 5 "
        "validations (one per epoch) or its epoch cap (40 epochs; NextItNet-16: 20), then the best weights "
        "are tested. AdamW lr 2e-3 (warm-up 200 steps, cosine over the epoch cap to 0.1x), B=128 windows, "
        "clip 1.0; SASRec: 2 heads, dropout 0.2. Windows: by default a sequence is cut into non-overlapping "
        "windows of L transitions, so a target sees 0-49 items of history; with stride 25 "
        "(`data.window_stride=25`) every target sees at least 25 (RecBole trains each target with up to 50) "
        "and an epoch has 1.84x the windows. Single process "
        "(the world-size-1 case of the same training loop the Ray path runs), CPU fp32. Quality only: these "
        "runs shared the machine, so no time from them is a speed figure.",
        "",
        "| model | ours: test NDCG@10 | HR@10 | MRR@10 | NDCG@5 | published (RecBole) NDCG@10 | HR@10 | MRR@10 "
        "| ours / published NDCG@10 | best valid NDCG@5 (at step) | steps run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label, _, _, pub in RUNS:
        r = results.get(name)
        if r is None:
            mrr = f"{pub['mrr@10']:.4f}" if "mrr@10" in pub else "n/a"
            lines.append(f"| {label} | not run | | | | {pub['ndcg@10']:.4f} | {pub['hr@10']:.4f} | {mrr} | | | |")
            continue
        mrr_pub = f"{pub['mrr@10']:.4f}" if "mrr@10" in pub else "n/a"
        lines.append(
            f"| {label}{' (see below)' if r.get('note') else ''} | **{r['test/ndcg@10']:.4f}** | {r['test/hr@10']:.4f} | {r['test/mrr@10']:.4f} "
            f"| {r['test/ndcg@5']:.4f} | {pub['ndcg@10']:.4f} | {pub['hr@10']:.4f} | {mrr_pub} "
            f"| {r['test/ndcg@10'] / pub['ndcg@10']:.2f} | {r['best_valid_ndcg@5']:.4f} ({r['best_step']}) "
            f"| {r['steps']} |")
    notes = [f"- {label}: {results[name]['note']}." for name, label, *_ in RUNS
             if name in results and results[name].get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def _headline(results: dict[str, dict]) -> None:
    head = json.loads(HEADLINE.read_text()) if HEADLINE.exists() else {}
    keys = ("nextitnet_test_ndcg10", "sasrec_test_ndcg10", "ts_speedup", "ts_speedup_seeds", "cl_speedup",
            "tf_speedup_finetune", "tf_speedup_total", "load_average_max")
    head = {k: head.get(k) for k in keys} | {k: v for k, v in head.items() if k not in keys}
    for key, prefix in (("nextitnet_test_ndcg10", "nextitnet"), ("sasrec_test_ndcg10", "sasrec")):
        scores = [r["test/ndcg@10"] for n, r in results.items() if n.startswith(prefix)]
        if scores:  # the best configuration of the family: what the anchor table compares
            head[key] = max(scores)
    HEADLINE.parent.mkdir(parents=True, exist_ok=True)
    HEADLINE.write_text(json.dumps(head, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from-logs", default="", help="a folder with anchor-<run>.log files: no training")
    ap.add_argument("--runs", default=",".join(r[0] for r in RUNS), help="which runs, comma-separated")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    logs = Path(args.from_logs or REPO / "runs")
    logs.mkdir(parents=True, exist_ok=True)
    wanted = set(args.runs.split(","))
    if not args.from_logs:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        for name, _, config, overrides, _ in RUNS:
            if name in wanted:
                _train(name, config, overrides, logs)
    results = {name: r for name, *_ in RUNS if name in wanted and (r := _result(logs / f"anchor-{name}.log"))}
    text = _table(results)
    print(text)
    if not args.no_write:
        write_section("anchor", text, RESULTS)
        _headline(results)


if __name__ == "__main__":
    main()
