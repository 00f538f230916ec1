import json
import pickle

import fsspec
import pyarrow as pa
import pytest

from stackrec_dist.data.errors import DataError, ManifestError, MissingShardError, SchemaError
from stackrec_dist.data.manifest import (
    MANIFEST_NAME,
    SEQUENCE_SCHEMA,
    Manifest,
    ShardInfo,
    SplitInfo,
    check_sequence_schema,
    file_digest,
    read_manifest,
    write_manifest,
)
from stackrec_dist.data.storage import open_fs


def _dataset(uri: str) -> tuple[fsspec.AbstractFileSystem, str, Manifest]:
    """A manifest over two real (tiny) shard files."""
    fs, root = open_fs(uri)
    shards = []
    for k, data in enumerate([b"abc", b"defgh"]):
        rel = f"train/part-{k:05d}.parquet"
        fs.makedirs(f"{root}/train", exist_ok=True)
        with fs.open(f"{root}/{rel}", "wb") as f:
            f.write(data)
        sha, size = file_digest(fs, f"{root}/{rel}")
        shards.append(ShardInfo(rel, rows=k + 1, row_groups=1, sha256=sha, bytes=size))
    m = Manifest(
        schema_version=1,
        num_items=11,
        num_users=3,
        protocol="leave_last_out",
        splits={"train": SplitInfo(rows=3, shards=shards)},
        id_maps={"items": "id_maps/items.parquet"},
        created_by="test",
        extra={"k": [1, 2]},
    )
    return fs, root, m


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_roundtrip(kind, mem_root, tmp_path):
    uri = mem_root if kind == "memory" else str(tmp_path / "ds")
    fs, root, m = _dataset(uri)
    write_manifest(fs, root, m)
    assert read_manifest(fs, root, verify_checksums=True) == m
    # Atomic write leaves no temp file behind.
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if "manifest" in p] == [MANIFEST_NAME]


def test_identical_manifest_bytes(mem_root):
    fs, root, m = _dataset(mem_root)
    write_manifest(fs, root, m)
    first = fs.cat(f"{root}/{MANIFEST_NAME}")
    write_manifest(fs, root, m)
    assert fs.cat(f"{root}/{MANIFEST_NAME}") == first


def _rewrite(fs, root, edit):
    raw = json.loads(fs.cat(f"{root}/{MANIFEST_NAME}"))
    edit(raw)
    with fs.open(f"{root}/{MANIFEST_NAME}", "wb") as f:
        f.write(json.dumps(raw).encode())


def test_unknown_version(mem_root):
    fs, root, m = _dataset(mem_root)
    write_manifest(fs, root, m)
    _rewrite(fs, root, lambda r: r.update(schema_version=99))
    with pytest.raises(ManifestError) as err:
        read_manifest(fs, root)
    text = str(err.value)
    assert f"{mem_root}/manifest.json" in text and "field schema_version" in text and "99" in text


@pytest.mark.parametrize(
    "edit, field, words",
    [
        (lambda r: r.pop("num_items"), "num_items", "missing field"),
        (lambda r: r.update(num_items="11"), "num_items", "must be int"),
        (lambda r: r.update(num_users=True), "num_users", "must be int"),
        (lambda r: r["splits"]["train"]["shards"][1].pop("sha256"), "splits.train.shards[1].sha256", "missing"),
        (lambda r: r["splits"]["train"].update(rows=7), "splits.train.rows", "sum of shard rows 3"),
        (lambda r: r.update(id_maps=[1]), "id_maps", "must map"),
    ],
)
def test_invalid_fields_are_named(mem_root, edit, field, words):
    fs, root, m = _dataset(mem_root)
    write_manifest(fs, root, m)
    _rewrite(fs, root, edit)
    with pytest.raises(ManifestError) as err:
        read_manifest(fs, root)
    assert f"field {field}" in str(err.value) and words in str(err.value)
    assert err.value.field == field and err.value.path.endswith("manifest.json")


def test_missing_shard(mem_root):
    fs, root, m = _dataset(mem_root)
    write_manifest(fs, root, m)
    fs.rm(f"{root}/train/part-00001.parquet")
    with pytest.raises(MissingShardError) as err:
        read_manifest(fs, root)
    text = str(err.value)
    assert "manifest.json" in text and "splits.train.shards[1]" in text and "train/part-00001.parquet" in text
    # Opting out of the existence check (e.g. a reader that checks lazily) still parses.
    assert read_manifest(fs, root, check_files=False).splits["train"].rows == 3


def test_size_and_checksum_mismatch(mem_root):
    fs, root, m = _dataset(mem_root)
    write_manifest(fs, root, m)
    with fs.open(f"{root}/train/part-00000.parquet", "wb") as f:
        f.write(b"abcd")
    with pytest.raises(ManifestError, match=r"part-00000.parquet has 4 bytes, the manifest says 3"):
        read_manifest(fs, root)
    with fs.open(f"{root}/train/part-00000.parquet", "wb") as f:
        f.write(b"xyz")  # same size, other bytes
    read_manifest(fs, root)
    with pytest.raises(ManifestError, match=r"part-00000.parquet sha256 .* != manifest"):
        read_manifest(fs, root, verify_checksums=True)


def test_no_manifest_and_bad_json(mem_root):
    fs, root = open_fs(mem_root)
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(fs, root)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{MANIFEST_NAME}", "wb") as f:
        f.write(b"{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(fs, root)


def test_data_error_text_and_pickle():
    err = DataError(
        "item id 9001 >= num_items 3707",
        path="s3://b/ds/train/part-00001.parquet",
        row_group=3,
        row=17,
        field="item_ids",
    )
    assert str(err) == (
        "s3://b/ds/train/part-00001.parquet row group 3 row 17 field item_ids: item id 9001 >= num_items 3707"
    )
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(MissingShardError("gone", path="p", field="f")))
    assert type(back) is MissingShardError and str(back) == "p field f: gone" and back.field == "f"
    assert str(DataError("plain")) == "plain"


def test_check_sequence_schema():
    check_sequence_schema(SEQUENCE_SCHEMA)
    no_domain = pa.schema([f for f in SEQUENCE_SCHEMA if f.name != "domain"])
    check_sequence_schema(no_domain)  # domain is optional
    with pytest.raises(SchemaError, match=r"x.parquet field item_ids: missing column"):
        check_sequence_schema(pa.schema([("user_id", pa.int64())]), path="x.parquet")
    bad = pa.schema([("user_id", pa.int64()), ("item_ids", pa.list_(pa.int64())), ("timestamps", pa.list_(pa.int64()))])
    with pytest.raises(SchemaError, match=r"field item_ids: type list<item: int64>"):
        check_sequence_schema(bad)
