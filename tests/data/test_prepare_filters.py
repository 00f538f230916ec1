"""prepare's rating filter (min_rating) and k-core filtering until stable (user_core, item_core)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from stackrec_dist.config import ConfigError, PrepareConfig, config_from_dict
from stackrec_dist.data.errors import BadRowError, SchemaError
from stackrec_dist.data.manifest import read_manifest
from stackrec_dist.data.prepare import prepare_dataset, read_id_map
from stackrec_dist.data.storage import open_fs
from stackrec_dist.data.synthetic import SyntheticParams, generate_interactions

from .conftest import csv_log, write_text
from .test_prepare import by_user, split_rows, tree_digest

# A cascade that only a repeated filter resolves (users >= 3, items >= 3 interactions):
#   round 1: u5 has 2 interactions -> out;       round 2: X falls to 2 (u6, u7) -> out;
#   round 3: u6 falls to 2 (1, Y) -> out;        round 4: Y falls to 2 (u8, u9) -> out;
#   round 5: u8 falls to 2 (1, 2) -> out;        then a, b, c, d, u7, u9 x items 1, 2, 3 are stable.
# u7 and u9 lose an item (X, Y) and stay with exactly 3 interactions.
CASCADE = (
    [(u, i) for u in "abcd" for i in ("1", "2", "3")]
    + [("u5", "X"), ("u5", "1")]
    + [("u6", "X"), ("u6", "1"), ("u6", "Y")]
    + [("u7", "X"), ("u7", "2"), ("u7", "3"), ("u7", "1")]
    + [("u8", "Y"), ("u8", "1"), ("u8", "2")]
    + [("u9", "Y"), ("u9", "2"), ("u9", "3"), ("u9", "1")]
)


def test_k_core_repeats_until_stable(mem_root):
    rows = [(u, i, t) for t, (u, i) in enumerate(CASCADE)]
    src = write_text(f"{mem_root}/log.csv", csv_log(rows))
    out = f"{mem_root}/ds"
    # user_core 2 < min_sequence_length 3: the user threshold inside the loop is 3.
    report = prepare_dataset(PrepareConfig(source=src, output=out, num_shards=2, user_core=2, item_core=3))
    assert read_id_map(out, "users") == {u: k for k, u in enumerate(["a", "b", "c", "d", "u7", "u9"])}
    assert read_id_map(out, "items") == {"1": 1, "2": 2, "3": 3}
    assert (report.num_users, report.num_items, report.interactions_kept) == (6, 4, 18)
    assert (report.users_dropped, report.interactions_dropped) == (3, 10)
    # u7 keeps its rows on the surviving items, in time order (X at t=17 is gone).
    assert by_user(split_rows(out, "test"))[4] == ([2, 3, 1], [18, 19, 20])
    core = report.filters["core"]
    assert (core["user_min"], core["item_min"], core["passes"]) == (3, 3, 6)
    assert core["before"] == {"users": 9, "items": 5, "interactions": 28}
    assert core["after"] == {"users": 6, "items": 3, "interactions": 18}
    assert core["removed"] == {"users": 3, "items": 2, "interactions": 10}
    assert [(r["users"], r["items"], r["interactions"]) for r in core["rounds"]] == [
        (1, 0, 2), (0, 1, 2), (1, 0, 2), (0, 1, 2), (1, 0, 2),
    ]
    fs, root = open_fs(out)
    m = read_manifest(fs, root)
    assert m.num_items == 4 and m.extra["core"] == core
    assert (m.extra["user_core"], m.extra["item_core"], m.extra["min_rating"]) == (2, 3, None)
    assert "5 rounds in 6 passes removed 3 users, 2 items, 10 interactions" in str(report)

    with pytest.raises(ValueError, match=r"no user is left by the filters \(min_sequence_length=3, .*item_core=7"):
        prepare_dataset(PrepareConfig(source=src, output=f"{mem_root}/none", item_core=7))


RATED = [
    ("u1", "10", 5, "4"), ("u1", "2", 3, "1"), ("u1", "7", 4, " 3.0 "), ("u1", "3", 6, "5"),
    ("u2", "7", 1, "2.5"), ("u2", "2", 2, "3"), ("u2", "3", 3, "1e0"), ("u2", "10", 4, "4"),
]


def test_rating_filter_drops_and_counts_rows(mem_root):
    src = write_text(f"{mem_root}/log.csv", csv_log(RATED, header="user,item,timestamp,score"))
    out = f"{mem_root}/ds"
    report = prepare_dataset(PrepareConfig(source=src, output=out, num_shards=1, min_rating=3, rating_column="score"))
    # u1 keeps 3 rows (>= min_sequence_length); u2 keeps 2 and is dropped as too short.
    assert (report.rows_read, report.rows_bad, report.num_users, report.interactions_kept) == (8, 0, 1, 3)
    assert (report.users_dropped, report.interactions_dropped) == (1, 2)
    assert report.filters["rows_below_min_rating"] == 3 and report.filters["core"] is None
    assert read_id_map(out, "items") == {"3": 1, "7": 2, "10": 3}  # item 2 survives in no row
    assert by_user(split_rows(out, "test")) == {0: ([2, 3, 1], [4, 5, 6])}
    fs, root = open_fs(out)
    extra = read_manifest(fs, root).extra
    assert (extra["min_rating"], extra["rating_column"], extra["rows_below_min_rating"]) == (3.0, "score", 3)
    assert "rating filter (score >= 3): 3 rows dropped" in str(report)
    # Without min_rating the column is not read: every row counts.
    report = prepare_dataset(PrepareConfig(source=src, output=f"{mem_root}/all", num_shards=1))
    assert report.interactions_kept == 8 and report.filters["rows_below_min_rating"] == 0


def test_rating_filter_without_the_column_is_one_error(mem_root):
    src = write_text(f"{mem_root}/log.csv", csv_log([(r[0], r[1], r[2]) for r in RATED]))
    with pytest.raises(SchemaError, match=r"log.csv field rating: missing rating column 'rating'") as err:
        prepare_dataset(PrepareConfig(source=src, output=f"{mem_root}/ds", min_rating=3))
    assert (err.value.path, err.value.field) == (src, "rating")


def test_bad_rating_is_a_bad_row(mem_root):
    rows = RATED + [("u1", "3", 7, None), ("u2", "3", 8, "good")]
    src = write_text(f"{mem_root}/log.csv", csv_log(rows, header="user,item,timestamp,rating"))
    out = f"{mem_root}/ds"
    with pytest.raises(BadRowError, match=r"log.csv row 8 field rating: null value \(line 10\)"):
        prepare_dataset(PrepareConfig(source=src, output=out, min_rating=3))
    report = prepare_dataset(PrepareConfig(source=src, output=out, min_rating=3, num_shards=1, quarantine=True))
    assert (report.rows_read, report.rows_bad, report.interactions_kept) == (10, 2, 3)
    assert report.filters["rows_below_min_rating"] == 3  # bad rows are not counted twice
    fs, root = open_fs(out)
    with fs.open(f"{root}/_quarantine/bad_rows.parquet", "rb") as f:
        bad = pq.read_table(f).to_pylist()
    assert [(b["row"], b["field"], b["reason"], b["rating"]) for b in bad] == [
        (8, "rating", "null value", None),
        (9, "rating", "not a number: 'good'", "good"),
    ]


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("min_rating", "high", "must be a finite number or null"),
        ("user_core", -1, "must be >= 0"),
        ("item_core", -2, "must be >= 0"),
        ("rating_column", "item", "must be a column name other than"),
    ],
)
def test_filter_options_are_validated(field, value, rule):
    with pytest.raises(ConfigError, match=rf"prepare\.{field} {rule}"):
        config_from_dict({"prepare": {"min_rating": 3, field: value}})


# -- A larger log: several rounds, any number of buckets, an in-memory reference ----------------


@pytest.fixture(scope="module")
def rated_log(tmp_path_factory):
    table = generate_interactions(1500, 400, seed=11, params=SyntheticParams(mean_length=12, min_length=1))
    rng = np.random.default_rng(0)
    table = table.append_column("rating", pa.array(rng.integers(1, 6, table.num_rows)))
    path = tmp_path_factory.mktemp("rated") / "log.parquet"
    pq.write_table(table, path)
    return str(path)


FILTERS = {"min_rating": 3, "user_core": 5, "item_core": 10}


def reference_k_core(path: str) -> pa.Table:
    """Rating filter, then RecBole's loop, whole in memory."""
    t = pq.read_table(path)
    t = t.filter(pc.greater_equal(t["rating"], FILTERS["min_rating"]))
    while True:
        users = t.group_by("user").aggregate([("user", "count")])
        items = t.group_by("item").aggregate([("item", "count")])
        ban_u = users.filter(pc.less(users["user_count"], FILTERS["user_core"]))["user"]
        ban_i = items.filter(pc.less(items["item_count"], FILTERS["item_core"]))["item"]
        if len(ban_u) == 0 and len(ban_i) == 0:
            return t
        t = t.filter(pc.invert(pc.or_(pc.is_in(t["user"], ban_u), pc.is_in(t["item"], ban_i))))


def test_filters_match_reference_and_bytes_do_not_depend_on_memory(rated_log, tmp_path):
    def run(name, **kw):
        cfg = PrepareConfig(source=rated_log, output=str(tmp_path / name), num_shards=3, row_group_size=50,
                            time_slices=2, memory_limit_mb=kw.pop("memory_limit_mb", 1024), **FILTERS)
        return prepare_dataset(cfg, **kw), tree_digest(tmp_path / name)

    r1, d1 = run("one", num_buckets=1)
    r2, d2 = run("many", num_buckets=64)
    r3, d3 = run("small", memory_limit_mb=1)
    assert r2.spill_buckets == 64 and r3.partitions > 1
    assert d1 == d2 == d3
    assert r1.filters == r2.filters == r3.filters and len(r1.filters["core"]["rounds"]) >= 3

    ref = reference_k_core(rated_log)
    users, items = read_id_map(r1.output, "users"), read_id_map(r1.output, "items")
    assert set(users) == {str(u) for u in pc.unique(ref["user"]).to_pylist()}
    assert set(items) == {str(i) for i in pc.unique(ref["item"]).to_pylist()}
    assert r1.num_items == len(items) + 1 and r1.interactions_kept == ref.num_rows
    assert r1.filters["core"]["after"] == {"users": len(users), "items": len(items), "interactions": ref.num_rows}
    df = ref.to_pandas()
    df["pos"] = np.arange(len(df))  # input order breaks timestamp ties
    expected = {
        users[str(u)]: ([items[str(i)] for i in g["item"]], g["timestamp"].tolist())
        for u, g in df.sort_values(["user", "timestamp", "pos"]).groupby("user")
    }
    assert by_user(split_rows(r1.output, "test")) == expected


def test_domains_share_the_filtered_item_map(rated_log, tmp_path):
    outs = {}
    for subset in ("all", "source", "target"):
        outs[subset] = str(tmp_path / subset)
        prepare_dataset(PrepareConfig(source=rated_log, output=outs[subset], user_subset=subset, num_shards=1,
                                      **FILTERS))
    maps = {k: read_id_map(v, "items") for k, v in outs.items()}
    assert maps["all"] == maps["source"] == maps["target"]
    users = {k: set(read_id_map(v, "users")) for k, v in outs.items()}
    assert users["source"].isdisjoint(users["target"]) and users["source"] | users["target"] == users["all"]
