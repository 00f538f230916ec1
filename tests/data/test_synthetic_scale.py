"""Production-shaped synthetic data: power laws, sessions, drift; chunked, deterministic."""

import tracemalloc

import numpy as np
import pyarrow.parquet as pq

from stackrec_dist.config import DataConfig, PrepareConfig
from stackrec_dist.data.manifest import read_manifest
from stackrec_dist.data.prepare import prepare_dataset
from stackrec_dist.data.storage import open_fs
from stackrec_dist.data.synthetic_scale import ScaleParams, iter_chunks, write_prepared_dataset, write_raw_interactions
from stackrec_dist.train.data_info import count_windows

P = ScaleParams(num_users=4000, num_items=20_000, interactions=60_000, seed=3)


def _all(p, chunk_users=1000):
    chunks = list(iter_chunks(p, chunk_users))
    return (np.concatenate([c.lengths for c in chunks]), np.concatenate([c.items for c in chunks]),
            np.concatenate([c.timestamps for c in chunks]))


def test_shape_power_laws_sessions_and_drift():
    lengths, items, ts = _all(P)
    assert len(lengths) == 4000 and lengths.min() >= P.min_length
    assert 0.85 * P.interactions < lengths.sum() < 1.15 * P.interactions
    # Power-law lengths: a heavy tail (a geometric law of this mean has P(n > 10 * median) ~ 0).
    assert (lengths > 10 * np.median(lengths)).mean() > 0.01
    # Power-law popularity: the top item far above the median of the items that occur.
    freq = np.bincount(items)
    assert items.min() >= 1 and items.max() <= P.num_items
    assert freq.max() > 50 * np.median(freq[freq > 0])
    # Sessions: per user, many short gaps (in session) and many long ones (between sessions).
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    gaps = np.diff(ts)
    within = np.ones(len(gaps), bool)
    within[offsets[1:-1] - 1] = False
    gaps = gaps[within]
    assert (gaps > 0).all()  # time-ordered per user
    assert 0.5 < (gaps < 3600).mean() < 0.95 and (gaps > 86_400).mean() > 0.05
    # Drift: the most popular items of the first quarter of the span are not those of the last
    # (fresh draws only: the successor table is fixed over time).
    _, items, ts = _all(ScaleParams(**{**P.__dict__, "markov_p": 0.0}))
    early = items[ts < ts.min() + (ts.max() - ts.min()) / 4]
    late = items[ts > ts.max() - (ts.max() - ts.min()) / 4]
    top = lambda x: set(np.argsort(np.bincount(x))[-20:].tolist())  # noqa: E731
    assert len(top(early) & top(late)) < 5


def test_deterministic_with_a_seed():
    a, b = _all(P), _all(P)
    c = _all(ScaleParams(**{**P.__dict__, "seed": 4}))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1][:1000], c[1][:1000])


def test_memory_bounded_by_the_chunk():
    def peak(users):
        p = ScaleParams(**{**P.__dict__, "num_users": users, "interactions": users * 15})
        tracemalloc.start()
        for _ in iter_chunks(p, 1000):
            pass
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, big = peak(2000), peak(16_000)
    assert big < 1.5 * small  # 8x the data, the same chunk


def test_prepared_and_raw_outputs(tmp_path, mem_root):
    manifest = write_prepared_dataset(mem_root + "/prep", P, chunk_users=1000, num_shards=4, row_group_size=256)
    fs, root = open_fs(mem_root + "/prep")
    assert read_manifest(fs, root, verify_checksums=True) == manifest
    lengths, _, _ = _all(P)
    assert manifest.splits["test"].length_histogram["count"] and manifest.splits["test"].rows == 4000
    assert manifest.splits["train"].transitions() == int((lengths - 3).sum())
    assert count_windows(DataConfig(path=mem_root + "/prep", max_len=16)) == manifest.splits["train"].windows(16)

    summary = write_raw_interactions(str(tmp_path / "raw"), P, chunk_users=1000)
    assert summary["files"] == 4 and summary["interactions"] == int(lengths.sum())
    assert pq.read_table(tmp_path / "raw" / "part-00000.parquet").column_names == ["user", "item", "timestamp"]
    report = prepare_dataset(PrepareConfig(source=str(tmp_path / "raw"), output=str(tmp_path / "ds"),
                                           num_shards=2, row_group_size=512))
    assert report.num_users == 4000 and report.interactions_kept == int(lengths.sum())
