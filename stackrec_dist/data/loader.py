"""The training loader: a training stream through a DataLoader, owning the cursor of what it received.

``build_train_loader(data_cfg, split, rank, world_size)`` is the reader the training loop uses:
iterating it yields the rest of one epoch from the cursor; ``state_dict()`` / ``load_state_dict``
resume it exactly (``cursor.py``), on the same or, through merged cursors, another world size.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from stackrec_dist.config import DataConfig

from .cursor import CURSOR_VERSION, Cursor, check_window_layout, merge_cursors
from .stream import CURSOR_META, SequenceStream


class StatefulLoader:
    """Iterates a :class:`SequenceStream` through a DataLoader and owns its cursor.

    ``for batch in loader`` yields the rest of the current epoch: ``{"inputs", "targets"}``,
    (b, L) int64. When an epoch has been read to its end, the next iteration starts the next
    epoch. ``state_dict()`` describes exactly the batches this process has received, whatever the
    DataLoader workers have prefetched; ``load_state_dict`` continues from it.

    With several ranks, ``state_dict()`` is this rank's cursor. A checkpoint can store either
    ``global_state_dict()`` (all ranks' cursors merged; gathers over torch.distributed when it
    is initialised) and load it on any world size, or every rank's own ``state_dict()`` and load
    it on the same world size and workers; ``load_state_dict([s0, s1, ...])`` merges a list.
    """

    def __init__(self, dataset: SequenceStream, num_workers: int | None = None,
                 prefetch_factor: int = 4, multiprocessing_context: str | None = None) -> None:
        self.dataset = dataset
        self.num_workers = dataset.cfg.num_workers if num_workers is None else num_workers
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.cursor = Cursor(len(dataset.units))
        self._gen: Iterator | None = None

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    @property
    def stats(self) -> dict[str, Any]:
        """Bad rows / row groups, windows, batches and quarantine files of the epoch received so far."""
        return self.cursor.stats.as_dict()

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless the cursor is already inside it."""
        if epoch != self.cursor.epoch:
            self._close()
            self.cursor.new_epoch(epoch)

    def _workers(self) -> int:
        return max(1, self.num_workers)

    def _close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def close(self) -> None:
        """Stop the DataLoader workers of an unfinished iteration (the cursor is kept)."""
        self._close()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._close()
        # A module-level generator holding no reference to ``self``: dropping the loader
        # finalises it at once (no reference cycle left for the GC, whose late shutdown of
        # DataLoader workers takes seconds).
        self._gen = _run_epoch(self.dataset, self.cursor, self.num_workers, self.prefetch_factor,
                               self.multiprocessing_context)
        return self._gen

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return self.cursor.state_dict(d.rank, d.world_size, d.fingerprint, d.split, d.cfg.seed, d.L, d.stride)

    def global_state_dict(self) -> dict[str, Any]:
        """The merged cursor of all ranks (every rank gets the same); local when not distributed."""
        state = self.state_dict()
        if self.dataset.world_size == 1:
            return merge_cursors([state])
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("global_state_dict with world_size > 1 needs torch.distributed initialised; "
                               "or save every rank's state_dict() and pass them all to load_state_dict")
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, state)
        return merge_cursors(gathered)

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        if isinstance(state, (list, tuple)):
            state = merge_cursors(list(state))
        d = self.dataset
        if state.get("version") != CURSOR_VERSION:
            raise ValueError(f"data cursor version {state.get('version')} != {CURSOR_VERSION}")
        for key, mine in (("dataset", d.fingerprint), ("split", d.split), ("num_units", len(d.units)),
                          ("seed", d.cfg.seed)):
            if state[key] != mine:
                raise ValueError(f"data cursor is for {key}={state[key]!r}, this reader has {mine!r}: "
                                 "a cursor only resumes the dataset/split/seed it was saved from")
        check_window_layout(state, d.L, d.stride)
        if not state["merged"]:
            layout = state.get("layout")
            if (state["world_size"], state["rank"]) != (d.world_size, d.rank) or (
                    layout is not None and list(layout) != [d.world_size, self._workers()]):
                raise ValueError(
                    f"data cursor of rank {state['rank']}/{state['world_size']} (layout {state['layout']}) "
                    f"cannot resume rank {d.rank}/{d.world_size} with {self._workers()} worker(s): pass the "
                    "cursors of all ranks (or a merged one) to restride the remaining work")
        self._close()
        self.cursor = Cursor.from_state(state)


def _rank_units(dataset: SequenceStream, cursor: Cursor, workers: int) -> list[int]:
    lay = dataset.layout_units(cursor, workers)
    return [u for w in range(workers) for u in lay[dataset.rank * workers + w]]


def _run_epoch(dataset: SequenceStream, c: Cursor, num_workers: int, prefetch_factor: int,
               mp_context: str | None) -> Iterator[dict[str, torch.Tensor]]:
    """The rest of the cursor's epoch (or the next one when it is complete), recording receipts."""
    if c.complete or c.done.all():
        c.new_epoch(c.epoch + 1)
    W = max(1, num_workers)
    if c.merged or c.layout is None:
        # Fresh epoch, or a merged cursor (possibly from another world size): the remaining
        # units form the new pool, strided over this run's ranks x workers.
        c.base = ~c.done
        c.layout = (dataset.world_size, W)
        c.merged = False
    dataset.set_cursor(c)
    if num_workers > 0:
        dl = DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch_factor,
                        persistent_workers=False, multiprocessing_context=mp_context)
    else:
        dl = dataset
    it = iter(dl)
    try:
        for item in it:
            meta = item.pop(CURSOR_META)
            if "error" in meta:
                raise meta["error"]
            c.record(meta)
            if item["inputs"].shape[0] == 0:
                continue
            yield item
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        elif hasattr(it, "close"):
            it.close()
    missing = [u for u in _rank_units(dataset, c, W) if not c.done[u]]
    if missing:
        raise RuntimeError(f"reader bug: epoch {c.epoch} ended with {len(missing)} unit(s) of rank "
                           f"{dataset.rank} unfinished (first: {missing[:5]})")
    c.complete = True


def build_train_loader(data_cfg: DataConfig, split: str = "train", rank: int = 0, world_size: int = 1,
                       **stream_kwargs: Any) -> StatefulLoader:
    """The training reader of one rank: iterate = the rest of one epoch from the cursor."""
    return StatefulLoader(SequenceStream(data_cfg, split, rank, world_size, **stream_kwargs))

