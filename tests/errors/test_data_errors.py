"""Bad datasets through the real CLI: each ends in one ``stackrec: data error`` line (exit 3)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.errors.conftest import assert_one_line, run_cli, write_job

DATA = 3


def _shard(dataset, split="train", k=0):
    return dataset / split / f"part-{k:05d}.parquet"


@pytest.mark.slow  # a training start-up in a subprocess: about 5 s
def test_shard_changed_in_place_same_size(dataset, tmp_path):
    path = _shard(dataset)
    data = bytearray(path.read_bytes())
    md = pq.ParquetFile(path).metadata
    col = md.row_group(0).column(1)
    at = col.data_page_offset + col.total_compressed_size - 3
    data[at] ^= 0xFF  # one byte of a data page's data (past its header): same size, footer intact
    path.write_bytes(bytes(data))
    # A whole epoch: every page is read in an epoch, and its CRC32 checked as it is read.
    job = write_job(tmp_path, dataset, train={"max_steps": 0, "epochs": 1})
    res = run_cli("train", "--config", str(job), tmp_path=tmp_path)
    assert_one_line(res, DATA, "data", "train/part-00000.parquet row group 0", "page checksum mismatch",
                    "changed or damaged after prepare")


@pytest.mark.slow  # a training start-up in a subprocess: about 5 s
def test_corrupt_footer_with_checksums_off(dataset, tmp_path):
    path = _shard(dataset)
    data = bytearray(path.read_bytes())
    data[-12:-8] = b"\xff\xff\xff\x7f"  # footer length: undecodable, same size
    path.write_bytes(bytes(data))
    job = write_job(tmp_path, dataset, data={"verify_checksums": False}, train={"max_steps": 0, "epochs": 1})
    res = run_cli("train", "--config", str(job), tmp_path=tmp_path)
    assert_one_line(res, DATA, "data", "train/part-00000.parquet", "not a readable Parquet file")


def test_truncated_shard(dataset, tmp_path):
    path = _shard(dataset, k=1)
    path.write_bytes(path.read_bytes()[:100])
    res = run_cli("train", "--config", str(write_job(tmp_path, dataset)), tmp_path=tmp_path)
    assert_one_line(res, DATA, "data", "manifest.json", "splits.train.shards[1]", "has 100 bytes")


def test_missing_shard(dataset, tmp_path):
    _shard(dataset, k=1).unlink()
    res = run_cli("train", "--config", str(write_job(tmp_path, dataset)), tmp_path=tmp_path)
    assert_one_line(res, DATA, "data", "splits.train.shards[1]", "does not exist")


def _put_null_sequence(dataset, split: str, row: int) -> None:
    """Rewrite one shard with a null ``item_ids`` in ``row``, manifest updated (size, checksums)."""
    from stackrec_dist.data.manifest import shard_checksums

    path = _shard(dataset, split)
    table = pq.read_table(path)
    items = table.column("item_ids").to_pylist()
    items[row] = None
    table = table.set_column(table.schema.get_field_index("item_ids"),
                             pa.field("item_ids", pa.list_(pa.int32())), pa.array(items, pa.list_(pa.int32())))
    pq.write_table(table, path, row_group_size=64, write_page_checksum=True)
    manifest = json.loads((dataset / "manifest.json").read_text())
    for shard in manifest["splits"][split]["shards"]:
        if shard["path"] == f"{split}/{path.name}":
            shard.update(shard_checksums(path.read_bytes()))
            shard["row_groups"] = pq.ParquetFile(path).metadata.num_row_groups
    (dataset / "manifest.json").write_text(json.dumps(manifest))


def test_null_sequence_in_evaluation(dataset, tmp_path, checkpoint):
    _put_null_sequence(dataset, "test", row=3)
    res = run_cli("evaluate", "--config", str(write_job(tmp_path, dataset)), "--checkpoint", str(checkpoint),
                  tmp_path=tmp_path)
    assert_one_line(res, DATA, "data", "test/part-00000.parquet row group 0 row 3 field item_ids: null sequence")


@pytest.mark.slow
def test_null_sequence_in_training(dataset, tmp_path):
    _put_null_sequence(dataset, "train", row=5)
    # A whole epoch, so that the bad row group is read whatever the epoch's unit order.
    job = write_job(tmp_path, dataset, train={"max_steps": 0, "epochs": 1})
    res = run_cli("train", "--config", str(job), tmp_path=tmp_path)
    assert_one_line(res, DATA, "data", "train/part-00000.parquet row group 0 row 5 field item_ids: null sequence")
