"""RunTracker: TensorBoard event files written and read back (local and through the S3 server),
the optional MLflow sink behind a lazy import, and the disabled (non-rank-0) no-op."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from stackrec_dist.config import ConfigError, TrackingConfig, load_config
from stackrec_dist.train.tracking import DEPTH_TAG, STAGE_TAG, RunTracker, mlflow_metric_name

pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install tensorboard)")


def read_events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    return scalars, texts


def log_a_run(tracker: RunTracker) -> None:
    tracker.log_stage(0, "train-2", depth=2)
    for step in (10, 20):
        tracker.log_scalars(step, {"train/loss": 5.0 - step / 10, "train/lr": 1e-3 * step / 20,
                                   "train/sequences_per_s": 800.0 + step})
    tracker.log_scalars(20, {"valid/ndcg@5": 0.125, "valid/hr@10": 0.25})
    tracker.log_scalars(20, {"growth/pause_s": 3.5})
    tracker.log_stage(20, "train-4", depth=4)
    tracker.log_scalars(30, {"train/loss": 2.5})


def check_run(run_dir: Path) -> None:
    scalars, texts = read_events(run_dir)
    assert scalars["train/loss"] == [(10, 4.0), (20, 3.0), (30, 2.5)]
    assert scalars["train/lr"] == [(10, pytest.approx(5e-4)), (20, pytest.approx(1e-3))]
    assert scalars["train/sequences_per_s"] == [(10, 810.0), (20, 820.0)]
    assert scalars["valid/ndcg@5"] == [(20, 0.125)] and scalars["valid/hr@10"] == [(20, 0.25)]
    assert scalars["growth/pause_s"] == [(20, 3.5)]
    assert scalars[DEPTH_TAG] == [(0, 2.0), (20, 4.0)]
    assert texts[f"{STAGE_TAG}/text_summary"] == [(0, "train-2"), (20, "train-4")]


def test_tensorboard_scalars_and_stages_read_back(tmp_path):
    cfg = TrackingConfig().with_default_dir(str(tmp_path / "ckpt"))
    assert cfg.dir == f"{tmp_path}/ckpt/tensorboard"
    tracker = RunTracker.create(cfg, "ml1m-ts", enabled=True)
    assert tracker.enabled and tracker.log_dir == tmp_path / "ckpt" / "tensorboard" / "ml1m-ts"
    log_a_run(tracker)
    tracker.flush()
    check_run(tracker.log_dir)  # readable after flush, before close
    tracker.close()
    tracker.close()  # idempotent
    tracker.log_scalars(40, {"train/loss": 1.0})  # after close: ignored
    check_run(tmp_path / "ckpt" / "tensorboard" / "ml1m-ts")


def test_disabled_tracker_is_a_noop(tmp_path):
    cfg = TrackingConfig(dir=str(tmp_path / "tb"))
    for tracker in (RunTracker.create(cfg, "r", enabled=False),
                    RunTracker.create(TrackingConfig(tensorboard=False), "r", enabled=True)):
        assert not tracker.enabled and tracker.log_dir is None
        log_a_run(tracker)
        tracker.log_scalars(1, {"bad": object()})  # not even validated: nothing is done
        tracker.flush()
        tracker.close()
    assert not (tmp_path / "tb").exists()


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="with_default_dir"):
        RunTracker.create(TrackingConfig(), "r", enabled=True)
    with pytest.raises(ConfigError, match="run name"):
        RunTracker.create(TrackingConfig(dir=str(tmp_path)), "a/b", enabled=True)
    with RunTracker.create(TrackingConfig(dir=str(tmp_path)), "r", enabled=True) as tracker:
        with pytest.raises(TypeError, match="'train/loss' must be a number"):
            tracker.log_scalars(1, {"train/loss": "high"})


def test_tracking_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  checkpoint_dir: s3://bucket/runs/a\ntracking:\n  mlflow_uri: http://mlflow:5000\n")
    cfg = load_config(path, ["tracking.tensorboard=false"])
    assert cfg.tracking == TrackingConfig(tensorboard=False, mlflow_uri="http://mlflow:5000")
    assert cfg.tracking.with_default_dir(cfg.train.checkpoint_dir).dir == "s3://bucket/runs/a/tensorboard"
    assert TrackingConfig(dir="x").with_default_dir("y").dir == "x"


def test_missing_packages_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError, installed or not
    with pytest.raises(ConfigError, match="pip install mlflow"):
        RunTracker.create(TrackingConfig(tensorboard=False, mlflow_uri=str(tmp_path / "mlruns")), "r", enabled=True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        RunTracker.create(TrackingConfig(dir=str(tmp_path)), "r", enabled=True)


def test_mlflow_sink_through_its_client_api(tmp_path, monkeypatch):
    """The MLflow sink against a stand-in for the two MLflow names it uses (MLflow is an optional
    extra, not installed here): names sanitised, non-finite values dropped, run terminated."""
    calls = []

    class Metric:
        def __init__(self, key, value, timestamp, step):
            self.key, self.value, self.step = key, value, step

    class MlflowClient:
        def __init__(self, tracking_uri):
            calls.append(("uri", tracking_uri))

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name):
            calls.append(("experiment", name))
            return "7"

        def create_run(self, experiment_id, run_name):
            calls.append(("run", experiment_id, run_name))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))

        def log_batch(self, run_id, metrics):
            calls.append(("metrics", run_id, [(m.key, m.value, m.step) for m in metrics]))

        def set_tag(self, run_id, key, value):
            calls.append(("tag", key, value))

        def set_terminated(self, run_id):
            calls.append(("end", run_id))

    mlflow = types.ModuleType("mlflow")
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "mlflow.entities", types.SimpleNamespace(Metric=Metric))
    monkeypatch.setitem(sys.modules, "mlflow.tracking", types.SimpleNamespace(MlflowClient=MlflowClient))
    cfg = TrackingConfig(dir=str(tmp_path / "tb"), mlflow_uri="http://127.0.0.1:5000", mlflow_experiment="exp")
    with RunTracker.create(cfg, "run-a", enabled=True) as tracker:
        tracker.log_scalars(5, {"valid/ndcg@5": 0.5, "train/loss": float("nan")})
        tracker.log_stage(5, "grow-4", depth=4)
    assert calls == [("uri", "http://127.0.0.1:5000"), ("experiment", "exp"), ("run", "7", "run-a"),
                     ("metrics", "run-1", [("valid/ndcg_at_5", 0.5, 5)]), ("tag", "stage", "grow-4"),
                     ("metrics", "run-1", [("model/depth", 4.0, 5)]), ("end", "run-1")]
    assert mlflow_metric_name("a b/c-d.e:f@g#h") == "a b/c-d.e:f_at_g_h"
    scalars, _ = read_events(tmp_path / "tb" / "run-a")  # TensorBoard kept the original tags
    assert scalars["valid/ndcg@5"] == [(5, 0.5)]


@pytest.mark.slow
def test_tensorboard_to_s3(s3_server, s3_fs, s3_dataset_root, tmp_path):
    cfg = TrackingConfig(storage_options=s3_server.storage_options).with_default_dir(f"{s3_dataset_root}/ckpt")
    tracker = RunTracker.create(cfg, "run-s3", enabled=True)
    local = tracker.log_dir
    log_a_run(tracker)
    tracker.flush()
    remote = f"{s3_dataset_root}/ckpt/tensorboard/run-s3".removeprefix("s3://")
    s3_fs.invalidate_cache()
    assert len(s3_fs.ls(remote)) == 1  # uploaded at flush, before close
    tracker.close()
    assert not local.exists()  # the temp mirror is removed at close
    s3_fs.invalidate_cache()
    [event_file] = s3_fs.ls(remote)
    s3_fs.get_file(event_file, str(tmp_path / Path(event_file).name))
    check_run(tmp_path)
