import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from stackrec_dist.config import PrepareConfig
from stackrec_dist.data.errors import BadRowError, ManifestError
from stackrec_dist.data.manifest import SEQUENCE_SCHEMA, read_manifest
from stackrec_dist.data.prepare import prepare_dataset, read_id_map
from stackrec_dist.data import prepare as prepare_module
from stackrec_dist.data.storage import open_fs
from stackrec_dist.data.synthetic import SyntheticParams, generate_interactions

from .conftest import csv_log, write_text

REPO = Path(__file__).resolve().parents[2]

# u1 has a timestamp tie (items 2 and 7 at t=3: input order 2, 7 must be kept); u3 is too short.
LOG = [
    ("u1", "10", 5),
    ("u2", "7", 1),
    ("u1", "2", 3),
    ("u1", "7", 3),
    ("u2", "2", 2),
    ("u3", "3", 1),
    ("u2", "3", 2),
    ("u1", "10", 9),
    ("u2", "2", 4),
]
# Dense items in numeric original-id order: 2 -> 1, 3 -> 2, 7 -> 3, 10 -> 4. Users: u1 -> 0, u2 -> 1.
U1 = ([1, 3, 4, 4], [3, 3, 5, 9])
U2 = ([3, 1, 2, 1], [1, 2, 2, 4])


def split_rows(uri: str, split: str) -> list[dict]:
    fs, root = open_fs(uri)
    m = read_manifest(fs, root, verify_checksums=True)
    rows = []
    for shard in m.splits[split].shards:
        with fs.open(f"{root}/{shard.path}", "rb") as f:
            table = pq.read_table(f)
        assert table.schema.equals(SEQUENCE_SCHEMA)
        rows += table.to_pylist()
    return rows


def by_user(rows: list[dict]) -> dict[int, tuple[list[int], list[int]]]:
    return {r["user_id"]: (r["item_ids"], r["timestamps"]) for r in rows}


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_exact_sequences_leave_last_out(kind, mem_root, tmp_path):
    base = mem_root if kind == "memory" else str(tmp_path)
    src = write_text(f"{base}/raw/log.csv", csv_log(LOG))
    out = f"{base}/ds"
    report = prepare_dataset(PrepareConfig(source=src, output=out, num_shards=2, row_group_size=1))
    assert (report.num_users, report.num_items, report.interactions_kept) == (2, 5, 8)
    assert (report.users_dropped, report.interactions_dropped, report.rows_read, report.rows_bad) == (1, 1, 9, 0)
    assert by_user(split_rows(out, "test")) == {0: U1, 1: U2}
    assert by_user(split_rows(out, "valid")) == {0: (U1[0][:-1], U1[1][:-1]), 1: (U2[0][:-1], U2[1][:-1])}
    assert by_user(split_rows(out, "train")) == {0: (U1[0][:-2], U1[1][:-2]), 1: (U2[0][:-2], U2[1][:-2])}
    assert all(r["time_slice"] == 0 and r["domain"] is None for r in split_rows(out, "train"))

    fs, root = open_fs(out)
    m = read_manifest(fs, root)
    assert (m.num_items, m.num_users, m.protocol) == (5, 2, "leave_last_out")
    assert m.extra["users_dropped"] == 1 and m.extra["interactions_dropped"] == 1
    assert [len(s.shards) for s in m.splits.values()] == [2, 2, 2]
    # Id maps: saved, dense, and they invert the remapping back to the original log.
    items, users = read_id_map(out, "items"), read_id_map(out, "users")
    assert items == {"2": 1, "3": 2, "7": 3, "10": 4} and users == {"u1": 0, "u2": 1}
    inv_items = {v: k for k, v in items.items()}
    inv_users = {v: k for k, v in users.items()}
    for uid, (seq, ts) in by_user(split_rows(out, "test")).items():
        original = [(i, t) for (u, i, t) in LOG if u == inv_users[uid]]
        assert sorted(original, key=lambda x: x[1]) == [(inv_items[i], t) for i, t in zip(seq, ts)]


def test_string_ids_sort_as_strings(mem_root):
    rows = [("b", "x10", 1), ("b", "x9", 2), ("b", "x10", 3), ("a", "x9", 1), ("a", "x9", 2), ("a", "x10", 3)]
    src = write_text(f"{mem_root}/log.csv", csv_log(rows))
    prepare_dataset(PrepareConfig(source=src, output=f"{mem_root}/ds", num_shards=1))
    assert read_id_map(f"{mem_root}/ds", "items") == {"x10": 1, "x9": 2}
    assert read_id_map(f"{mem_root}/ds", "users") == {"a": 0, "b": 1}


def test_held_out(tmp_path):
    src = str(tmp_path / "log.parquet")
    generate_interactions(400, 50, seed=3, params=SyntheticParams(mean_length=8), path=src)
    cfg = PrepareConfig(
        source=src, output=str(tmp_path / "ds"), split="held_out", held_out_fraction=0.2, num_shards=3, seed=5,
        time_slices=2,
    )
    report = prepare_dataset(cfg)
    # Slices come from the training users only; the last one is the training split.
    assert by_user(split_rows(cfg.output, "slice-2")) == by_user(split_rows(cfg.output, "train"))
    assert set(by_user(split_rows(cfg.output, "slice-1"))) <= set(by_user(split_rows(cfg.output, "train")))
    splits = {name: by_user(split_rows(cfg.output, name)) for name in ("train", "valid", "test")}
    users = [set(s) for s in splits.values()]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert len(users[0] | users[1] | users[2]) == report.num_users == 400
    assert 40 <= len(users[1]) <= 120 and 40 <= len(users[2]) <= 120
    # Full sequences, whatever the split.
    assert sum(len(v[0]) for s in splits.values() for v in s.values()) == report.interactions_kept
    # Another seed, another assignment.
    other = prepare_dataset(PrepareConfig(**{**cfg.__dict__, "output": str(tmp_path / "ds2"), "seed": 6}))
    assert set(by_user(split_rows(other.output, "test"))) != users[2]


def test_time_slices(mem_root):
    # 2 users x 6 interactions; timestamps 1..12 interleaved.
    rows = [("a", str(k), 2 * k - 1) for k in range(1, 7)] + [("b", str(k), 2 * k) for k in range(1, 7)]
    src = write_text(f"{mem_root}/log.csv", csv_log(rows))
    out = f"{mem_root}/ds"
    report = prepare_dataset(PrepareConfig(source=src, output=out, time_slices=3, num_shards=1))
    # N = 12 interactions: boundaries are the 4th and 8th smallest timestamps.
    assert report.time_slice_boundaries == [4, 8]
    train = by_user(split_rows(out, "train"))
    s1, s2, s3 = (split_rows(out, f"slice-{k}") for k in (1, 2, 3))
    assert by_user(s1) == {0: ([1, 2], [1, 3]), 1: ([1, 2], [2, 4])}
    assert by_user(s2) == {0: ([1, 2, 3, 4], [1, 3, 5, 7]), 1: ([1, 2, 3, 4], [2, 4, 6, 8])}
    assert by_user(s3) == train  # the last slice is the training split: no valid/test leakage
    assert {r["time_slice"] for r in s2} == {2}
    assert len(split_rows(out, "test")) == 2
    fs, root = open_fs(out)
    assert read_manifest(fs, root).extra["time_slice_boundaries"] == [4, 8]


def test_time_slice_drops_empty_rows(mem_root):
    rows = [("a", "1", 1), ("a", "2", 2), ("a", "3", 3), ("a", "4", 4)] + [("b", str(k), 100 + k) for k in range(1, 9)]
    src = write_text(f"{mem_root}/log.csv", csv_log(rows))
    report = prepare_dataset(PrepareConfig(source=src, output=f"{mem_root}/ds", time_slices=2, num_shards=1))
    assert report.time_slice_boundaries == [102]
    assert by_user(split_rows(f"{mem_root}/ds", "slice-1")) == {0: ([1, 2], [1, 2]), 1: ([1, 2], [101, 102])}
    rows = [("a", "1", t) for t in (1, 2, 3)] + [("b", "2", t) for t in (50, 51, 52)]
    src = write_text(f"{mem_root}/log2.csv", csv_log(rows))
    report = prepare_dataset(PrepareConfig(source=src, output=f"{mem_root}/ds2", time_slices=2, num_shards=1))
    # b's training interaction comes after the boundary (3): b has no slice-1 row.
    assert report.time_slice_boundaries == [3]
    assert [r["user_id"] for r in split_rows(f"{mem_root}/ds2", "slice-1")] == [0]


@pytest.fixture(scope="module")
def synthetic_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "log.parquet"
    generate_interactions(3000, 400, seed=11, params=SyntheticParams(mean_length=12, min_length=1), path=str(path))
    return str(path)


def test_deterministic_bytes_and_independent_of_partitions(synthetic_log, tmp_path, monkeypatch):
    def run(name, **kw):
        out = tmp_path / name
        cfg = PrepareConfig(source=synthetic_log, output=str(out), num_shards=3, row_group_size=100, time_slices=2)
        for k, v in kw.pop("cfg", {}).items():
            setattr(cfg, k, v)
        report = prepare_dataset(cfg, **kw)
        return report, tree_digest(out)

    r1, d1 = run("a")
    _, d2 = run("b")
    r3, d3 = run("c", num_buckets=64)
    r4, d4 = run("d", cfg={"memory_limit_mb": 1})
    r5, d5 = run("e", num_buckets=256, cfg={"memory_limit_mb": 1})
    assert (r1.spill_buckets, r1.partitions, r3.spill_buckets) == (1, 1, 64)
    assert r4.partitions > 1 and r5.partitions > 1 and r4.spill_buckets != r5.spill_buckets
    assert r1.users_dropped > 0  # min_length=1 in the generator: some users are too short
    # The id vocabularies' external sort in many partitions (users and items) changes nothing either.
    monkeypatch.setattr(prepare_module, "NAME_BYTES", 10**6)
    r6, d6 = run("f", num_buckets=16, cfg={"memory_limit_mb": 1})
    assert r1.extra["id_sort_partitions"] == {"users": 1, "items": 1}
    assert r6.extra["id_sort_partitions"]["users"] > 8 and r6.extra["id_sort_partitions"]["items"] > 8
    assert d1 == d2 == d3 == d4 == d5 == d6
    assert len(d1) == 4 + 3 * 5  # manifest, 2 id maps, item counts, 3 shards x 5 splits
    # Exact row groups: every shard but the last row group holds row_group_size rows.
    fs, root = open_fs(str(tmp_path / "a"))
    m = read_manifest(fs, root)
    for split in m.splits.values():
        for shard in split.shards:
            md = pq.ParquetFile(f"{root}/{shard.path}").metadata
            sizes = [md.row_group(k).num_rows for k in range(md.num_row_groups)]
            assert all(s == 100 for s in sizes[:-1]) and 0 < (sizes[-1] if sizes else 1) <= 100
            assert (md.num_rows, md.num_row_groups) == (shard.rows, shard.row_groups)


def test_output_matches_a_simple_in_memory_reference(synthetic_log, tmp_path):
    out = str(tmp_path / "ds")
    prepare_dataset(PrepareConfig(source=synthetic_log, output=out, num_shards=4), num_buckets=8)
    t = pq.read_table(synthetic_log).to_pandas()
    t["pos"] = np.arange(len(t))
    expected = {}
    users, items = read_id_map(out, "users"), read_id_map(out, "items")
    for user, g in t.sort_values(["user", "timestamp", "pos"]).groupby("user"):
        if len(g) >= 3:
            expected[users[str(user)]] = ([items[str(i)] for i in g["item"]], g["timestamp"].tolist())
    assert by_user(split_rows(out, "test")) == expected


def test_quarantine_writes_bad_rows_aside(mem_root):
    rows = LOG + [(None, "2", 7), ("u2", "3", "soon"), ("u1", None, 8)]
    src = write_text(f"{mem_root}/log.csv", csv_log(rows))
    out = f"{mem_root}/ds"
    with pytest.raises(BadRowError, match=r"log.csv row 9 field user: null value"):
        prepare_dataset(PrepareConfig(source=src, output=out))
    fs, root = open_fs(out)
    with pytest.raises(ManifestError):  # a failed prepare leaves no dataset that looks complete
        read_manifest(fs, root)
    report = prepare_dataset(PrepareConfig(source=src, output=out, num_shards=1), quarantine=True)
    assert (report.rows_read, report.rows_bad, report.interactions_kept) == (12, 3, 8)
    assert report.quarantine_path == f"{out}/_quarantine/bad_rows.parquet"
    with fs.open(f"{root}/_quarantine/bad_rows.parquet", "rb") as f:
        bad = pq.read_table(f).to_pylist()
    assert [(b["row"], b["field"], b["reason"]) for b in bad] == [
        (9, "user", "null value"),
        (10, "timestamp", "unparsable timestamp 'soon'"),
        (11, "item", "null value"),
    ]
    assert bad[1]["file"] == src and bad[1]["user"] == "u2"
    m = read_manifest(fs, root)
    assert m.extra["rows_bad"] == 3 and m.extra["quarantine"] == "_quarantine/bad_rows.parquet"
    assert by_user(split_rows(out, "test")) == {0: U1, 1: U2}


def test_rerun_replaces_previous_output(mem_root):
    src = write_text(f"{mem_root}/log.csv", csv_log(LOG))
    out = f"{mem_root}/ds"
    prepare_dataset(PrepareConfig(source=src, output=out, num_shards=4, time_slices=2))
    prepare_dataset(PrepareConfig(source=src, output=out, num_shards=1))
    fs, root = open_fs(out)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [
        "id_maps", "manifest.json", "stats", "test", "train", "valid",
    ]
    assert len(fs.ls(f"{root}/train")) == 1


def test_no_user_long_enough(mem_root):
    src = write_text(f"{mem_root}/log.csv", csv_log([("a", "1", 1), ("b", "1", 1)]))
    with pytest.raises(ValueError, match="no user has >= min_sequence_length=3"):
        prepare_dataset(PrepareConfig(source=src, output=f"{mem_root}/ds"))


def test_synthetic_source(tmp_path):
    cfg = PrepareConfig(source="synthetic", output=str(tmp_path / "ds"), synthetic_users=200, synthetic_items=30)
    report = prepare_dataset(cfg, cache_dir=str(tmp_path / "cache"))
    assert report.num_users == 200 and 2 <= report.num_items <= 31
    assert report.splits == {"train": 200, "valid": 200, "test": 200}


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa, pyarrow.csv as pacsv
    from stackrec_dist.config import PrepareConfig
    from stackrec_dist.data.prepare import prepare_dataset

    def kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    src, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # Warm up on a tiny log so library code pages and allocator set-up are not counted.
    warm = pa.table({"user": [1, 1, 1], "item": [1, 2, 3], "timestamp": [1, 2, 3]})
    pacsv.write_csv(warm, out + "-warm.csv")
    prepare_dataset(PrepareConfig(source=out + "-warm.csv", output=out + "-warm", memory_limit_mb=limit, row_group_size=256))
    base = kb("VmRSS")
    r = prepare_dataset(PrepareConfig(source=src, output=out, memory_limit_mb=limit, row_group_size=256))
    print(json.dumps({"growth_mb": (kb("VmHWM") - base) / 1024, "buckets": r.spill_buckets,
                      "partitions": r.partitions, "interactions": r.interactions_kept, "bytes": r.input_bytes}))
    """
)

# Fixed part of the allowance: Arrow's mimalloc pool keeps per-thread segments, plus CSV/Parquet
# I/O buffers and the shard writers' pending row groups. Measured here: 45 MB of growth with a
# 16 MB limit, against 270 MB when the same log is prepared in one partition.
MEMORY_OVERHEAD_MB = 56


@pytest.mark.slow  # over 5 s on 2 cores
def test_memory_bound(tmp_path):
    # ~58 MB of CSV (2.8M interactions); prepared in one partition it costs ~270 MB of RSS.
    log = generate_interactions(20000, 5000, seed=1, params=SyntheticParams(mean_length=150, max_length=400))
    src = tmp_path / "log.csv"
    pacsv.write_csv(log, src)
    del log
    limit = 16
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(src), str(tmp_path / "out"), str(limit)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["bytes"] > 55e6 and res["interactions"] > 2_500_000
    assert res["partitions"] > 8
    assert res["growth_mb"] < limit + MEMORY_OVERHEAD_MB, res


@pytest.mark.slow
def test_s3_source_and_output_match_local(s3_dataset_root, s3_server, s3_fs, tmp_path):
    opts = s3_server.storage_options
    src = f"{s3_dataset_root}/raw/log.csv"
    with s3_fs.open(src, "wb") as f:
        f.write(csv_log(LOG + [("u2", "10", 3)]).encode())
    out = f"{s3_dataset_root}/ds"
    cfg = PrepareConfig(source=src, output=out, num_shards=2, row_group_size=1, time_slices=2)
    report = prepare_dataset(cfg, storage_options=opts)
    assert report.num_users == 2 and report.splits["test"] == 2
    fs, root = open_fs(out, opts)
    m = read_manifest(fs, root, verify_checksums=True)
    assert [k for k in m.splits] == ["train", "valid", "test", "slice-1", "slice-2"]
    # Same bytes as a local run of the same log.
    local_src = write_text(str(tmp_path / "log.csv"), csv_log(LOG + [("u2", "10", 3)]))
    prepare_dataset(PrepareConfig(**{**cfg.__dict__, "source": local_src, "output": str(tmp_path / "ds")}))
    local = tree_digest(tmp_path / "ds")
    remote = {p[len(root) + 1:]: hashlib.sha256(fs.cat(p)).hexdigest() for p in fs.find(root)}
    assert remote.keys() == local.keys()
    assert {k: v for k, v in remote.items() if k != "manifest.json"} == {
        k: v for k, v in local.items() if k != "manifest.json"
    }
    # The manifests differ only in the recorded source.
    ml, mr = json.loads((tmp_path / "ds" / "manifest.json").read_text()), json.loads(fs.cat(f"{root}/manifest.json"))
    assert ml["extra"].pop("source") == local_src and mr["extra"].pop("source") == src
    assert ml == mr


# -- TF: source / target domains -------------------------------------------------------------


def _domain_prepare(tmp_path, subset, name=None, **kw):
    out = tmp_path / (name or subset)
    cfg = PrepareConfig(source="synthetic", output=str(out), synthetic_users=400, synthetic_items=60,
                        num_shards=2, row_group_size=64, user_subset=subset, **kw)
    report = prepare_dataset(cfg, cache_dir=str(tmp_path / "cache"))
    return report, str(out)


@pytest.fixture(scope="module")
def tf_domains(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tf")
    return {subset: _domain_prepare(tmp, subset) for subset in ("all", "source", "target")}


def test_domains_are_disjoint_and_cover_all_users(tf_domains):
    ids = {k: set(read_id_map(out, "users")) for k, (_, out) in tf_domains.items()}
    assert ids["source"].isdisjoint(ids["target"])
    assert ids["source"] | ids["target"] == ids["all"]
    for k, (report, out) in tf_domains.items():
        assert report.num_users == len(ids[k])
        rows = split_rows(out, "test")
        assert len(rows) == report.num_users  # every kept user has its leave-last-out rows
        assert {r["domain"] for r in rows} == {None if k == "all" else k}
    # Users keep their original sequences: compare one user's test row through the id maps.
    all_users, src_users = read_id_map(tf_domains["all"][1], "users"), read_id_map(tf_domains["source"][1], "users")
    some = sorted(ids["source"])[:5]
    rows_all, rows_src = by_user(split_rows(tf_domains["all"][1], "test")), by_user(split_rows(tf_domains["source"][1], "test"))
    assert [rows_all[all_users[u]] for u in some] == [rows_src[src_users[u]] for u in some]


def test_domains_share_one_item_id_map(tf_domains):
    maps = {k: read_id_map(out, "items") for k, (_, out) in tf_domains.items()}
    assert maps["source"] == maps["target"] == maps["all"]
    nums = {k: r.num_items for k, (r, _) in tf_domains.items()}
    assert nums["source"] == nums["target"] == nums["all"] == len(maps["all"]) + 1
    for k, (report, out) in tf_domains.items():
        fs, root = open_fs(out)
        extra = read_manifest(fs, root).extra
        assert (extra["user_subset"], extra["seed"]) == (k, 0)
        assert extra["target_user_fraction"] == (None if k == "all" else 0.2)
    # The target holds fewer items than the catalogue: ids are shared, not renumbered per domain.
    used = {i for r in split_rows(tf_domains["target"][1], "test") for i in r["item_ids"]}
    assert max(used) < nums["target"]


def test_domain_fraction_roughly_respected(tf_domains):
    n_all = tf_domains["all"][0].num_users
    n_target = tf_domains["target"][0].num_users
    assert n_target + tf_domains["source"][0].num_users == n_all
    assert 0.13 < n_target / n_all < 0.27  # 400 users, expected 0.2 (binomial sd 0.02)
    _, extra_out = tf_domains["target"]
    fs, root = open_fs(extra_out)
    assert read_manifest(fs, root).extra["users_other_domain"] == n_all - n_target


def test_domain_split_deterministic_and_seeded(tf_domains, tmp_path):
    _, again = _domain_prepare(tmp_path, "target", name="again")
    assert tree_digest(Path(again)) == tree_digest(Path(tf_domains["target"][1]))
    # The memory budget (spill fan-out, partitions) does not change a byte.
    _, budget = _domain_prepare(tmp_path, "source", name="budget", memory_limit_mb=1)
    assert tree_digest(Path(budget)) == tree_digest(Path(tf_domains["source"][1]))
    # A larger fraction takes a larger part of the same hash range: the targets nest.
    _, half = _domain_prepare(tmp_path, "target", name="half", target_user_fraction=0.5)
    assert set(read_id_map(tf_domains["target"][1], "users")) < set(read_id_map(half, "users"))


def test_domain_split_of_a_small_log(mem_root):
    from stackrec_dist.data.prepare import domain_of

    # With seed 0 and fraction 0.5, u1 falls in the target and u2 in the source (u3 is too short).
    assert [domain_of(u, 0, 0.5) for u in ("u1", "u2")] == ["target", "source"]
    src = write_text(f"{mem_root}/log.csv", csv_log(LOG))
    for subset, user, rows in (("target", "u1", U1), ("source", "u2", U2)):
        out = f"{mem_root}/{subset}"
        report = prepare_dataset(PrepareConfig(source=src, output=out, num_shards=1, user_subset=subset,
                                               target_user_fraction=0.5))
        assert read_id_map(out, "users") == {user: 0}
        assert read_id_map(out, "items") == {"2": 1, "3": 2, "7": 3, "10": 4}  # as with user_subset=all
        assert report.num_items == 5 and by_user(split_rows(out, "test")) == {0: rows}
    # Seed 1 puts both users in the source: an empty target is an error naming the field.
    assert [domain_of(u, 1, 0.5) for u in ("u1", "u2")] == ["source", "source"]
    with pytest.raises(ValueError, match=r"prepare.user_subset='target': no user"):
        prepare_dataset(PrepareConfig(source=src, output=f"{mem_root}/empty", user_subset="target",
                                      target_user_fraction=0.5, seed=1))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_bad_target_user_fraction_is_rejected(bad, tmp_path):
    from stackrec_dist.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"prepare\.target_user_fraction must be in \(0, 1\)"):
        config_from_dict({"prepare": {"target_user_fraction": bad}})
    with pytest.raises(ConfigError, match=r"prepare\.target_user_fraction"):
        prepare_dataset(PrepareConfig(source="synthetic", output=str(tmp_path / "x"), target_user_fraction=bad,
                                      user_subset="target"))
    with pytest.raises(ConfigError, match=r"prepare\.user_subset must be one of"):
        config_from_dict({"prepare": {"user_subset": "both"}})


VOCAB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq
    from stackrec_dist.config import PrepareConfig
    from stackrec_dist.data.prepare import prepare_dataset

    def kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    out, users, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    warm = pa.table({"user": ["a", "a", "a"], "item": ["1", "2", "3"], "timestamp": [1, 2, 3]})
    pq.write_table(warm, out + "-warm.parquet")
    prepare_dataset(PrepareConfig(source=out + "-warm.parquet", output=out + "-warm", memory_limit_mb=limit))
    # Every user and (almost) every item distinct: 3 interactions per user, string user ids, big
    # integer item ids. Written in slices so the log itself is never held whole.
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(out + ".parquet", pa.schema([("user", pa.string()), ("item", pa.string()),
                                                       ("timestamp", pa.int64())])) as w:
        for start in range(0, users, 50_000):
            n = min(50_000, users - start)
            u = np.repeat(np.arange(start, start + n), 3)
            w.write_table(pa.table({
                "user": pa.array([f"user-{k:09d}" for k in u.tolist()]),
                "item": pa.array([str(x) for x in rng.integers(10**12, 10**13, 3 * n).tolist()]),
                "timestamp": pa.array(np.tile(np.arange(3), n)),
            }))
    base = kb("VmRSS")
    r = prepare_dataset(PrepareConfig(source=out + ".parquet", output=out, memory_limit_mb=limit, num_shards=2))
    print(json.dumps({"growth_mb": (kb("VmHWM") - base) / 1024, "users": r.num_users, "items": r.num_items,
                      "id_sort_partitions": r.extra["id_sort_partitions"]}))
    """
)


@pytest.mark.slow  # over 5 s on 2 cores
def test_memory_bound_with_many_distinct_ids(tmp_path):
    """The id vocabularies stay on disk: 4x the distinct ids, the same resident memory."""

    def run(users):
        proc = subprocess.run(
            [sys.executable, "-c", VOCAB_SCRIPT, str(tmp_path / f"out-{users}"), str(users), "16"],
            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    small, big = run(60_000), run(240_000)
    assert big["users"] == 240_000 and big["items"] > 700_000
    assert big["id_sort_partitions"]["users"] > 4 and big["id_sort_partitions"]["items"] > 4
    # In memory, 480k more distinct ids cost ~170 bytes each as Python strings in a dict: ~80 MB.
    assert big["growth_mb"] - small["growth_mb"] < 20, (small, big)
    assert big["growth_mb"] < 16 + MEMORY_OVERHEAD_MB, big
    # Ids follow sorted original-id order: string order for users, numeric for the items.
    users = read_id_map(str(tmp_path / "out-60000"), "users")
    assert list(users) == sorted(users) and list(users.values()) == list(range(60_000))
    items = read_id_map(str(tmp_path / "out-60000"), "items")
    assert [int(k) for k in items] == sorted(int(k) for k in items)


def test_write_block_follows_the_bound_within_s3_part_sizes():
    from stackrec_dist.data.prepare import write_block_bytes

    assert write_block_bytes(16) == 5 << 20  # S3's smallest part
    assert write_block_bytes(128) == 8 << 20
    assert write_block_bytes(4096) == 50 << 20  # s3fs's default block, no larger
