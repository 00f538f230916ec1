"""Faults met while training, through the real CLI, single process and on Ray workers: a run that
cannot train (exit 7), a checkpoint of another catalogue (exit 4), bad rows met inside a worker
(exit 3). One line each, never a hang, never Ray's wall of worker errors."""

from __future__ import annotations

import pytest

from tests.errors.conftest import assert_one_line, run_cli, write_job
from tests.errors.test_data_errors import _put_null_sequence

TRAINING, CHECKPOINT, DATA = 7, 4, 3


def _too_short_dataset(tmp_path):
    """Every user has exactly the minimum 3 items: leave-last-out keeps one training item each,
    so the training split has no (history, next item) pair."""
    raw = tmp_path / "raw.csv"
    raw.write_text("user,item,timestamp\n" + "".join(f"u{u},i{(u + k) % 7},{k}\n" for u in range(20) for k in range(3)))
    res = run_cli("prepare", "--set", f"prepare.source={raw}", "--set", f"prepare.output={tmp_path / 'short'}",
                  "--set", "prepare.num_shards=1", tmp_path=tmp_path)
    assert res.code == 0, res.stderr[-2000:]
    return tmp_path / "short"


def _ray(tmp_path) -> dict:
    return {"distributed": {"num_workers": 1, "storage_path": str(tmp_path / "ray")}}


def test_an_epoch_without_a_window_ends_in_one_line(tmp_path):
    data = _too_short_dataset(tmp_path)
    res = run_cli("train", "--config", str(write_job(tmp_path, data)), tmp_path=tmp_path, timeout=60)
    assert_one_line(res, TRAINING, "training", "yielded no training window", str(data))


@pytest.mark.slow  # starts Ray and a DeepSpeed worker in a subprocess
def test_an_epoch_without_a_window_on_ray_workers(tmp_path):
    data = _too_short_dataset(tmp_path)
    res = run_cli("train", "--config", str(write_job(tmp_path, data, **_ray(tmp_path))), tmp_path=tmp_path,
                  timeout=180)
    assert_one_line(res, TRAINING, "training", "yielded no training window")
    assert "WorkerGroupError" not in res.stderr


@pytest.mark.slow
def test_null_sequence_met_inside_a_ray_worker(dataset, tmp_path):
    _put_null_sequence(dataset, "train", row=5)
    job = write_job(tmp_path, dataset, train={"max_steps": 0, "epochs": 1}, **_ray(tmp_path))  # reach the row
    res = run_cli("train", "--config", str(job), tmp_path=tmp_path, timeout=180)
    assert_one_line(res, DATA, "data", "train/part-00000.parquet row group 0 row 5 field item_ids: null sequence")


@pytest.mark.slow  # prepares a second dataset and trains in subprocesses
def test_a_checkpoint_of_another_catalogue_is_refused_everywhere(corpus_source, tmp_path):
    from tests.fixtures.datasets import make_synthetic_dataset

    trained = run_cli("train", "--config", str(write_job(tmp_path, corpus_source)), tmp_path=tmp_path)
    assert trained.code == 0, trained.stderr[-2000:]
    other = make_synthetic_dataset(tmp_path / "other", users=60, items=35)
    job = str(write_job(tmp_path, other, train={"checkpoint_dir": str(tmp_path / "ckpt2")}))
    last = str(tmp_path / "ckpt" / "last")
    for command in (["evaluate", "--checkpoint", last], ["grow", "--checkpoint", last, "--output", str(tmp_path / "g")],
                    ["train", "--init", last]):
        res = run_cli(*command, "--config", job, tmp_path=tmp_path)
        assert_one_line(res, CHECKPOINT, "checkpoint", "has a catalogue of", str(other), last)


def _empty_split(dataset, split: str) -> None:
    """Rewrite every shard of ``split`` without rows (schema kept), manifest updated."""
    import json

    import pyarrow.parquet as pq

    from stackrec_dist.data.manifest import shard_checksums

    manifest = json.loads((dataset / "manifest.json").read_text())
    info = manifest["splits"][split]
    for shard in info["shards"]:
        path = dataset / shard["path"]
        pq.write_table(pq.read_table(path).slice(0, 0), path)
        shard.update(**shard_checksums(path.read_bytes()), rows=0,
                     row_groups=pq.ParquetFile(path).metadata.num_row_groups)
    info["rows"] = 0
    if info.get("length_histogram"):
        info["length_histogram"] = {"length": [], "count": []}
    (dataset / "manifest.json").write_text(json.dumps(manifest))


def test_an_empty_evaluation_split_ends_in_one_line(dataset, tmp_path, checkpoint):
    _empty_split(dataset, "test")
    res = run_cli("evaluate", "--config", str(write_job(tmp_path, dataset)), "--checkpoint", str(checkpoint),
                  "--split", "test", tmp_path=tmp_path, timeout=60)
    assert_one_line(res, DATA, "data", "split 'test' has no row to evaluate", str(dataset))
