"""SortedIds: dense ids in sorted order whatever the partitioning, and partitions that follow the
bound even when every source comes sorted."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from stackrec_dist.data.vocab import SortedIds


def _assign(tmp_path, sources: list[list[str]], per_partition: int) -> tuple[SortedIds, list[np.ndarray]]:
    ids = SortedIds(str(tmp_path / f"ids-{per_partition}"), per_partition)
    for names in sources:
        ids.add(pa.array(names, pa.string()))
    ids.assign(0)
    return ids, [ids.ids(j) for j in range(len(sources))]


def test_sorted_sources_are_split_evenly(tmp_path):
    # 64 sources of 100 ids each, every source sorted ascending and spanning the whole range (as a
    # bucket's users come when the raw log is ordered by user): the sample must not take only
    # each source's smallest id, or the last partition would get nearly everything.
    rng = np.random.default_rng(0)
    users = rng.permutation(6400)
    sources = [[str(u) for u in sorted(users[j::64])] for j in range(64)]
    ids, assigned = _assign(tmp_path, sources, per_partition=256)
    assert ids.partitions == 25
    assert ids.largest_partition <= 2 * 256
    # Dense ids are the global numeric rank of each id, as with one partition.
    for names, got in zip(sources, assigned):
        assert got.tolist() == [int(s) for s in names]


def test_numbering_does_not_depend_on_partitions(tmp_path):
    rng = np.random.default_rng(1)
    sources = [[f"u{v}" for v in rng.integers(0, 3000, size=int(rng.integers(0, 400)))] for _ in range(30)]
    one, a = _assign(tmp_path, sources, per_partition=10**9)
    many, b = _assign(tmp_path, sources, per_partition=256)
    assert one.partitions == 1 and many.partitions > 5
    assert all(x.tolist() == y.tolist() for x, y in zip(a, b))
