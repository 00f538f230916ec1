import json

import pytest

from stackrec_dist.cli import main


def _result(capsys) -> dict:
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("STACKREC_RESULT ")]
    return json.loads(lines[-1].split(" ", 1)[1])


def _common(tmp_path, dataset):
    return ["--set", f"data.path={dataset}", "--set", "data.max_len=20", "--set", "data.batch_size=32",
            "--set", "model.dim=16", "--set", "model.num_blocks=2", "--set", "train.progress=false",
            "--set", f"train.checkpoint_dir={tmp_path / 'run'}", "--set", "eval.batch_size=128"]


def test_prepare_train_grow_evaluate(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["prepare", "--set", "prepare.source=synthetic", "--set", f"prepare.output={data}",
                 "--set", "prepare.synthetic_users=200", "--set", "prepare.synthetic_items=40"]) == 0
    common = _common(tmp_path, data)
    assert main(["train", *common, "--set", "train.max_steps=12", "--set", "train.eval_every=6"]) == 0
    trained = _result(capsys)
    assert trained["steps"] == 12 and 0 <= trained["test/ndcg@5"] <= 1 and trained["test/count"] == 200
    assert main(["grow", *common, "--checkpoint", str(tmp_path / "run" / "best"),
                 "--output", str(tmp_path / "grown")]) == 0
    assert _result(capsys) == {"blocks": 4, "parent_blocks": 2, "output": str(tmp_path / "grown")}
    assert main(["evaluate", *common, "--checkpoint", str(tmp_path / "grown"), "--split", "test"]) == 0
    grown = _result(capsys)
    # zero_new growth preserves the function: same test metrics as the parent.
    assert grown["test/ndcg@5"] == pytest.approx(trained["test/ndcg@5"], abs=1e-9)


def test_ts_plan_and_report(tmp_path, tiny_dataset, capsys):
    common = _common(tmp_path, tiny_dataset)
    plan = ("plan=[{name: train-2, action: train, max_steps: 8}, {name: grow-4, action: grow}, "
            "{name: train-4, action: train, max_steps: 8}]")
    assert main(["train", *common, "--set", plan, "--set", "train.eval_every=4",
                 "--set", f"train.checkpoint_dir={tmp_path / 'stacked'}"]) == 0
    stacked = _result(capsys)
    assert stacked["final_blocks"] == 4 and stacked["steps"] == 16
    assert stacked["device"] == "cpu" and stacked["precision"] == "fp32"
    # TensorBoard: one step axis for the plan, the depth change, the stage names and the growth pause.
    from tests.train.test_tracking import read_events

    runs = [p.parent for p in (tmp_path / "stacked" / "tensorboard").rglob("events.out.tfevents.*")]
    scalars, texts = read_events(runs[0])
    assert [s for s, _ in scalars["valid/ndcg@5"]] == [4, 8, 12, 16]
    assert scalars["model/depth"] == [(0, 2.0), (8, 4.0)]
    assert [t for _, t in texts["stage/text_summary"]] == ["train-2", "train-4"]
    assert len(scalars["growth/pause_s"]) == 1 and 0 < scalars["growth/pause_s"][0][1] < 30
    scratch_plan = "plan=[{name: train-4, action: train, max_steps: 16}]"
    assert main(["train", *common, "--set", scratch_plan, "--set", "model.num_blocks=4", "--set",
                 "train.eval_every=4", "--set", f"train.checkpoint_dir={tmp_path / 'scratch'}"]) == 0
    capsys.readouterr()
    out = tmp_path / "report" / "ts"
    assert main(["report", str(tmp_path / "stacked"), str(tmp_path / "scratch"), "--baseline", "scratch",
                 "--output", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    assert "| stacked | 4 |" in table and "| scratch | 4 |" in table
    assert out.with_suffix(".png").stat().st_size > 1000


def test_config_error_names_the_field(capsys):
    assert main(["config", "--set", "optim.lr=-1"]) == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err


def test_data_error_names_the_file(tmp_path, capsys):
    assert main(["train", "--set", f"data.path={tmp_path / 'missing'}", "--set", "train.progress=false",
                 "--set", "model.num_items=10"]) == 3
    assert str(tmp_path / "missing") in capsys.readouterr().err
