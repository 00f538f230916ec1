"""The README's first command, in miniature: `stackrec quickstart` through local Ray + DeepSpeed on
synthetic data (the real one downloads MovieLens-100K); its TensorBoard files are read back."""

import json

import pytest

from stackrec_dist.cli import main

pytestmark = pytest.mark.slow


def test_quickstart_runs_both_plans_and_tracks_them(ray_local, tmp_path, capsys):
    run = tmp_path / "qs"
    assert main(["quickstart", "--set", "prepare.source=synthetic", "--set", "prepare.synthetic_users=300",
                 "--set", "prepare.synthetic_items=60", "--set", f"data.path={tmp_path / 'data'}",
                 "--set", "model.num_blocks=4", "--set", "model.dim=16", "--set", "train.epochs=2",
                 "--set", "data.max_len=20", "--set", f"train.checkpoint_dir={run}",
                 "--set", f"distributed.storage_path={tmp_path / 'ray'}"]) == 0
    out = capsys.readouterr().out
    assert "StackRec 2->4" in out and "NextItNet-4 from scratch" in out and "wall / training" in out
    assert "growth to 4 blocks paused training" in out
    stacked = json.loads((run / "stacked" / "summary.json").read_text())
    assert [s["blocks"] for s in stacked["stages"]] == [2, 4, 4] and stacked["pauses"][0]["pause_s"] < 30
    from tests.train.test_tracking import read_events

    for plan, depths in (("stacked", [2.0, 4.0]), ("scratch", [4.0])):
        events = sorted((run / plan / "tensorboard").rglob("events.out.tfevents.*"))
        scalars, texts = read_events(events[0].parent)
        assert [d for _, d in scalars["model/depth"]] == depths
        assert scalars["valid/ndcg@5"] and all(0 <= v <= 1 for _, v in scalars["valid/ndcg@5"])
        assert "train/loss" in scalars and "train/sequences_per_s" in scalars
