import hashlib
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from stackrec_dist.data.manifest import read_manifest
from stackrec_dist.data.storage import open_fs
from stackrec_dist.data.synthetic import SyntheticParams, generate_interactions, generate_sequence_dataset


def test_interactions_deterministic_and_learnable():
    a = generate_interactions(2000, 300, seed=4)
    b = generate_interactions(2000, 300, seed=4)
    c = generate_interactions(2000, 300, seed=5)
    assert a.equals(b) and not a.equals(c)
    assert a.column_names == ["user", "item", "timestamp"]
    users, items, ts = (a.column(k).to_numpy() for k in ("user", "item", "timestamp"))
    assert users.min() == 1 and users.max() == 2000 and items.min() >= 1 and items.max() <= 300
    lens = np.bincount(users)[1:]
    assert lens.min() >= 3 and 20 < lens.mean() < 40
    same_user = users[1:] == users[:-1]
    assert (np.diff(ts)[same_user] > 0).all()  # time-ordered per user
    # Zipf: the most popular item is far above the median one.
    freq = np.sort(np.bincount(items))[::-1]
    assert freq[0] > 20 * np.median(freq[freq > 0])
    # Markov-ish: the top successor of an item follows it far more often than its popularity says.
    prev, nxt = items[:-1][same_user], items[1:][same_user]
    top = int(np.argmax(np.bincount(prev)))
    after = np.bincount(nxt[prev == top], minlength=301)
    best = int(np.argmax(after))
    assert after[best] / after.sum() > 2 * np.bincount(items, minlength=301)[best] / len(items)


def test_written_log_equals_the_table(tmp_path):
    path = generate_interactions(500, 50, seed=1, path=str(tmp_path / "a.parquet"), chunk_users=200)
    assert pq.read_table(path).equals(generate_interactions(500, 50, seed=1, chunk_users=200))


def test_sequence_dataset(tmp_path):
    root = tmp_path / "ds"
    m = generate_sequence_dataset(str(root), 1000, num_items=101, seed=2, num_shards=3, row_group_size=64,
                                  chunk_sequences=300)
    fs, path = open_fs(str(root))
    assert read_manifest(fs, path, verify_checksums=True) == m
    assert (m.num_users, m.num_items) == (1000, 101)
    assert {k: v.rows for k, v in m.splits.items()} == {"train": 1000, "valid": 1000, "test": 1000}
    rows = []
    for shard in m.splits["test"].shards:
        rows += pq.read_table(root / shard.path).to_pylist()
    assert [r["user_id"] for r in rows] == list(range(1000))
    assert all(1 <= i <= 100 for r in rows for i in r["item_ids"])
    valid = [r for s in m.splits["valid"].shards for r in pq.read_table(root / s.path).to_pylist()]
    assert all(v["item_ids"] == t["item_ids"][:-1] for v, t in zip(valid, rows))
    # Same bytes again.
    generate_sequence_dataset(str(tmp_path / "again"), 1000, num_items=101, seed=2, num_shards=3,
                              row_group_size=64, chunk_sequences=300)
    digest = lambda d: {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(Path(d).rglob("*")) if p.is_file()}
    assert digest(root) == digest(tmp_path / "again")


def test_sequence_dataset_speed(tmp_path):
    t0 = time.perf_counter()
    m = generate_sequence_dataset(str(tmp_path / "ds"), 100_000, num_items=10_000, seed=0,
                                  params=SyntheticParams(mean_length=20), num_shards=4)
    elapsed = time.perf_counter() - t0
    assert m.splits["train"].rows == 100_000
    # ~1M sequences must be practical for benchmarks: 100k well under 20 s on 2 cores.
    assert elapsed < 20, elapsed
