"""The trainer's view of a dataset comes from the manifest only: exact counts, no shard opened."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from stackrec_dist.config import DataConfig, LossConfig
from stackrec_dist.data.errors import DataError
from stackrec_dist.data.manifest import MANIFEST_NAME
from stackrec_dist.data.loader import build_train_loader
from stackrec_dist.data.windows import pairs_per_row, pieces_per_row
from stackrec_dist.train import data_info
from stackrec_dist.train.data_info import count_windows, dataset_num_items, item_counts, steps_per_epoch


def _lengths(root, split):
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    out = []
    for shard in manifest["splits"][split]["shards"]:
        column = pq.read_table(root / shard["path"], columns=["item_ids"]).column("item_ids")
        out.append(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    return np.concatenate(out)


def _cfg(root, **kw):
    return DataConfig(path=str(root), **kw)


@pytest.mark.parametrize("split", ["train", "valid", "slice-1", "slice-2"])
@pytest.mark.parametrize("max_len", [2, 3, 7, 20, 1000])
def test_counts_match_the_shards_exactly(tiny_cl_dataset, split, max_len):
    lengths = _lengths(tiny_cl_dataset, split)
    pad = int(pieces_per_row(lengths, max_len).sum())
    concat = math.ceil(int(np.maximum(lengths - 1, 0).sum()) / max_len)
    assert count_windows(_cfg(tiny_cl_dataset, max_len=max_len), split) == pad
    assert count_windows(_cfg(tiny_cl_dataset, max_len=max_len, pack="concat"), split) == concat
    assert steps_per_epoch(_cfg(tiny_cl_dataset, max_len=max_len, batch_size=32), split) == max(1, math.ceil(pad / 32))
    for stride in (1, max(1, max_len // 2), max_len):
        cfg = _cfg(tiny_cl_dataset, max_len=max_len, window_stride=stride)
        assert count_windows(cfg, split) == int(pieces_per_row(lengths, stride).sum())
        pairs = int(pairs_per_row(lengths, max_len, stride).sum())
        assert count_windows(dataclasses.replace(cfg, pack="concat"), split) == math.ceil(pairs / max_len)


@pytest.mark.parametrize("stride", [1, 4, 10])
def test_manifest_count_is_what_the_loader_yields(tiny_dataset, stride):
    cfg = _cfg(tiny_dataset, max_len=10, window_stride=stride, batch_size=64, shuffle_buffer=1)
    windows = sum(len(b["inputs"]) for b in build_train_loader(cfg))
    assert windows == count_windows(cfg) == int(pieces_per_row(_lengths(tiny_dataset, "train"), stride).sum())
    # concat: the pairs the manifest counts are the pairs the loader lays out, in at least as many windows
    cfg = dataclasses.replace(cfg, pack="concat")
    batches = list(build_train_loader(cfg))
    assert sum(int((b["inputs"] > 0).sum()) for b in batches) == int(
        pairs_per_row(_lengths(tiny_dataset, "train"), 10, stride).sum())
    assert count_windows(cfg) <= sum(len(b["inputs"]) for b in batches)


def test_item_counts_are_the_training_occurrences(tiny_dataset):
    manifest = json.loads((tiny_dataset / MANIFEST_NAME).read_text())
    values = np.concatenate([
        pc.list_flatten(pq.read_table(tiny_dataset / s["path"]).column("item_ids")).to_numpy()
        for s in manifest["splits"]["train"]["shards"]
    ])
    counts = item_counts(_cfg(tiny_dataset))
    assert counts.dtype == torch.int64 and counts.shape == (manifest["num_items"],)
    assert counts.tolist() == np.bincount(values, minlength=manifest["num_items"]).tolist()
    assert counts[0] == 0 and manifest["item_counts"]["total"] == len(values)


def test_trainer_side_functions_open_no_shard(tiny_dataset, tmp_path, monkeypatch):
    """Delete every shard: start-up still knows the epoch length, catalogue and item counts."""
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    before = (count_windows(_cfg(root, max_len=20)), steps_per_epoch(_cfg(root, max_len=20, batch_size=32)),
              count_windows(_cfg(root, max_len=20, window_stride=5)),
              dataset_num_items(_cfg(root)), item_counts(_cfg(root)).tolist())
    for split in ("train", "valid", "test"):
        shutil.rmtree(root / split)
    # And nothing may call the scan fallback.
    monkeypatch.setattr(data_info, "_scan_windows", lambda *a: pytest.fail("scanned the shards"))
    after = (count_windows(_cfg(root, max_len=20)), steps_per_epoch(_cfg(root, max_len=20, batch_size=32)),
             count_windows(_cfg(root, max_len=20, window_stride=5)),
             dataset_num_items(_cfg(root)), item_counts(_cfg(root)).tolist())
    assert after == before


def test_old_manifest_falls_back_to_the_scan_and_unigram_asks_for_prepare(tiny_dataset, tmp_path, caplog):
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    expected = count_windows(_cfg(root, max_len=7))
    strided = [count_windows(_cfg(root, max_len=7, window_stride=3, pack=p)) for p in ("pad", "concat")]
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    for split in manifest["splits"].values():
        del split["length_histogram"]
    del manifest["item_counts"]
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        assert count_windows(_cfg(root, max_len=7)) == expected
        assert [count_windows(_cfg(root, max_len=7, window_stride=3, pack=p)) for p in ("pad", "concat")] == strided
    assert "Re-run `stackrec prepare`" in caplog.text
    with pytest.raises(DataError, match="re-run `stackrec prepare`") as err:
        item_counts(_cfg(root))
    assert err.value.field == "item_counts"
    # Uniform / full losses do not need the counts.
    assert data_info.proposal_item_counts(_cfg(root), LossConfig(kind="sampled")) is None


def test_tampered_item_counts_file_is_refused(tiny_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    path = root / "stats" / "item_counts.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)
    with pytest.raises(DataError, match="sha256"):
        item_counts(_cfg(root))
