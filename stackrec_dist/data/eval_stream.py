"""The evaluation stream: one (history, target) row per sequence of a valid/test split, rank-strided."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from stackrec_dist.config import DataConfig

from .split_reader import SplitReader
from .windows import history_windows


def iter_eval_batches(data_cfg: DataConfig, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                      **reader_kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation rows of ``split``: ``inputs`` (b, L) = the last L items before the target,
    left-padded with 0; ``targets`` (b,) = each row's last item.

    Units (row groups) are strided over ranks like training: unit ``u`` (manifest order) belongs
    to rank ``u % world_size``, so each rank reads and decodes only its own row groups and every
    row is evaluated exactly once across ranks (the caller all-reduces the metric sums). A rank
    may get more rows than another, or none when there are fewer row groups than ranks: the
    evaluation loop must not run collectives per batch. Rows with fewer than 2 items are bad input.
    ``reader_kwargs`` go to :class:`SplitReader`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    data_cfg.validate()
    source = SplitReader(data_cfg, split, **reader_kwargs)
    L = data_cfg.max_len
    mine = list(range(rank, len(source.units), world_size))
    pend_i: list[np.ndarray] = []
    pend_t: list[np.ndarray] = []
    n_pend = 0
    for data in source.read_ahead(mine, min_length=2):
        hist, target = history_windows(data.values, data.offsets, data.lengths, L)
        if len(target):
            pend_i.append(hist)
            pend_t.append(target)
            n_pend += len(target)
        while n_pend >= batch_size:
            inputs, targets = np.concatenate(pend_i), np.concatenate(pend_t)
            yield {"inputs": torch.from_numpy(np.ascontiguousarray(inputs[:batch_size])),
                   "targets": torch.from_numpy(np.ascontiguousarray(targets[:batch_size]))}
            pend_i, pend_t = [inputs[batch_size:]], [targets[batch_size:]]
            n_pend -= batch_size
    if n_pend:
        yield {"inputs": torch.from_numpy(np.ascontiguousarray(np.concatenate(pend_i))),
               "targets": torch.from_numpy(np.ascontiguousarray(np.concatenate(pend_t)))}
