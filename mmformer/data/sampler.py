"""A seeded, rank-sharded training order that a checkpoint can continue in the middle of an epoch.

- :class:`ResumableSampler`: ``DistributedSampler`` that can start a pass after its first ``skip``
  indices.
- :class:`ResumableDataLoader`: a DataLoader over it whose position (``batches_done``) Lightning
  saves in each checkpoint and restores before it iterates on resume
  (:class:`mmformer.training.checkpoint.ExactResume` keeps the position up to date).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mmformer.data.transforms import SampleKey, sample_seed

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded permutation per epoch, one slice per data-parallel rank)
    that can start the next pass after the first ``skip`` of its own indices.

    Being a ``DistributedSampler``, Lightning does not replace it under DDP/FSDP: give it the
    data-parallel ``num_replicas`` / ``rank`` (``trainer.strategy.distributed_sampler_kwargs``).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        """Indices as :class:`SampleKey`: each carries the seed of its sample's augmentation,
        from (seed, epoch, index), so a resumed run augments exactly as an uninterrupted one."""
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter([SampleKey(i, sample_seed(self.seed, self.epoch, i)) for i in indices[skip:]])


class ResumableDataLoader(DataLoader):
    """A training DataLoader over a :class:`ResumableSampler` whose position is checkpointed.

    ``batches_done`` (batches of the current epoch already trained on) is kept up to date by
    :class:`ExactResume`; Lightning stores :meth:`state_dict` in each checkpoint and calls
    :meth:`load_state_dict` before it iterates on resume, so the resumed run sees exactly the
    batches the uninterrupted run would have seen.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}")
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        return {
            "epoch": s.epoch,
            "batches_done": self.batches_done,
            "batch_size": self.batch_size,
            "num_replicas": s.num_replicas,
            "seed": s.seed,
            "shuffle": s.shuffle,
            "num_samples": len(s),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.sampler
        now = {
            "batch_size": self.batch_size,
            "num_replicas": s.num_replicas,
            "seed": s.seed,
            "shuffle": s.shuffle,
            "num_samples": len(s),
        }
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        s.set_epoch(epoch)
        self.batches_done = done
        if changed and done:
            log.warning(
                "resuming epoch %d at batch %d, but the data order cannot be continued exactly: "
                "%s changed (checkpoint -> now); the epoch's order restarts from its beginning",
                epoch,
                done,
                ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
            )
            return
        s.skip = done * (self.batch_size or 1)
        if done:
            log.info("resuming epoch %d after its first %d batches", epoch, done)
