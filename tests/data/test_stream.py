"""The streaming reader: windows, striding over ranks x workers, exact resume, bad input, S3."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import posixpath
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stackrec_dist.config import DataConfig
from stackrec_dist.data.errors import CorruptFileError, DataError, ManifestError, MissingShardError, SchemaError
from stackrec_dist.data.manifest import Manifest, ShardInfo, SplitInfo, shard_checksums, write_manifest
from stackrec_dist.data.storage import StorageError, open_fs
from stackrec_dist.data.cursor import merge_cursors
from stackrec_dist.data.eval_stream import iter_eval_batches
from stackrec_dist.data.loader import build_train_loader
from stackrec_dist.data.stream import SequenceStream
from stackrec_dist.data.windows import concat_windows, pad_windows, piece_bounds, row_pieces

# -- writing small datasets directly (the sequence-Parquet contract of docs/architecture.md) -----


def make_table(seqs, *, timestamps=None, user_ids=None) -> pa.Table:
    n = len(seqs)
    if timestamps is None:
        timestamps = [None if s is None else list(range(len(s))) for s in seqs]
    return pa.table({
        "user_id": pa.array(user_ids if user_ids is not None else range(n), pa.int64()),
        "item_ids": pa.array(seqs, pa.list_(pa.int32())),
        "timestamps": pa.array(timestamps, pa.list_(pa.int64())),
        "domain": pa.nulls(n, pa.string()),
        "time_slice": pa.array([0] * n, pa.int32()),
    })


def write_dataset(uri, splits, *, num_items, row_group_size=8, storage_options=None, tables=None):
    """``splits``: {name: [shard rows, ...]}, each shard a list of item-id lists (or a pa.Table)."""
    fs, root = open_fs(uri, storage_options)
    infos = {}
    for split, shards in splits.items():
        out = []
        for i, rows in enumerate(shards):
            table = rows if isinstance(rows, pa.Table) else make_table(rows)
            rel = f"{split}/part-{i:05d}.parquet"
            path = posixpath.join(root, rel)
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with fs.open(path, "wb") as f:  # as prepare writes them: a CRC32 per page
                pq.write_table(table, f, row_group_size=row_group_size, write_page_checksum=True)
            data = fs.cat_file(path)
            md = pq.ParquetFile(pa.BufferReader(data)).metadata
            out.append(ShardInfo(rel, md.num_rows, md.num_row_groups, **shard_checksums(data)))
        infos[split] = SplitInfo(sum(s.rows for s in out), out)
    write_manifest(fs, root, Manifest(1, num_items, 0, "synthetic", infos))
    return fs, root


def random_seqs(n, num_items, rng, lo=1, hi=130):
    """Sequences whose items encode (sequence id, position) so every transition is identifiable."""
    return [rng.integers(1, num_items, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def expected_transitions(shards):
    c = collections.Counter()
    for rows in shards:
        for s in rows:
            for a, b in zip(s[:-1], s[1:]):
                c[(a, b)] += 1
    return c


def batch_transitions(batch, prev_context=True):
    """Counter of (input item, target item) pairs at positions with a real target."""
    inputs, targets = batch["inputs"].numpy(), batch["targets"].numpy()
    mask = targets > 0
    return collections.Counter(zip(inputs[mask].tolist(), targets[mask].tolist()))


def identified_dataset(uri, num_shards=3, rows=40, num_items=100_000, seed=0, row_group_size=8, storage_options=None):
    """Every item id occurs once in the whole dataset: a transition is identified by its target."""
    rng = np.random.default_rng(seed)
    next_id = 1
    shards = []
    for _ in range(num_shards):
        rows_ = []
        for _ in range(rows):
            n = int(rng.integers(1, 140))
            rows_.append(list(range(next_id, next_id + n)))
            next_id += n
        shards.append(rows_)
    assert next_id < num_items
    write_dataset(uri, {"train": shards}, num_items=num_items, row_group_size=row_group_size,
                  storage_options=storage_options)
    targets = sorted(t for rows_ in shards for s in rows_ for t in s[1:])
    return shards, targets


def cfg_for(uri, **kw) -> DataConfig:
    base = dict(path=uri, max_len=10, batch_size=8, shuffle_buffer=1, num_workers=0, seed=3)
    base.update(kw)
    return DataConfig(**base)


def received_targets(batches):
    out = []
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape
        t = b["targets"].numpy()
        out.extend(t[t > 0].tolist())
    return out


def check_pairs(batches):
    """Each real target follows its input in the original sequence (ids are consecutive)."""
    for b in batches:
        i, t = b["inputs"].numpy(), b["targets"].numpy()
        m = t > 0
        assert (t[m] == i[m] + 1).all()


# -- windows -----------------------------------------------------------------------------------


def test_pad_windows_cut_from_the_end_overlap_by_one():
    L = 4
    seq = np.arange(1, 11, dtype=np.int64)  # 10 items, 9 transitions -> 3 windows
    lengths = np.array([10])
    offsets = np.array([0, 10])
    row, k = row_pieces(lengths, L)
    start, end = piece_bounds(offsets, lengths, row, k, L)
    inputs, targets = pad_windows(seq, start, end, L)
    assert inputs.tolist() == [[6, 7, 8, 9], [2, 3, 4, 5], [0, 0, 0, 1]]
    assert targets.tolist() == [[7, 8, 9, 10], [3, 4, 5, 6], [0, 0, 0, 2]]
    # a 1-item sequence has no transition, hence no window
    assert len(row_pieces(np.array([1]), L)[0]) == 0


def test_concat_packs_short_pieces_without_crossing_pairs():
    L = 5
    values = np.array([1, 2, 3, 10, 11, 20, 21, 22], dtype=np.int64)
    start = np.array([0, 3, 5])
    end = np.array([3, 5, 8])  # 2, 1, 2 transitions
    inputs, targets, pieces = concat_windows(values, start, end, np.array([7, 8, 9]), L)
    assert inputs.tolist() == [[1, 2, 10, 20, 21]]
    assert targets.tolist() == [[2, 3, 11, 21, 22]]
    assert sorted(pieces[0][pieces[0] >= 0].tolist()) == [7, 8, 9]


def test_every_transition_once_pad_and_concat(tmp_path):
    shards, targets = identified_dataset(str(tmp_path / "ds"))
    for pack in ("pad", "concat"):
        loader = build_train_loader(cfg_for(str(tmp_path / "ds"), pack=pack, shuffle_buffer=64))
        batches = list(loader)
        check_pairs(batches)
        assert sorted(received_targets(batches)) == targets, pack
        assert all(b["inputs"].dtype == torch.int64 for b in batches)
        assert all(len(b["inputs"]) == 8 for b in batches[:-1])
    # concat fills windows: fewer of them than one per short piece
    n_pad = sum(len(b["inputs"]) for b in build_train_loader(cfg_for(str(tmp_path / "ds"))))
    n_cat = sum(len(b["inputs"]) for b in build_train_loader(cfg_for(str(tmp_path / "ds"), pack="concat")))
    assert n_cat < n_pad


def test_memory_fs_and_epochs_reshuffle(tmp_path):
    uri = f"memory://stream-{uuid.uuid4().hex}"
    shards, targets = identified_dataset(uri, num_shards=2, rows=30)
    loader = build_train_loader(cfg_for(uri, shuffle_buffer=32))
    e0 = received_targets(list(loader))
    e1 = received_targets(list(loader))  # the next iteration is the next epoch
    assert loader.epoch == 1
    assert sorted(e0) == sorted(e1) == targets
    assert e0 != e1


# -- striding ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_two_workers_disjoint_and_complete(tmp_path):
    shards, targets = identified_dataset(str(tmp_path / "ds"), num_shards=4, rows=40)
    cfg = cfg_for(str(tmp_path / "ds"), num_workers=2, shuffle_buffer=16, batch_size=16)
    got = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2)
        batches = list(loader)
        assert all(len(b["inputs"]) <= 8 for b in batches)  # 16 // world size
        got.extend(received_targets(batches))
    assert sorted(got) == targets  # disjoint (no duplicates) and complete


def test_ranks_in_process_disjoint_complete(tmp_path):
    shards, targets = identified_dataset(str(tmp_path / "ds"), num_shards=3, rows=30)
    cfg = cfg_for(str(tmp_path / "ds"), shuffle_buffer=8)
    got = []
    for rank in range(3):
        got.extend(received_targets(list(build_train_loader(cfg, rank=rank, world_size=3))))
    assert sorted(got) == targets


# -- exact resume ------------------------------------------------------------------------------


def _consume(loader, n):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("pack", ["pad", "concat"])
def test_resume_mid_epoch_in_process(tmp_path, pack):
    shards, targets = identified_dataset(str(tmp_path / "ds"))
    cfg = cfg_for(str(tmp_path / "ds"), shuffle_buffer=40, pack=pack)
    first = build_train_loader(cfg)
    head = _consume(first, 7)
    state = first.state_dict()
    del first
    second = build_train_loader(cfg)
    second.load_state_dict(state)
    tail = list(second)
    got = received_targets(head) + received_targets(tail)
    assert sorted(got) == targets
    # the epoch after the resumed one is complete as well
    assert sorted(received_targets(list(second))) == targets


@pytest.mark.slow
def test_resume_with_workers_and_shuffle_buffer(tmp_path):
    shards, targets = identified_dataset(str(tmp_path / "ds"), num_shards=4, rows=40)
    cfg = cfg_for(str(tmp_path / "ds"), num_workers=2, shuffle_buffer=32)
    first = build_train_loader(cfg)
    head = _consume(first, 9)  # workers have prefetched far more than this
    state = first.state_dict()
    second = build_train_loader(cfg)
    second.load_state_dict(state)
    tail = list(second)
    assert sorted(received_targets(head) + received_targets(tail)) == targets
    # and resuming the same loader object (break, then iterate again) continues as well
    third = build_train_loader(cfg)
    a = _consume(third, 5)
    b = _consume(third, 5)
    c = list(third)
    assert sorted(received_targets(a + b + c)) == targets


@pytest.mark.parametrize("new_world", [1, 3])
def test_world_size_change_at_a_cursor(tmp_path, new_world):
    shards, targets = identified_dataset(str(tmp_path / "ds"), num_shards=4, rows=40)
    cfg = cfg_for(str(tmp_path / "ds"), shuffle_buffer=24, batch_size=8)
    loaders = [build_train_loader(cfg, rank=r, world_size=2) for r in range(2)]
    head = [b for ld in loaders for b in _consume(ld, 6)]
    states = [ld.state_dict() for ld in loaders]
    # one rank's cursor alone cannot be restrided
    with pytest.raises(ValueError, match="cursors of all ranks"):
        build_train_loader(cfg, rank=0, world_size=new_world).load_state_dict(states[0])
    merged = merge_cursors(states)
    tail = []
    for r in range(new_world):
        ld = build_train_loader(cfg, rank=r, world_size=new_world)
        ld.load_state_dict(merged if r % 2 else states)  # merged dict or the list of rank cursors
        tail.extend(list(ld))
    assert sorted(received_targets(head) + received_targets(tail)) == targets


def test_rank_cursor_resumes_same_layout(tmp_path):
    shards, targets = identified_dataset(str(tmp_path / "ds"), num_shards=3, rows=30)
    cfg = cfg_for(str(tmp_path / "ds"), shuffle_buffer=16)
    got = []
    for r in range(2):
        ld = build_train_loader(cfg, rank=r, world_size=2)
        got += received_targets(_consume(ld, 3))
        again = build_train_loader(cfg, rank=r, world_size=2)
        again.load_state_dict(ld.state_dict())
        got += received_targets(list(again))
    assert sorted(got) == targets


def test_cursor_of_another_dataset_is_refused(tmp_path):
    identified_dataset(str(tmp_path / "a"), seed=1)
    identified_dataset(str(tmp_path / "b"), seed=2)
    a = build_train_loader(cfg_for(str(tmp_path / "a")))
    _consume(a, 2)
    with pytest.raises(ValueError, match="dataset"):
        build_train_loader(cfg_for(str(tmp_path / "b"))).load_state_dict(a.state_dict())


@pytest.mark.parametrize("pack", ["pad", "concat"])
def test_window_stride_every_transition_once_and_resume(tmp_path, pack):
    shards, targets = identified_dataset(str(tmp_path / "ds"))
    cfg = cfg_for(str(tmp_path / "ds"), shuffle_buffer=40, pack=pack, window_stride=3)
    whole = list(build_train_loader(cfg))
    check_pairs(whole)
    assert sorted(received_targets(whole)) == targets
    first = build_train_loader(cfg)
    head = _consume(first, 7)
    second = build_train_loader(cfg)
    second.load_state_dict(first.state_dict())
    assert sorted(received_targets(head) + received_targets(list(second))) == targets


def test_window_stride_0_is_max_len_batch_for_batch(tmp_path):
    identified_dataset(str(tmp_path / "ds"))
    for pack in ("pad", "concat"):
        runs = [list(build_train_loader(cfg_for(str(tmp_path / "ds"), shuffle_buffer=40, pack=pack,
                                                window_stride=s))) for s in (0, 10)]
        assert len(runs[0]) == len(runs[1])
        for a, b in zip(*runs):
            assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["targets"], b["targets"])


def test_cursor_of_another_window_layout_is_refused(tmp_path):
    identified_dataset(str(tmp_path / "ds"))
    uri = str(tmp_path / "ds")
    a = build_train_loader(cfg_for(uri, window_stride=3))
    _consume(a, 2)
    state = a.state_dict()
    assert (state["max_len"], state["window_stride"]) == (10, 3)
    with pytest.raises(ValueError, match="data.window_stride=3, this reader has data.window_stride=5"):
        build_train_loader(cfg_for(uri, window_stride=5)).load_state_dict(state)
    with pytest.raises(ValueError, match="data.window_stride=3, this reader has data.window_stride=10"):
        build_train_loader(cfg_for(uri)).load_state_dict(state)
    with pytest.raises(ValueError, match="data.max_len=10, this reader has data.max_len=12"):
        build_train_loader(cfg_for(uri, max_len=12, window_stride=3)).load_state_dict(state)
    b = build_train_loader(cfg_for(uri, window_stride=5))
    _consume(b, 1)
    with pytest.raises(ValueError, match="cursors disagree on window_stride"):
        merge_cursors([state, b.state_dict()])
    # stride 0 is max_len: the same pieces, so the cursor resumes
    c = build_train_loader(cfg_for(uri, window_stride=0))
    _consume(c, 2)
    build_train_loader(cfg_for(uri, window_stride=10)).load_state_dict(c.state_dict())
    # a cursor saved before the layout was recorded was cut without overlap
    legacy = {k: v for k, v in c.state_dict().items() if k not in ("max_len", "window_stride")}
    build_train_loader(cfg_for(uri)).load_state_dict(legacy)
    with pytest.raises(ValueError, match="data.window_stride=10, this reader has data.window_stride=3"):
        build_train_loader(cfg_for(uri, window_stride=3)).load_state_dict(legacy)


def test_state_survives_torch_save_weights_only(tmp_path):
    identified_dataset(str(tmp_path / "ds"))
    ld = build_train_loader(cfg_for(str(tmp_path / "ds"), shuffle_buffer=20))
    _consume(ld, 3)
    torch.save(ld.state_dict(), tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state == ld.state_dict()


# -- evaluation rows ---------------------------------------------------------------------------


def test_eval_batches_history_and_target(tmp_path):
    seqs = [[1, 2, 3], [4, 5], list(range(1, 30)), [7, 8, 9, 10]]
    write_dataset(str(tmp_path / "ds"), {"valid": [seqs[:2], seqs[2:]]}, num_items=50, row_group_size=1)
    cfg = cfg_for(str(tmp_path / "ds"), max_len=5)
    batches = list(iter_eval_batches(cfg, "valid", batch_size=3))
    inputs = torch.cat([b["inputs"] for b in batches]).tolist()
    targets = torch.cat([b["targets"] for b in batches]).tolist()
    assert [len(b["targets"]) for b in batches] == [3, 1]
    assert targets == [3, 5, 29, 10]
    assert inputs == [[0, 0, 0, 1, 2], [0, 0, 0, 0, 4], [24, 25, 26, 27, 28], [0, 0, 7, 8, 9]]
    per_rank = [torch.cat([b["targets"] for b in iter_eval_batches(cfg, "valid", 2, rank=r, world_size=3)]).tolist()
                for r in range(3)]
    assert sorted(sum(per_rank, [])) == sorted(targets)


# -- bad input ---------------------------------------------------------------------------------


def _bad_dataset(tmp_path, rows, *, table=None, num_items=50, split="train"):
    uri = str(tmp_path / f"bad-{uuid.uuid4().hex[:6]}")
    good = [[1, 2, 3], [4, 5, 6, 7]]
    shard = table if table is not None else make_table(good + rows)
    write_dataset(uri, {split: [good, shard]}, num_items=num_items, row_group_size=8)
    return uri


@pytest.mark.parametrize(
    "rows, text",
    [
        ([None], "row 2 field item_ids: null sequence"),
        ([[]], "row 2 field item_ids: empty sequence"),
        ([[1, -3, 2]], "row 2 field item_ids: item id -3 at position 1 < 1"),
        ([[1, 2], [3, 0]], "row 3 field item_ids: item id 0 at position 1 < 1 (0 is the pad id"),
        ([[1, 50]], "row 2 field item_ids: item id 50 at position 1 >= num_items 50"),
        ([[1, None, 2]], "row 2 field item_ids: null item id inside the sequence"),
    ],
)
def test_bad_rows_name_file_row_group_row_field(tmp_path, rows, text):
    uri = _bad_dataset(tmp_path, rows)
    with pytest.raises(DataError) as info:
        list(build_train_loader(cfg_for(uri)))
    msg = str(info.value)
    assert "train/part-00001.parquet row group 0 " + text in msg
    assert info.value.path.endswith("train/part-00001.parquet")
    assert info.value.row_group == 0 and info.value.field


@pytest.mark.slow
def test_bad_row_in_dataloader_worker_keeps_location(tmp_path):
    uri = _bad_dataset(tmp_path, [[1, 2], [1, 77]])
    with pytest.raises(DataError) as info:
        list(build_train_loader(cfg_for(uri, num_workers=2)))
    err = info.value
    assert (err.row_group, err.row, err.field) == (0, 3, "item_ids")
    assert "part-00001.parquet row group 0 row 3 field item_ids: item id 77" in str(err)


def test_timestamps_length_mismatch(tmp_path):
    t = make_table([[1, 2, 3], [4, 5, 6, 7], [1, 2]], timestamps=[[1, 2, 3], [1, 2, 3, 4], [1]])
    uri = _bad_dataset(tmp_path, [], table=t)
    with pytest.raises(DataError, match=r"row group 0 row 2 field timestamps: 1 timestamps for 2 item ids"):
        list(build_train_loader(cfg_for(uri)))


def test_wrong_schema(tmp_path):
    t = pa.table({"user_id": pa.array([1], pa.int64()), "item_ids": pa.array([["a", "b"]]),
                  "timestamps": pa.array([[1, 2]], pa.list_(pa.int64()))})
    uri = _bad_dataset(tmp_path, [], table=t)
    with pytest.raises(SchemaError, match=r"part-00001.parquet field item_ids: type list<\w+: string> where"):
        list(build_train_loader(cfg_for(uri)))


def test_eval_row_without_history(tmp_path):
    uri = _bad_dataset(tmp_path, [[5]], split="valid")
    with pytest.raises(DataError, match=r"row group 0 row 2 field item_ids: 1 item\(s\); an evaluation row needs"):
        list(iter_eval_batches(cfg_for(uri), "valid", 4))


def test_missing_shard_and_manifest_mismatches(tmp_path):
    uri = _bad_dataset(tmp_path, [[1, 2]])
    fs, root = open_fs(uri)
    path = f"{root}/train/part-00001.parquet"
    data = fs.cat_file(path)
    # truncated (size differs from the manifest): refused before training starts
    fs.pipe_file(path, data[: len(data) // 2])
    with pytest.raises(ManifestError, match=r"manifest.json field splits.train.shards\[1\]: shard train/part-00001.parquet has \d+ bytes"):
        build_train_loader(cfg_for(uri))
    fs.rm(path)
    with pytest.raises(MissingShardError, match="does not exist"):
        build_train_loader(cfg_for(uri))


def test_corrupt_same_size_and_checksum(tmp_path):
    uri = _bad_dataset(tmp_path, [[1, 2]])
    fs, root = open_fs(uri)
    path = f"{root}/train/part-00001.parquet"
    data = bytearray(fs.cat_file(path))
    data[-12:-8] = b"\xff\xff\xff\x7f"  # footer length: undecodable
    fs.pipe_file(path, bytes(data))
    # checked up front on request: refused before the first batch, naming the shard
    with pytest.raises(CorruptFileError, match=r"part-00001.parquet: footer sha256 [0-9a-f]+ != manifest"):
        build_train_loader(cfg_for(uri), verify_at_start=True)
    # checksums off (data.verify_checksums: false): the footer check still refuses it
    with pytest.raises(CorruptFileError, match=r"part-00001.parquet: not a readable Parquet file"):
        build_train_loader(cfg_for(uri, verify_checksums=False), verify_at_start=True)
    # the default: checked on the shard's first read, before any of its rows is used
    with pytest.raises(CorruptFileError, match=r"part-00001.parquet: footer sha256 [0-9a-f]+ != manifest"):
        list(build_train_loader(cfg_for(uri)))


def _flip_page_byte(fs, path: str, row_group: int = 0) -> None:
    """One byte inside the last data page of ``row_group``'s item ids: same size, footer intact."""
    data = bytearray(fs.cat_file(path))
    col = pq.ParquetFile(path).metadata.row_group(row_group).column(1)
    at = col.data_page_offset + col.total_compressed_size - 3  # page data, past the page header
    data[at] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def test_changed_page_fails_its_row_group_by_checksum(tmp_path):
    seqs = [[int(x) for x in np.arange(1, 40) % 49 + 1] for _ in range(8)]
    uri = str(tmp_path / "crc")
    fs, root = write_dataset(uri, {"train": [seqs]}, num_items=50, row_group_size=4)
    path = f"{root}/train/part-00000.parquet"
    _flip_page_byte(fs, path, row_group=1)
    # the footer is intact: refused when the changed page is read, before any of its rows is used
    with pytest.raises(CorruptFileError, match=r"part-00000.parquet row group 1: page checksum mismatch .*CRC"):
        list(build_train_loader(cfg_for(uri)))
    # with the checksums off the changed byte is decoded as data: what the CRCs are for
    got = list(build_train_loader(cfg_for(uri, verify_checksums=False)))
    assert sum(int((b["targets"] > 0).sum()) for b in got) == 8 * 38


def test_first_read_checks_the_footer_not_the_whole_shard(tmp_path, monkeypatch):
    import stackrec_dist.data.shards as shards

    uri = _bad_dataset(tmp_path, [[1, 2]])

    def whole_shard_read(*a, **kw):
        raise AssertionError("a whole shard was hashed")

    monkeypatch.setattr(shards, "file_digest", whole_shard_read)
    assert list(build_train_loader(cfg_for(uri)))


def test_dataset_without_footer_digests_hashes_whole_shards(tmp_path):
    import json

    uri = _bad_dataset(tmp_path, [[1, 2]])
    fs, root = open_fs(uri)
    m = json.loads(fs.cat_file(f"{root}/manifest.json"))
    for shard in m["splits"]["train"]["shards"]:  # as written before page checksums existed
        del shard["footer_sha256"], shard["footer_bytes"]
    fs.pipe_file(f"{root}/manifest.json", json.dumps(m).encode())
    _flip_page_byte(fs, f"{root}/train/part-00001.parquet")
    with pytest.raises(CorruptFileError, match=r"part-00001.parquet: sha256 [0-9a-f]+ != manifest"):
        list(build_train_loader(cfg_for(uri)))


def test_row_count_mismatch_vs_manifest(tmp_path):
    uri = _bad_dataset(tmp_path, [[1, 2]])
    fs, root = open_fs(uri)
    # rewrite the shard with a row fewer but patch the manifest's size/hash only
    import json
    m = json.loads(fs.cat_file(f"{root}/manifest.json"))
    path = f"{root}/train/part-00001.parquet"
    with fs.open(path, "wb") as f:
        pq.write_table(make_table([[1, 2, 3], [4, 5, 6, 7]]), f, row_group_size=4)
    m["splits"]["train"]["shards"][1]["bytes"] = fs.size(path)
    fs.pipe_file(f"{root}/manifest.json", json.dumps(m).encode())
    with pytest.raises(CorruptFileError, match=r"part-00001.parquet: has 2 rows, the manifest says 3"):
        list(build_train_loader(cfg_for(uri, verify_checksums=False)))


def test_undecodable_row_group(tmp_path):
    seqs = [[int(x) for x in np.arange(1, 40) % 49 + 1] for _ in range(8)]
    uri = str(tmp_path / "rg")
    fs, root = write_dataset(uri, {"train": [seqs]}, num_items=50, row_group_size=4)
    path = f"{root}/train/part-00000.parquet"
    md = pq.ParquetFile(path).metadata
    col = md.row_group(1).column(1)
    data = bytearray(fs.cat_file(path))
    lo = col.data_page_offset
    data[lo + 5: lo + 40] = b"\x00" * 35  # smash the second row group's page header/data
    fs.pipe_file(path, bytes(data))
    # The page checksums would refuse the row group: this is about data that was corrupt when
    # written (or a dataset read with data.verify_checksums off).
    with pytest.raises(CorruptFileError, match=r"part-00000.parquet row group 1: cannot decode"):
        list(build_train_loader(cfg_for(uri, verify_checksums=False)))
    ld = build_train_loader(cfg_for(uri, quarantine=True, verify_checksums=False))
    got = list(ld)
    assert ld.stats["bad_row_groups"] == 1 and ld.stats["bad_rows"] == 4
    assert sum(int((b["targets"] > 0).sum()) for b in got) == 4 * 38


def test_quarantine_counts_and_writes_aside(tmp_path):
    bad = [None, [], [1, 99], [3, 4]]
    uri = _bad_dataset(tmp_path, bad)
    ld = build_train_loader(cfg_for(uri, quarantine=True))
    got = list(ld)
    assert ld.stats["bad_rows"] == 3
    files = ld.stats["quarantine_files"]
    assert len(files) == 1 and "_quarantine/train/shard00001-rg00000.parquet" in files[0]
    q = pq.read_table(files[0]).to_pylist()
    assert [(r["row"], r["field"]) for r in q] == [(2, "item_ids"), (3, "item_ids"), (4, "item_ids")]
    assert q[2]["item_ids"] == [1, 99] and "item id 99 at position 1 >= num_items 50" in q[2]["reason"]
    # good rows still all read: 2 + 3 + 2 + 3 + 1 transitions
    assert sum(int((b["targets"] > 0).sum()) for b in got) == 2 + 3 + 2 + 3 + 1
    # the dataset iterated in-process exposes the same counts on ``stream.stats``
    stream = SequenceStream(cfg_for(uri, quarantine=True))
    assert sum(len(b["inputs"]) for b in stream) == len(torch.cat([b["inputs"] for b in got]))
    assert stream.stats["bad_rows"] == 3 and stream.stats["bad_row_groups"] == 0
    # a resumed reader re-reads a partly consumed row group without counting its bad rows twice
    again = build_train_loader(cfg_for(uri, quarantine=True, batch_size=2))
    _consume(again, 2)
    state = again.state_dict()
    resumed = build_train_loader(cfg_for(uri, quarantine=True, batch_size=2))
    resumed.load_state_dict(state)
    list(resumed)
    assert resumed.stats["bad_rows"] == 3


# -- S3 ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_permanent_error_fails_clearly(s3_server, s3_dataset_root):
    opts = s3_server.storage_options
    identified_dataset(s3_dataset_root, num_shards=2, rows=10, storage_options=opts)
    cfg = cfg_for(s3_dataset_root, storage_options=opts)
    ld = build_train_loader(cfg)
    fs, root = open_fs(s3_dataset_root, opts)
    fs.rm(f"{root}/train/part-00001.parquet")
    start = time.monotonic()
    with pytest.raises(MissingShardError, match=r"s3://.*/train/part-00001.parquet: shard listed in the manifest does not exist"):
        list(ld)
    assert time.monotonic() - start < 20  # not retried for long
    bad = dataclasses.replace(cfg, storage_options={**opts, "secret": "wrong"})
    with pytest.raises((StorageError, PermissionError), match=r"manifest.json"):
        build_train_loader(bad)


@pytest.mark.slow
def test_s3_read_resume_and_server_restart(s3_server, s3_dataset_root):
    opts = s3_server.storage_options
    shards, targets = identified_dataset(s3_dataset_root, num_shards=4, rows=60, storage_options=opts)
    cfg = cfg_for(s3_dataset_root, storage_options=opts, shuffle_buffer=16, num_workers=2, batch_size=4)
    ld = build_train_loader(cfg)
    got = []
    restarted = False
    for i, b in enumerate(ld):
        got.append(b)
        if i == 3 and not restarted:
            s3_server.restart(down_s=1.0)  # SIGKILL mid-read; data kept on disk
            restarted = True
    assert restarted
    assert sorted(received_targets(got)) == targets


def test_iter_row_lengths_checks_like_the_reader(tmp_path):
    from stackrec_dist.data.rows import iter_row_lengths

    uri = _bad_dataset(tmp_path, [[1, 2], [3, 4, 5]])
    lengths = np.concatenate(list(iter_row_lengths(cfg_for(uri))))
    assert sorted(lengths.tolist()) == [2, 3, 3, 3, 4, 4]
    uri = _bad_dataset(tmp_path, [None, [1, 2]])
    with pytest.raises(DataError, match=r"part-00001.parquet row group 0 row 2 field item_ids: null sequence"):
        list(iter_row_lengths(cfg_for(uri)))
    assert sorted(np.concatenate(list(iter_row_lengths(cfg_for(uri, quarantine=True)))).tolist()) == [0, 2, 3, 3, 4, 4]


def test_read_dataset_manifest_names_the_problem(tmp_path):
    from stackrec_dist.data.shards import read_dataset_manifest

    uri = _bad_dataset(tmp_path, [[1, 2]])
    assert read_dataset_manifest(cfg_for(uri)).num_items == 50
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=rf"{blocker}/manifest.json: NotADirectoryError"):
        read_dataset_manifest(cfg_for(str(blocker)))
    with pytest.raises(ManifestError, match="no manifest"):
        read_dataset_manifest(cfg_for(str(tmp_path)))
