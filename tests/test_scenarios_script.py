"""benchmarks/scenarios_ml1m.py without training: its tables and headline from finished runs'
summaries, and a failed run reported with its log."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("scenarios_ml1m", REPO / "benchmarks" / "scenarios_ml1m.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scenarios_ml1m"] = module
    spec.loader.exec_module(module)
    return module


def _summary(name: str, blocks: list[int], points: list[tuple[float, float]]) -> dict:
    """A run whose validation points are (wall_s, ndcg@5), one stage per depth change."""
    curve = [{"wall_s": t, "valid/ndcg@5": v, "blocks": b, "stage": f"train-{b}", "data_path": "d",
              "stage_start_s": 0.0} for (t, v), b in zip(points, blocks)]
    test = {f"{m}@{k}": 0.1 for m in ("mrr", "hr", "ndcg") for k in (5, 10, 20)}
    return {"name": name, "curve": curve, "test": test, "final_blocks": blocks[-1], "wall_s": points[-1][0],
            "train_s": points[-1][0] * 0.9, "steps": 100, "stages": [], "pauses": [],
            "config": {"plan": [{"name": f"train-{b}"} for b in sorted(set(blocks))]}}


def _write(runs: Path, name: str, summary: dict, load: tuple[float, float]) -> None:
    (runs / name).mkdir(parents=True)
    (runs / name / "summary.json").write_text(json.dumps(summary))
    (runs / name / "load.json").write_text(json.dumps({"before_1m": load[0], "after_1m": load[1]}))


def test_speedup_table_and_headline_from_finished_runs(script, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    # Baseline reaches its best (0.07) at 300 s; the stacked run first reaches 0.07 at 120 s.
    _write(runs, "ts-scratch-s0", _summary("b", [16] * 3, [(100, 0.05), (300, 0.07), (400, 0.069)]), (0.3, 1.1))
    _write(runs, "ts-stacked-s0", _summary("s", [4, 8, 16], [(40, 0.04), (120, 0.071), (200, 0.072)]), (0.2, 1.0))
    ts = next(s for s in script.SCENARIOS if s.name == "ts")
    text, figures = script._section(ts, [0, 1], runs, plots=False)
    assert figures["total"] == [pytest.approx(2.5)]
    assert "2.50x" in text and "Seed 1: not run." in text
    assert "`ts-scratch-s0` 0.30 -> 1.10" in text  # the load average printed beside the figures

    headline = tmp_path / "headline.json"
    headline.write_text(json.dumps({"nextitnet_test_ndcg10": 0.1}))
    monkeypatch.setattr(script, "HEADLINE", headline)
    script._headline({"ts": {"total": [2.5, None], "final": [2.5, None]}}, 1.1)
    head = json.loads(headline.read_text())
    # A seed that never reached the baseline's quality leaves the mean undefined rather than flattering it.
    assert head["ts_speedup"] is None and head["ts_speedup_seeds"] == [2.5, None]
    assert head["nextitnet_test_ndcg10"] == 0.1 and head["load_average_max"] == 1.1


def test_a_failed_run_names_its_log(script, tmp_path):
    with pytest.raises(SystemExit, match=r"\[bad\] failed \(exit \d+\); log: .*bad\.log"):
        script._run(tmp_path, "bad", str(tmp_path / "no-such-config.yaml"), 0, max_load=100.0, overrides=[])
    assert "no-such-config.yaml" in (tmp_path / "bad.log").read_text()
