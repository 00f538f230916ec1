"""``stackrec report``: a markdown table and validation-curve plots from scenario runs.

Speedup at equal quality, as the paper reports it: the baseline (trained from scratch at the
final depth) reaches its best validation NDCG@5 after ``t_base`` seconds; a stacked run's time
to quality is the first validation point at which it reaches the same value, ``t_run``; the
speedup is ``t_base / t_run``. A run that never reaches it gets no speedup ("not reached").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stackrec_dist.scenarios.plan import SUMMARY

METRIC = "valid/ndcg@5"


def load_summary(run: str | Path) -> dict[str, Any]:
    path = Path(run) / SUMMARY if Path(run).is_dir() else Path(run)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {SUMMARY}; was the run finished with `stackrec train`?")
    return json.loads(path.read_text())


def time_to_reach(curve: list[dict[str, float]], value: float, key: str = "wall_s") -> float | None:
    for point in curve:
        if point.get(METRIC, float("-inf")) >= value:
            return point[key]
    return None


def best_point(curve: list[dict[str, float]]) -> dict[str, float]:
    if not curve:
        raise ValueError("run has no validation points")
    return max(curve, key=lambda p: (p[METRIC], -p["wall_s"]))


def _training_data(run: dict[str, Any], point: dict[str, Any]) -> tuple[str, str]:
    """(dataset, training split) a validation point's stage trained on."""
    config = run.get("config", {})
    splits = {s["name"]: s.get("train_split") or "" for s in config.get("plan", [])}
    default_split = config.get("data", {}).get("train_split", "train")
    return point.get("data_path", ""), splits.get(point.get("stage", ""), "") or default_split


def final_data_points(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Validation points of the stages that trained on the run's final data: the final dataset
    (TF pre-training points are scored on the source domain) and training split (CL slices)."""
    curve = run["curve"]
    final = _training_data(run, curve[-1])
    return [p for p in curve if _training_data(run, p) == final]


def speedups(runs: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per run: time (total, and since its first stage on the final data) to reach the baseline's best."""
    base = best_point(final_data_points(runs[baseline]))
    target, t_base = base[METRIC], base["wall_s"]
    out = {}
    for name, run in runs.items():
        points = final_data_points(run)
        t = time_to_reach(points, target)
        t_final = None if t is None else t - points[0]["stage_start_s"] if "stage_start_s" in points[0] else t
        out[name] = {
            "target": target,
            "time_to_target_s": t,
            "time_on_final_data_s": t_final,
            "speedup": (t_base / t) if t else None,
            "speedup_final_data": (t_base / t_final) if t_final else None,
        }
    return out


def markdown_table(runs: dict[str, dict[str, Any]], baseline: str) -> str:
    ups = speedups(runs, baseline)
    target = next(iter(ups.values()))["target"]
    lines = [
        f"Speedup at equal quality: wall-clock for `{baseline}` to reach its best validation NDCG@5 "
        f"({target:.4f}) divided by each run's wall-clock to reach it.",
        "",
        "Runs that change data (CL slices, TF source -> target) are also timed from the start of "
        "their first stage on the final data (the 'final data' columns: the cost of producing the "
        "new model when the earlier one already exists).",
        "",
        "| run | blocks | MRR@5 | HR@5 | NDCG@5 | MRR@20 | HR@20 | NDCG@20 | wall-clock s | steps "
        "| time to target s | speedup | time to target on final data s | speedup (final data) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        t = run["test"]
        up = ups[name]
        reached = f"{up['time_to_target_s']:.0f}" if up["time_to_target_s"] is not None else "not reached"
        speed = f"{up['speedup']:.2f}x" if up["speedup"] else "-"
        reached_final = f"{up['time_on_final_data_s']:.0f}" if up["time_on_final_data_s"] is not None else "not reached"
        speed_final = f"{up['speedup_final_data']:.2f}x" if up["speedup_final_data"] else "-"
        lines.append(
            f"| {name} | {run['final_blocks']} | {t['mrr@5']:.4f} | {t['hr@5']:.4f} | {t['ndcg@5']:.4f} | "
            f"{t.get('mrr@20', float('nan')):.4f} | {t.get('hr@20', float('nan')):.4f} | {t.get('ndcg@20', float('nan')):.4f} | "
            f"{run['wall_s']:.0f} | {run['steps']} | {reached} | {speed} | {reached_final} | {speed_final} |"
        )
    return "\n".join(lines) + "\n" + overhead_table(runs)


def overhead_table(runs: dict[str, dict[str, Any]]) -> str:
    """Where each run's wall-clock went: training (steps and validations) vs worker start-up and
    growth pauses (summaries written before these fields existed are left out)."""
    rows = [(name, run) for name, run in runs.items() if "train_s" in run]
    if not rows:
        return ""
    lines = ["", "| run | wall-clock s | training s | wall / training | worker start-up s | growth pauses s |",
             "|---|---:|---:|---:|---:|---|"]
    for name, run in rows:
        startup = sum(s.get("startup_s", 0.0) for s in run["stages"])
        pauses = ", ".join(f"{p['pause_s']:.1f}" for p in run.get("pauses", [])) or "-"
        lines.append(f"| {name} | {run['wall_s']:.0f} | {run['train_s']:.0f} | {run['wall_s'] / run['train_s']:.2f} "
                     f"| {startup:.1f} | {pauses} |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        curve = run["curve"]
        ax.plot([p["wall_s"] for p in curve], [p[METRIC] for p in curve], marker="o", markersize=3, label=name)
        # Mark where the depth changed.
        for prev, point in zip(curve, curve[1:]):
            if point["blocks"] != prev["blocks"]:
                ax.axvline(point["wall_s"], color=ax.lines[-1].get_color(), alpha=0.2, linestyle="--")
    ax.set_xlabel("wall-clock (s)")
    ax.set_ylabel("validation NDCG@5")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    runs = {Path(r).name: load_summary(r) for r in args.runs}
    baseline = getattr(args, "baseline", None) or next(
        (n for n in runs if "scratch" in n or "baseline" in n), list(runs)[0]
    )
    if baseline not in runs:
        raise SystemExit(f"--baseline {baseline!r} is not one of the runs {list(runs)}")
    table = markdown_table(runs, baseline)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text(table)
    png = plot_curves(runs, output.with_suffix(".png"), title=output.name)
    print(table)
    print(f"wrote {output.with_suffix('.md')} and {png}")
    return 0
