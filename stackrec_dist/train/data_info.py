"""What the trainer needs to know about a prepared dataset before it starts: size of the catalogue,
of an epoch (for the LR schedule) and the item frequencies (for the unigram sampler).

Everything comes from ``manifest.json`` (and the small item-count file it references): no shard
is opened, so start-up does not grow with the data, and no shard is even stat'ed (the streaming
reader checks the shards when it is built). ``prepare`` and the synthetic generator record
``splits.<name>.length_histogram`` and ``item_counts``.

A manifest written before those fields existed still works for the window count, through the old
scan of every shard's ``item_ids`` column (slow on big data; a warning says to re-run
``stackrec prepare``); ``item_counts`` has no such fallback and raises a ``DataError`` naming the
missing field.
"""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from stackrec_dist.config import DataConfig, LossConfig
from stackrec_dist.data.errors import DataError, ManifestError
from stackrec_dist.data.manifest import Manifest, open_fs, read_manifest
from stackrec_dist.data.storage import display_path, retrying, storage_errors
from stackrec_dist.data.windows import pairs_per_row, pieces_per_row

log = logging.getLogger(__name__)


def _manifest(data_cfg: DataConfig) -> tuple[object, str, Manifest]:
    with storage_errors(data_cfg.path):
        fs, root = open_fs(data_cfg.path, data_cfg.storage_options)
    # check_files=False: one metadata call per shard is what this module exists to avoid; storage
    # failures are retried within data.storage_retry_s and reported naming the object.
    shown = f"{display_path(fs, root)}/manifest.json"
    manifest = retrying(lambda: read_manifest(fs, root, check_files=False), shown, budget_s=data_cfg.storage_retry_s)
    return fs, root, manifest


def dataset_num_items(data_cfg: DataConfig) -> int:
    """Catalogue size incl. the pad id 0, from the manifest."""
    return _manifest(data_cfg)[2].num_items


def count_windows(data_cfg: DataConfig, split: str = "train") -> int:
    """Training windows in one epoch: a sequence of n items gives ceil((n - 1) / S) windows, S =
    ``data_cfg.stride`` (``pack="pad"``, exact); ``pack="concat"``: ceil(pairs / L), the number of
    full windows the windows' (input, target) pairs fill (the transitions when S = L; packing
    stays within a row group, so the reader may emit a few more, partly padded ones)."""
    fs, root, manifest = _manifest(data_cfg)
    if split not in manifest.splits:
        raise ManifestError(f"split {split!r} not in the manifest (splits: {sorted(manifest.splits)})",
                            path=display_path(fs, root), field="splits")
    info = manifest.splits[split]
    if info.length_histogram is not None:
        L, S = data_cfg.max_len, data_cfg.stride
        windows, pairs = info.windows(L, S), info.pairs(L, S)
    else:
        log.warning("%s: the manifest has no splits.%s.length_histogram (prepared by an older version); "
                    "counting windows by reading every shard. Re-run `stackrec prepare` to make start-up "
                    "independent of the data size.", display_path(fs, root), split)
        windows, pairs = _scan_windows(fs, root, manifest, split, data_cfg.max_len, data_cfg.stride)
    if data_cfg.pack == "concat":
        return math.ceil(pairs / data_cfg.max_len)
    return windows


def _scan_windows(fs, root: str, manifest: Manifest, split: str, max_len: int, stride: int) -> tuple[int, int]:
    """(windows, pairs) from the shards themselves: the fallback for old manifests."""
    windows = pairs = 0
    for path in manifest.shard_paths(split):
        # One row group at a time: memory stays bounded on shards of any size.
        with fs.open(f"{root}/{path}", "rb") as f:
            parquet = pq.ParquetFile(f)
            for rg in range(parquet.num_row_groups):
                column = parquet.read_row_group(rg, columns=["item_ids"]).column("item_ids")
                lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
                pairs += int(pairs_per_row(lengths, max_len, stride).sum())
                windows += int(pieces_per_row(lengths, stride).sum())
    return windows, pairs


def steps_per_epoch(data_cfg: DataConfig, split: str = "train") -> int:
    """Optimizer steps per epoch for a global batch of ``data_cfg.batch_size`` windows."""
    return max(1, math.ceil(count_windows(data_cfg, split) / data_cfg.batch_size))


def item_counts(data_cfg: DataConfig) -> torch.Tensor:
    """(num_items,) int64: occurrences of each item id in the training split (index 0 = pad = 0),
    read from the file the manifest's ``item_counts`` names, checked against its sha256."""
    fs, root, manifest = _manifest(data_cfg)
    shown = display_path(fs, posixpath.join(root, "manifest.json"))
    entry = manifest.item_counts
    if entry is None:
        raise DataError("no item_counts in the manifest (prepared by an older version); re-run "
                        "`stackrec prepare` to record them (needed by loss.sampler=unigram)",
                        path=shown, field="item_counts")
    path = posixpath.join(root, entry["path"])
    with fs.open(path, "rb") as f:
        raw = f.read()
    if len(raw) != entry["bytes"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise DataError(f"{entry['path']} differs from the manifest's size/sha256 (rewritten or corrupt); "
                        "re-run `stackrec prepare`", path=display_path(fs, path), field="item_counts")
    counts = pq.read_table(pa.BufferReader(raw)).column("count").to_numpy()
    if len(counts) != manifest.num_items:
        raise DataError(f"{len(counts)} counts for num_items={manifest.num_items}", path=display_path(fs, path),
                        field="item_counts")
    return torch.from_numpy(np.array(counts, dtype=np.int64))


def proposal_item_counts(data_cfg: DataConfig | None, loss_cfg: LossConfig) -> torch.Tensor | None:
    """The item counts the loss needs (``loss.kind=sampled``, ``loss.sampler=unigram``), else None.

    ``data_cfg=None`` (no dataset, e.g. synthetic batches) with the unigram sampler is an error.
    """
    if loss_cfg.kind != "sampled" or loss_cfg.sampler != "unigram":
        return None
    if data_cfg is None:
        raise ValueError("loss.sampler=unigram needs a prepared dataset's item counts; "
                         "use loss.sampler=uniform with synthetic batches")
    return item_counts(data_cfg)
