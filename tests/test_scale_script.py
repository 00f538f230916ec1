"""benchmarks/scale.py without SeaweedFS or training: the untimed warm-up runs before the first
size only, and the table says so."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import scale  # noqa: E402 - benchmarks/scale.py


class _Server:
    storage_options: dict = {}
    env: dict = {}
    bucket = "b"

    def stop(self) -> None:
        pass


def _result(n: int) -> dict:
    return {"interactions": n, "raw_interactions": n, "users": n // 10, "num_items": 10, "prepare_s": 1.0,
            "prepare_rss_mb": 100.0, "prepared_bytes": 1 << 20, "reader_seq_s": 1.0, "loader_windows_s": 1.0,
            "first_step_s": 2.0, "step_rate": 1.0, "load_before": (0.0, 0.0, 0.0), "load_after": (0.0, 0.0, 0.0)}


def test_warm_up_before_the_first_size_only(tmp_path, monkeypatch):
    import tests.fixtures.seaweed as seaweed

    calls = []
    monkeypatch.setattr(seaweed, "start_seaweed", lambda path: _Server())
    monkeypatch.setattr(scale, "run_size", lambda n, args, server, work, warm_up=False:
                        calls.append((n, warm_up, args.warm_up_steps)) or _result(n))
    monkeypatch.setattr(scale, "write_section", lambda *a: (_ for _ in ()).throw(AssertionError("wrote docs")))
    scale.main(["--sizes", "1000,2000,3000", "--no-write", "--work-dir", str(tmp_path)])
    assert calls == [(1000, True, 3), (2000, False, 3), (3000, False, 3)]


def test_table_says_the_first_row_is_warm():
    args = scale.main.__globals__["argparse"].Namespace(
        steps=30, items=10, memory_mb=128, shards=16, row_group_size=4096, zero=2, blocks=2, dim=8, seq_len=16,
        batch=4, num_samples=8, warm_up_steps=3)
    text = scale._table([_result(1000), _result(2000)], args)
    assert "untimed warm-up training (3 steps, figures discarded)" in text
