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


def _reference(sources: list[list[str]]) -> list[list[int]]:
    # The numbering rule written out with Python's sort: numeric when every id is an integer.
    from stackrec_dist.data.vocab import sort_key

    names = [s for src in sources for s in src]
    all_int = all(s.lstrip("-").isdigit() and s.count("-") <= 1 and not s.endswith("-")
                  and (s[0] == "-" or s[0].isdigit()) for s in names)
    rank = {s: k for k, s in enumerate(sorted(set(names), key=sort_key(all_int)))}
    return [[rank[s] for s in src] for src in sources]


def _check_against_reference(tmp_path, sources: list[list[str]]) -> None:
    want = _reference(sources)
    for per_partition in (256, 10**9):
        _, got = _assign(tmp_path, sources, per_partition)
        assert [g.tolist() for g in got] == want


def test_non_ascii_ids_follow_python_string_order(tmp_path):
    # Arrow sorts strings by UTF-8 bytes; Python by code point. The two agree, including for
    # characters outside the BMP (4-byte UTF-8) against those just below the surrogates.
    rng = np.random.default_rng(2)
    alphabet = ["a", "Z", "é", "ß", "中", "日", "\uffff", "\ue000", "😀", "𝔘", "0", "9", " ", "~"]
    pool = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 6)))) for _ in range(2000)]
    sources = [[pool[k] for k in rng.integers(0, len(pool), size=int(rng.integers(0, 300)))] for _ in range(20)]
    _check_against_reference(tmp_path, sources)


def test_integer_ids_numeric_order_with_ties_by_string(tmp_path):
    # "007" and "7" are the same number: ordered by string after the value; negatives first.
    rng = np.random.default_rng(3)
    pool = [str(v) for v in rng.integers(-5000, 5000, size=1500)] + ["007", "7", "-0", "0", "00", "-07"]
    sources = [[pool[k] for k in rng.integers(0, len(pool), size=int(rng.integers(0, 300)))] for _ in range(20)]
    _check_against_reference(tmp_path, sources)


def test_integer_ids_beyond_int64(tmp_path):
    rng = np.random.default_rng(4)
    pool = [str(int(v) * 10**15 + int(w)) for v, w in zip(rng.integers(-10**6, 10**6, size=800),
                                                          rng.integers(0, 10**6, size=800))]
    pool += ["9" * 30, "-" + "9" * 25, "12"]
    sources = [[pool[k] for k in rng.integers(0, len(pool), size=int(rng.integers(0, 200)))] for _ in range(15)]
    _check_against_reference(tmp_path, sources)
