"""Errors and markers for bad samples.

A bad sample in a large dataset is skipped and counted, never silently: datasets raise
:class:`CorruptSample`, a wrapper (:class:`mmformer.data.collate.SkipCorrupt`, or the shard
pipeline) turns it into a :class:`Skipped` marker, and the collator drops and counts markers.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CorruptSample", "Skipped", "TooManySkipped"]


class CorruptSample(ValueError):
    """A sample that cannot be used: unreadable, truncated or oversized image, empty caption.

    Attributes:
        path: the file (or shard member) the sample came from.
        reason: what is wrong with it, in words.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) when pickled across DataLoader workers
        return (type(self), (self.path, self.reason))


class TooManySkipped(ValueError):
    """Training stopped: too large a fraction of an epoch's samples was skipped as corrupt."""


class Skipped(NamedTuple):
    """Marker that stands in for a sample that was skipped (picklable, collection-safe).

    A NamedTuple rather than a dataclass so that Lightning's ``apply_to_collection`` (used when
    moving a batch to a device) can rebuild it.
    """

    path: str
    reason: str

    @classmethod
    def from_error(cls, err: CorruptSample) -> Skipped:
        """Marker for a :class:`CorruptSample`."""
        return cls(err.path, err.reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
