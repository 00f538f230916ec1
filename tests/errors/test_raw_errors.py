"""Bad raw logs through ``stackrec prepare``: strict mode fails with the file, row, CSV line and
field (exit 3); quarantine mode sets bad rows aside and finishes."""

from __future__ import annotations

import pyarrow.parquet as pq

from tests.errors.conftest import assert_one_line, run_cli

DATA = 3


def _log(tmp_path, lines: list[bytes]):
    path = tmp_path / "log.csv"
    path.write_bytes(b"user,item,timestamp\n" + b"\n".join(lines) + b"\n")
    return path


def _rows(n: int) -> list[bytes]:
    return [f"u{k % 7},{k % 11},{k}".encode() for k in range(n)]


def _prepare(tmp_path, log, *extra: str):
    return run_cli("prepare", "--set", f"prepare.source={log}", "--set", f"prepare.output={tmp_path / 'ds'}",
                   "--set", "prepare.num_shards=1", *extra, tmp_path=tmp_path)


def test_malformed_csv_line_strict(tmp_path):
    lines = _rows(300)
    lines[200] = b"u1,3,17,extra"  # data row 200 = line 202 of the file
    res = _prepare(tmp_path, _log(tmp_path, lines))
    assert_one_line(res, DATA, "data", "log.csv row 200", "malformed CSV row (line 202)", "Expected 3 columns, got 4")


def test_not_utf8_strict(tmp_path):
    lines = _rows(300)
    lines[150] = b"u1,caf\xe9,17"
    res = _prepare(tmp_path, _log(tmp_path, lines))
    assert_one_line(res, DATA, "data", "log.csv row 150 field item", "not UTF-8: b'caf\\xe9' (line 152)")


def test_not_utf8_quarantined(tmp_path):
    lines = _rows(300)
    lines[150] = b"u1,caf\xe9,17"
    lines[40] = b"u\xff,3,17"
    res = _prepare(tmp_path, _log(tmp_path, lines), "--set", "prepare.quarantine=true")
    assert res.code == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "bad 2 (quarantined at" in res.stdout
    bad = pq.read_table(tmp_path / "ds" / "_quarantine" / "bad_rows.parquet").to_pylist()
    assert [(r["row"], r["field"]) for r in bad] == [(40, "user"), (150, "item")]
    assert bad[1]["item"] == "caf\\xe9" and "not UTF-8" in bad[1]["reason"]
