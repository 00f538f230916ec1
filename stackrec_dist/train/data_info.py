"""What the trainer needs to know about a prepared dataset before it starts: size of the catalogue
and of an epoch (for the LR schedule), read from the manifest and the shards' list lengths only."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stackrec_dist.config import DataConfig
from stackrec_dist.data.manifest import open_fs, read_manifest
from stackrec_dist.data.stream import pieces_per_row


def dataset_num_items(data_cfg: DataConfig) -> int:
    fs, root = open_fs(data_cfg.path, data_cfg.storage_options)
    return read_manifest(fs, root).num_items


def count_windows(data_cfg: DataConfig, split: str = "train") -> int:
    """Training windows in one epoch: a sequence of n items gives ceil((n - 1) / L) windows."""
    fs, root = open_fs(data_cfg.path, data_cfg.storage_options)
    manifest = read_manifest(fs, root)
    windows = 0
    transitions = 0
    for path in manifest.shard_paths(split):
        # One row group at a time: memory stays bounded on shards of any size.
        with fs.open(f"{root}/{path}", "rb") as f:
            parquet = pq.ParquetFile(f)
            for rg in range(parquet.num_row_groups):
                column = parquet.read_row_group(rg, columns=["item_ids"]).column("item_ids")
                lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
                transitions += int(np.maximum(lengths - 1, 0).sum())
                windows += int(pieces_per_row(lengths, data_cfg.max_len).sum())
    if data_cfg.pack == "concat":
        return math.ceil(transitions / data_cfg.max_len)
    return windows


def steps_per_epoch(data_cfg: DataConfig, split: str = "train") -> int:
    """Optimizer steps per epoch for a global batch of ``data_cfg.batch_size`` windows."""
    return max(1, math.ceil(count_windows(data_cfg, split) / data_cfg.batch_size))
