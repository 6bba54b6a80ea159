"""Batching with skip-and-count of bad samples.

Datasets raise :class:`CorruptSample`; :class:`SkipCorrupt` (map-style) or the shard pipeline
turns that into a :class:`Skipped` marker *inside the DataLoader worker*; the collator drops the
markers and reports them in the batch (``n_skipped``, ``skipped``), so the count survives
worker processes. :class:`SkipStats` accumulates those numbers for a summary warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from mmformer.data.errors import CorruptSample, Skipped

__all__ = ["ImageTextCollator", "SkipCorrupt", "SkipStats", "Tokenizer", "is_empty_batch"]

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """The contract the collator needs: ``ids, mask = tok(texts, max_length=T)``.

    ``ids``: LongTensor ``(B, T)``; ``mask``: BoolTensor ``(B, T)``, True at real tokens.
    """

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class SkipCorrupt(Dataset):
    """Wrap a map-style dataset: a ``CorruptSample`` becomes a :class:`Skipped` marker."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        try:
            return self.dataset[index]
        except CorruptSample as err:
            log.debug("skipping corrupt sample %s", err)
            return Skipped.from_error(err)

    def __getattr__(self, name: str) -> Any:
        """Expose the wrapped dataset's attributes (``captions``, ``caption_to_image``, ...)."""
        if name == "dataset":  # not set yet (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def is_empty_batch(batch: dict[str, Any] | None) -> bool:
    """True for a batch with no usable samples (every sample was skipped)."""
    return batch is None or batch["images"].shape[0] == 0


class ImageTextCollator:
    """Collate samples (dicts or :class:`Skipped`/``None`` markers) into a training batch.

    Output::

        {"images": (B, 3, S, S) float, "input_ids": (B, T) long, "attention_mask": (B, T) bool,
         "indices": (B,) long, "image_ids": (B,) long, "captions": list[str] (B),
         "n_skipped": int, "skipped": list[Skipped],
         "concepts": (B,) long}          # only when every sample has a "concept" (emoji data)

    ``indices`` are dataset item indices; ``image_ids`` the samples' ``image_index`` (index into
    the dataset's unique images; several captions of one image share it), or ``indices`` when
    samples have none. -1 means "no index" (shard samples). T <= ``max_length``: the tokenizer
    may pad to the longest caption of the batch.

    **All-bad batch**: an *empty batch*, not ``None``: B = 0 (``images`` is
    ``(0, 3, S, S)`` with S = ``image_size``, or ``(0, 3, 0, 0)`` if unknown), carrying
    ``n_skipped``, so the count is not lost. A training step should return ``None`` for it
    (``is_empty_batch(batch)``), which makes Lightning skip the optimizer step.

    Args:
        tokenizer: see :class:`Tokenizer`; may be set later (``collator.tokenizer = tok``).
        max_length: T, the padded token length.
        image_size: S, used only for the shape of an empty batch.
        batch_transform: applied to the stacked images (e.g. :class:`BatchTrainTransform` on uint8
            images that the dataset left un-augmented).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | Callable[..., Any] | None = None,
        max_length: int = 16,
        image_size: int | None = None,
        batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.batch_transform = batch_transform
        self.max_length = max_length
        self.image_size = image_size

    def __call__(self, samples: Sequence[dict[str, Any] | Skipped | None]) -> dict[str, Any]:
        good = [s for s in samples if isinstance(s, dict)]
        skipped = [
            s if isinstance(s, Skipped) else Skipped("<unknown>", "sample was None")
            for s in samples
            if not isinstance(s, dict)
        ]
        if not good:
            return self._empty(skipped)
        ids, mask = self._tokenize([s["caption"] for s in good])
        indices = torch.tensor([int(s.get("index", -1)) for s in good], dtype=torch.long)
        image_ids = torch.tensor([int(s.get("image_index", s.get("index", -1))) for s in good], dtype=torch.long)
        images = torch.stack([s["image"] for s in good])  # (B, 3, S, S)
        if self.batch_transform is not None:  # seeded by the samples' seeds when they carry them
            seeds = [s["seed"] for s in good if "seed" in s]
            images = (
                self.batch_transform(images, seed=hash(tuple(seeds)) & (2**63 - 1))
                if len(seeds) == len(good)
                else self.batch_transform(images)
            )
        batch = {
            "images": images,
            "input_ids": ids,
            "attention_mask": mask,
            "indices": indices,
            "image_ids": image_ids,
            "captions": [s["caption"] for s in good],
            "n_skipped": len(skipped),
            "skipped": skipped,
        }
        if all("concept" in s for s in good):
            batch["concepts"] = torch.tensor([int(s["concept"]) for s in good], dtype=torch.long)
        return batch

    def _tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` ids and mask, T <= max_length; checks the tokenizer honoured the contract."""
        if self.tokenizer is None:
            raise RuntimeError(
                "ImageTextCollator has no tokenizer: pass one, or call "
                "ImageTextDataModule.set_tokenizer(tok) before building loaders"
            )
        ids, mask = self.tokenizer(captions, max_length=self.max_length)
        ok = (
            ids.dim() == 2
            and ids.shape[0] == len(captions)
            and ids.shape[1] <= self.max_length
            and tuple(mask.shape) == tuple(ids.shape)
        )
        if not ok:
            raise ValueError(
                f"tokenizer returned ids {tuple(ids.shape)} and mask {tuple(mask.shape)}, "
                f"expected both (B, T) with B={len(captions)}, T <= max_length={self.max_length}"
            )
        return ids.long(), mask.bool()

    def _empty(self, skipped: list[Skipped]) -> dict[str, Any]:
        """The B = 0 batch returned when every sample was skipped."""
        s = self.image_size or 0
        t = self.max_length
        return {
            "images": torch.empty(0, 3, s, s),
            "input_ids": torch.empty(0, t, dtype=torch.long),
            "attention_mask": torch.empty(0, t, dtype=torch.bool),
            "indices": torch.empty(0, dtype=torch.long),
            "image_ids": torch.empty(0, dtype=torch.long),
            "captions": [],
            "n_skipped": len(skipped),
            "skipped": skipped,
        }


class SkipStats:
    """Running count of skipped samples with a few examples, for a summary warning.

    ``update(batch)`` after each batch; ``summary()`` gives e.g.
    ``"skipped 3 corrupt samples (e.g. a.png: cannot decode image: ...)"`` for the current
    period, ``summary(period=False)`` the same since creation; ``reset()`` starts a new period
    (e.g. an epoch). ``count`` counts since the last reset, ``total`` since creation.
    """

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self.total = 0
        self.count = 0
        self.examples: list[Skipped] = []  # this period
        self.first_examples: list[Skipped] = []  # since creation

    def update(self, batch: dict[str, Any] | None) -> int:
        """Add a collated batch's skips; returns the batch's ``n_skipped``."""
        if not batch:
            return 0
        n = int(batch.get("n_skipped", 0))
        self.count += n
        self.total += n
        for s in batch.get("skipped", []):
            for examples in (self.examples, self.first_examples):
                if len(examples) < self.max_examples:
                    examples.append(Skipped(*s))
        return n

    def summary(self, period: bool = True) -> str:
        """One line; ``""`` when nothing was skipped (in the period, or ever)."""
        n, examples = (self.count, self.examples) if period else (self.total, self.first_examples)
        if not n:
            return ""
        eg = "; ".join(str(s) for s in examples)
        noun = "sample" if n == 1 else "samples"
        return f"skipped {n} corrupt {noun}" + (f" (e.g. {eg})" if eg else "")

    def reset(self) -> None:
        """Forget the period's count and examples (``total`` is kept)."""
        self.count = 0
        self.examples = []
