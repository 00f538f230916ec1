"""In-memory training batches for benchmarks and the distributed-equivalence tests, and the
window fingerprints that prove exactly-once consumption."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch


class SyntheticBatches:
    """Deterministic in-memory training windows with the training reader's loader protocol.

    Global batch ``t`` of epoch ``e`` is a fixed function of (seed, e, t): ``batch_size`` windows
    of length L with random left padding. Rank r gets rows ``r::world`` of it, so the union of
    the ranks' batches at a step is exactly the single-process batch. Iteration resumes at the
    cursor; ``state_dict``/``load_state_dict`` as the Parquet reader's.
    """

    def __init__(self, num_items: int, max_len: int, batch_size: int, steps_per_epoch: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_items, self.max_len, self.batch_size = num_items, max_len, batch_size
        self.steps_per_epoch, self.seed, self.rank, self.world_size = steps_per_epoch, seed, rank, world_size
        self.epoch, self.position = 0, 0

    def global_batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 10_007 + index)
        seq = torch.randint(1, self.num_items, (self.batch_size, self.max_len + 1), generator=g)
        lengths = torch.randint(2, self.max_len + 2, (self.batch_size,), generator=g)
        keep = torch.arange(self.max_len + 1)[None, :] >= (self.max_len + 1 - lengths)[:, None]
        seq = seq * keep
        return {"inputs": seq[:, :-1].contiguous(), "targets": torch.where(seq[:, :-1] > 0, seq[:, 1:], 0)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.position < self.steps_per_epoch:
            batch = self.global_batch(self.epoch, self.position)
            self.position += 1
            yield {k: v[self.rank::self.world_size] for k, v in batch.items()}
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def stats(self) -> dict[str, Any]:
        return {"bad_rows": 0, "quarantine_files": []}

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def window_fingerprints(batch: dict[str, torch.Tensor]) -> list[str]:
    """A short content hash per window (inputs + targets), to prove exactly-once consumption."""
    inputs = batch["inputs"].to(torch.int64).cpu()
    targets = batch["targets"].to(torch.int64).cpu()
    return [
        hashlib.blake2b(inputs[i].numpy().tobytes() + targets[i].numpy().tobytes(), digest_size=8).hexdigest()
        for i in range(inputs.shape[0])
    ]
