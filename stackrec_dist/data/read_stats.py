"""The one statistics tracker of the readers: what reading met and emitted.

The loader's cursor keeps one per epoch (what the consumer received, saved in checkpoints, merged
over ranks); a training stream iterated in-process keeps one of what it emitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

COUNTS = ("bad_rows", "bad_row_groups", "windows", "batches")


@dataclass
class ReadStats:
    """Bad rows / row groups met, windows and batches emitted, quarantine files written."""

    bad_rows: int = 0
    bad_row_groups: int = 0
    windows: int = 0
    batches: int = 0
    quarantine_files: list[str] = field(default_factory=list)

    def add_unit(self, bad_rows: int, bad_row_groups: int) -> None:
        self.bad_rows += int(bad_rows)
        self.bad_row_groups += int(bad_row_groups)

    def add_batch(self, windows: int) -> None:
        """One batch of ``windows`` windows (a batch of metadata only counts none)."""
        if windows:
            self.windows += int(windows)
            self.batches += 1

    def add_quarantine(self, files: Iterable[str]) -> None:
        self.quarantine_files.extend(f for f in files if f not in self.quarantine_files)

    def merge(self, other: "ReadStats") -> None:
        for k in COUNTS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.add_quarantine(other.quarantine_files)

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in COUNTS}

    def as_dict(self) -> dict[str, Any]:
        return {**self.counts(), "quarantine_files": list(self.quarantine_files)}

    @classmethod
    def from_counts(cls, counts: dict[str, int], quarantine_files: Iterable[str] = ()) -> "ReadStats":
        return cls(**{k: int(counts.get(k, 0)) for k in COUNTS}, quarantine_files=list(quarantine_files))
