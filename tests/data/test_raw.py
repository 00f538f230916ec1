import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stackrec_dist.data.errors import BadRowError, DataError, SchemaError
from stackrec_dist.data.raw import BadRows, RawBatch, RawColumns, iter_raw, parse_ratings, parse_timestamps
from stackrec_dist.data.storage import open_fs

from .conftest import csv_log, write_text

ROWS = [("a", "10", 5), ("b", "7", 1), ("a", "2", 3)]


def _valid(uri, **kw):
    out = [b for b in iter_raw(uri, **kw) if isinstance(b, RawBatch)]
    return (
        sum((b.user.to_pylist() for b in out), []),
        sum((b.item.to_pylist() for b in out), []),
        np.concatenate([b.timestamp for b in out]).tolist(),
    )


def test_csv_and_parquet_read_alike(mem_root, tmp_path):
    csv_uri = write_text(f"{mem_root}/log.csv", csv_log(ROWS))
    pq_path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": ["a", "b", "a"], "item": [10, 7, 2], "timestamp": [5, 1, 3]}), pq_path)
    expected = (["a", "b", "a"], ["10", "7", "2"], [5, 1, 3])
    assert _valid(csv_uri) == expected
    assert _valid(str(pq_path)) == expected  # int item ids become the same strings

def test_csv_in_many_blocks(mem_root):
    n = 20000
    rows = [(f"u{k % 97}", str(k % 13), k) for k in range(n)]
    uri = write_text(f"{mem_root}/big.csv", csv_log(rows))
    batches = [b for b in iter_raw(uri, csv_block_bytes=1 << 16) if isinstance(b, RawBatch)]
    assert len(batches) > 2
    assert [b.first_row for b in batches][0] == 0
    users, items, ts = _valid(uri, csv_block_bytes=1 << 16)
    assert ts == list(range(n)) and users[:2] == ["u0", "u1"] and items[-1] == str((n - 1) % 13)


def test_directory_of_files_in_sorted_order(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    write_text(str(d / "b.csv"), csv_log([("u", "2", 2)]))
    write_text(str(d / "a.csv"), csv_log([("u", "1", 1)]))
    write_text(str(d / "_SUCCESS"), "")
    assert _valid(str(d)) == (["u", "u"], ["1", "2"], [1, 2])


def test_custom_columns_and_tsv(tmp_path):
    uri = write_text(str(tmp_path / "log.tsv"), "uid\tiid\tts\trating\nx\t1\t9\t5\n")
    cols = RawColumns(user="uid", item="iid", timestamp="ts")
    assert _valid(uri, columns=cols) == (["x"], ["1"], [9])


def test_missing_column_is_named(mem_root):
    uri = write_text(f"{mem_root}/log.csv", "user,item,time\nu,1,2\n")
    with pytest.raises(SchemaError) as err:
        list(iter_raw(uri))
    text = str(err.value)
    assert f"{mem_root}/log.csv" in text and "field timestamp" in text and "'time'" in text


def test_missing_column_parquet(tmp_path):
    p = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": [1], "timestamp": [1]}), p)
    with pytest.raises(SchemaError, match=r"log.parquet field item: missing item column 'item'"):
        list(iter_raw(str(p)))


@pytest.mark.parametrize(
    "rows, row, field, reason",
    [
        ([("a", "1", 1), (None, "2", 2)], 1, "user", "null value"),
        ([("a", "1", 1), ("a", "2", 2), ("a", None, 3)], 2, "item", "null value"),
        ([("a", "1", None)], 0, "timestamp", "null value"),
        ([("a", "1", 1), ("a", "2", "yesterday")], 1, "timestamp", "unparsable timestamp 'yesterday'"),
        ([("a", "1", "2001-13-45 00:00:00")], 0, "timestamp", "unparsable timestamp"),
    ],
)
def test_bad_row_names_file_row_field(mem_root, rows, row, field, reason):
    uri = write_text(f"{mem_root}/log.csv", csv_log(rows))
    with pytest.raises(BadRowError) as err:
        list(iter_raw(uri))
    e = err.value
    assert (e.row, e.field) == (row, field)
    assert str(e).startswith(f"{mem_root}/log.csv row {row} field {field}: {reason}")
    assert f"(line {row + 2})" in str(e)


def test_bad_row_in_parquet(tmp_path):
    p = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": [1, 2, None], "item": [1, 2, 3], "timestamp": [1, 2, 3]}), p)
    with pytest.raises(BadRowError, match=r"log.parquet row 2 field user: null value$"):
        list(iter_raw(str(p), batch_rows=2))


def test_quarantine_yields_bad_rows_and_keeps_the_rest(mem_root):
    rows = [("a", "1", 1), (None, "2", 2), ("a", "3", "x"), ("b", None, 4), ("b", "5", 5)]
    uri = write_text(f"{mem_root}/log.csv", csv_log(rows))
    out = list(iter_raw(uri, quarantine=True))
    bad = [b for b in out if isinstance(b, BadRows)]
    assert len(bad) == 1
    assert bad[0].rows.tolist() == [1, 2, 3]
    assert bad[0].fields == ["user", "timestamp", "item"]
    assert bad[0].reasons == ["null value", "unparsable timestamp 'x'", "null value"]
    assert bad[0].values["timestamp"] == ["2", "x", "4"]
    assert _valid(uri, quarantine=True) == (["a", "b"], ["1", "5"], [1, 5])


def test_timestamp_formats():
    v, bad, _ = parse_timestamps(pa.array(["978300760", " 12 ", "1.9", "2001-01-01", "2001-01-01T00:00:01Z"]))
    assert not bad.any()
    assert v.tolist() == [978300760, 12, 1, 978307200, 978307201]
    v, bad, reasons = parse_timestamps(pa.array([1.5, None, float("nan")]))
    assert v[0] == 1 and bad.tolist() == [False, True, True] and reasons == ["null value", "unparsable timestamp 'nan'"]
    v, bad, _ = parse_timestamps(pa.array([0, 1000], pa.timestamp("ms")))
    assert v.tolist() == [0, 1] and not bad.any()


def test_rating_column_read_only_when_named(mem_root, tmp_path):
    rows = [("a", "1", 1, "4"), ("a", "2", 2, " 2.5 "), ("b", "3", 3, "x"), ("b", "4", 4, None)]
    uri = write_text(f"{mem_root}/log.csv", csv_log(rows, header="user,item,timestamp,stars"))
    assert len(_valid(uri)[0]) == 4  # no rating column named: the column is not read
    out = list(iter_raw(uri, columns=RawColumns(rating="stars"), quarantine=True))
    bad = next(b for b in out if isinstance(b, BadRows))
    assert (bad.rows.tolist(), bad.fields, bad.reasons) == ([2, 3], ["stars"] * 2, ["not a number: 'x'", "null value"])
    assert bad.values["rating"] == ["x", None]  # keyed by role, as user / item / timestamp
    batch = next(b for b in out if isinstance(b, RawBatch))
    assert batch.rating.tolist() == [4.0, 2.5]
    pq_path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": ["a"], "item": [1], "timestamp": [1], "rating": [3]}), pq_path)
    assert next(iter_raw(str(pq_path), columns=RawColumns(rating="rating"))).rating.tolist() == [3.0]
    with pytest.raises(SchemaError, match=r"log.parquet field score: missing rating column 'score'"):
        list(iter_raw(str(pq_path), columns=RawColumns(rating="score")))


def test_rating_formats():
    v, bad, reasons = parse_ratings(pa.array(["3", " 4.5 ", "1e0", ".5", "nan", "inf", "", None]))
    assert v[:4].tolist() == [3.0, 4.5, 1.0, 0.5]
    assert bad.tolist() == [False] * 4 + [True] * 4
    assert reasons == ["not a number: 'nan'", "not a number: 'inf'", "not a number: ''", "null value"]
    v, bad, _ = parse_ratings(pa.array([1.5, None, float("inf")]))
    assert v[0] == 1.5 and bad.tolist() == [False, True, True]


def test_missing_input(mem_root):
    with pytest.raises(DataError, match="raw input does not exist"):
        list(iter_raw(f"{mem_root}/nope.csv"))
    fs, root = open_fs(mem_root)
    fs.makedirs(f"{root}/empty", exist_ok=True)
    write_text(f"{mem_root}/empty/readme.md", "x")
    with pytest.raises(DataError, match="no CSV or Parquet files"):
        list(iter_raw(f"{mem_root}/empty"))


def test_row_numbers_across_blocks(mem_root):
    rows = [(f"u{k % 97}", str(k % 13), k) for k in range(20000)]
    rows[15000] = ("u1", "3", "later")
    uri = write_text(f"{mem_root}/big.csv", csv_log(rows))
    with pytest.raises(BadRowError, match=r"big.csv row 15000 field timestamp: unparsable timestamp 'later' \(line 15002\)"):
        list(iter_raw(uri, csv_block_bytes=1 << 16))


def test_malformed_csv_rows(mem_root):
    text = "user,item,timestamp\na,1,1\na,2\nb,3,3\nb,4,4,9\nb,5,x\n"
    uri = write_text(f"{mem_root}/log.csv", text)
    with pytest.raises(BadRowError) as err:
        list(iter_raw(uri))
    assert err.value.row == 1 and "log.csv row 1: malformed CSV row (line 3)" in str(err.value)
    out = list(iter_raw(uri, quarantine=True))
    bad = [b for b in out if isinstance(b, BadRows)]
    got = sorted((int(r), f, why) for b in bad for r, f, why in zip(b.rows, b.fields, b.reasons))
    assert [(r, f) for r, f, _ in got] == [(1, "*"), (3, "*"), (4, "timestamp")]
    assert "expected 3 fields, got 2: 'a,2'" in got[0][2]
    assert _valid(uri, quarantine=True) == (["a", "b"], ["1", "3"], [1, 3])


def test_malformed_rows_keep_row_numbers_across_blocks(mem_root):
    rows = [f"u{k % 7},{k % 5},{k}" for k in range(30000)]
    rows[100] = "u1,2"  # malformed, early
    rows[20000] = "u1,2,late"  # bad timestamp, in a later block
    uri = write_text(f"{mem_root}/big.csv", "user,item,timestamp\n" + "\n".join(rows) + "\n")
    out = list(iter_raw(uri, quarantine=True, csv_block_bytes=1 << 16))
    bad = sorted((int(r), f) for b in out if isinstance(b, BadRows) for r, f in zip(b.rows, b.fields))
    assert bad == [(100, "*"), (20000, "timestamp")]
    ts = np.concatenate([b.timestamp for b in out if isinstance(b, RawBatch)])
    assert len(ts) == 29998 and ts[100] == 101 and ts[-1] == 29999


def test_malformed_line_number_with_threaded_parsing(mem_root):
    # The multi-threaded CSV parser reports no line number; the reader finds it on one thread.
    rows = [f"u{k % 7},{k % 5},{k}" for k in range(30000)]
    rows[25000] = "u1,2,3,4"
    uri = write_text(f"{mem_root}/big.csv", "user,item,timestamp\n" + "\n".join(rows) + "\n")
    with pytest.raises(BadRowError, match=r"big.csv row 25000: malformed CSV row \(line 25002\): Expected 3 columns, got 4"):
        list(iter_raw(uri, csv_block_bytes=1 << 16, use_threads=True))


def test_not_utf8_rows_strict_and_quarantined(mem_root):
    fs, root = open_fs(mem_root)
    rows = [f"u{k % 7},{k % 5},{k}".encode() for k in range(20000)]
    rows[5] = b"u\xff,1,5"
    rows[15000] = b"u1,2,\xe9"
    fs.pipe_file(f"{root}/log.csv", b"user,item,timestamp\n" + b"\n".join(rows) + b"\n")
    uri = f"{mem_root}/log.csv"
    with pytest.raises(BadRowError, match=r"log.csv row 5 field user: not UTF-8: b'u\\xff' \(line 7\)"):
        list(iter_raw(uri, csv_block_bytes=1 << 16))
    out = list(iter_raw(uri, quarantine=True, csv_block_bytes=1 << 16))
    bad = [(int(r), f, v) for b in out if isinstance(b, BadRows)
           for r, f, v in zip(b.rows, b.fields, zip(b.values["user"], b.values["timestamp"]))]
    assert bad == [(5, "user", ("u\\xff", "5")), (15000, "timestamp", ("u1", "\\xe9"))]
    ts = np.concatenate([b.timestamp for b in out if isinstance(b, RawBatch)])
    assert len(ts) == 19998 and ts[5] == 6
