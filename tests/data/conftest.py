"""Helpers shared by the data-write tests: tiny raw logs on local disk or memory://."""

from __future__ import annotations

import uuid

import fsspec
import pytest


@pytest.fixture
def mem_root():
    """A fresh memory:// directory, removed afterwards (the memory filesystem is process-global)."""
    root = f"/t-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def write_text(uri: str, text: str) -> str:
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)
    return uri


def csv_log(rows, header="user,item,timestamp") -> str:
    lines = [header] + [",".join("" if v is None else str(v) for v in r) for r in rows]
    return "\n".join(lines) + "\n"
