"""``ImageTextDataModule``: one LightningDataModule for the bundled emoji data, manifests, shards.

Sources, by precedence:

- ``shards`` -> training streams from WebDataset shards (:class:`ShardDataset`);
- ``train_manifest`` -> training from a CSV/TSV/JSONL manifest (:class:`ImageTextManifest`);
- neither -> the emoji dataset in memory (``data_dir``, default the bundled ``data/emoji``):
  train = ``split == "train"``, val = ``"val"`` (held-out concepts), test = ``"test"``
  (held-out family).

Val/test come from ``val_manifest``/``test_manifest`` when given, else from the emoji data when
training uses it. Training on a manifest without a ``val_manifest`` holds out ``val_fraction`` of
it for validation when that is above 0 (the shipped recipes set 0.1): whole concepts when the
manifest has a ``concept_col`` column, else whole images, so the checkpoint monitor has a metric
to watch.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset

from mmformer.data.collate import ImageTextCollator, SkipCorrupt, SkipStats, Tokenizer
from mmformer.data.emoji import CaptionMode, EmojiData, InMemoryImageText, default_data_dir
from mmformer.data.errors import TooManySkipped
from mmformer.data.longdoc import Filler, NeedleCollator, NeedleDataset, load_prose
from mmformer.data.manifest import ImageTextManifest
from mmformer.data.sampler import ResumableDataLoader, ResumableSampler
from mmformer.data.shards import ResumableShardLoader, ShardDataset
from mmformer.data.transforms import augment_args as augment_args_of
from mmformer.data.transforms import build_transforms
from mmformer.documents import DocumentCollator
from mmformer.tokenizer import Tokenizer as SentencePieceTokenizer

__all__ = ["ImageTextDataModule", "NeedleDataModule", "SkippedSamplesCallback"]

log = logging.getLogger(__name__)

_STAGES = ("train", "validation", "test")

#: fewer training batches than this in an epoch is warned about (see ``train_dataloader``)
MIN_BATCHES_PER_EPOCH = 10


class ImageTextDataModule(pl.LightningDataModule):
    """Image-text batches (see :class:`ImageTextCollator`) for fit / validate / test.

    Args:
        data_dir: emoji-layout directory (None = bundled data); also the base for relative
            manifest paths.
        train_manifest, val_manifest, test_manifest: CSV/TSV/JSONL manifests.
        shards: WebDataset shard pattern for training (brace pattern or ``::``-separated).
        image_size: S, side of the square images.
        batch_size: B.
        num_workers: DataLoader worker processes.
        max_length: T, tokens per caption.
        caption_mode: emoji training captions, ``"name"`` or ``"name+keywords"`` (eval: name).
        tokenizer_path: a tokenizer file to load; None -> ``set_tokenizer`` must be called (the
            LightningModule does it in ``setup``).
        image_col, caption_col: manifest column names.
        shuffle_buffer: shard sample-shuffle buffer.
        shard_epoch_size: shard items per rank per epoch (see ``ShardDataset.epoch_size``); set it
            for multi-rank training from shards so every rank runs the same number of steps.
        hflip: random horizontal flips in training (the same as ``augment_args: {hflip: true}``).
        augment: augment the training images (random resized crop, mild brightness/contrast,
            ``hflip``, and what ``augment_args`` switches on); False = training images go
            through the eval transform, so a sample has the same pixels in every epoch
            (:attr:`augment` tells a module that caches per-sample results, e.g. a distillation
            teacher's embeddings).
        augment_args: settings of the training augmentation over
            :data:`~mmformer.data.transforms.AUGMENT_DEFAULTS` (crop ``scale``/``ratio``, jitter
            strengths, and the drawing-style augmentations ``posterize``, ``blur``,
            ``grayscale``, off by default); checked here, an unknown key is an error.
        cache_dir: optional ``.npy`` cache directory for decoded emoji pixels.
        seed: shard shuffling seed, and the seed of the training order of map-style datasets
            (a :class:`~mmformer.training.checkpoint.ResumableSampler`: permutation per epoch from
            ``seed + epoch``, one slice per data-parallel rank, resumable mid-epoch).
        image_mean, image_std: normalisation, ``(x / 255 - mean) / std``; must match the model's
            ``ModelConfig.image_mean`` / ``image_std``.
        max_skipped_fraction: training stops with :class:`~mmformer.data.errors.TooManySkipped`
            once this fraction of one epoch's samples (on a rank) has been skipped as corrupt;
            1.0 (default) = when every sample of an epoch was; above 1 = never.
        val_fraction: training on ``train_manifest`` without ``val_manifest``: this fraction of
            the manifest's groups (concepts, or images) is held out as the validation set,
            drawn with ``seed``; 0 (default) = no validation. A manifest of a single group is not
            split.
        concept_col: the manifest column that names a row's concept; when the train manifest has
            it, the held-out validation set is whole concepts (rows without a value count as
            concepts of their own image), else whole images.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        shards: str | None = None,
        image_size: int = 64,
        batch_size: int = 128,
        num_workers: int = 0,
        max_length: int = 16,
        caption_mode: CaptionMode = "name",
        tokenizer_path: str | None = None,
        image_col: str = "image",
        caption_col: str = "caption",
        shuffle_buffer: int = 1000,
        shard_epoch_size: int | None = None,
        hflip: bool = False,
        augment: bool = True,
        cache_dir: str | None = None,
        seed: int = 0,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        max_skipped_fraction: float = 1.0,
        augment_args: dict[str, Any] | None = None,
        val_fraction: float = 0.0,
        concept_col: str = "concept",
    ) -> None:
        super().__init__()
        if not max_skipped_fraction > 0:
            raise ValueError(f"max_skipped_fraction must be > 0, got {max_skipped_fraction}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        #: the training augmentation's settings (every key of AUGMENT_DEFAULTS), checked
        self.augment_settings = augment_args_of(
            {"hflip": hflip, **(augment_args or {})}, "ImageTextDataModule augment_args"
        )
        self._epoch_skips: dict[int, list[int]] = {}  # epoch -> [samples seen, samples skipped]
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = _load_tokenizer(tokenizer_path) if tokenizer_path else None
        self.skip_stats: dict[str, SkipStats] = {stage: SkipStats() for stage in _STAGES}
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    # -- configuration -------------------------------------------------------------------------

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use ``tokenizer`` (``ids, mask = tok(texts, max_length=T)``) for every loader."""
        self.tokenizer = tokenizer

    @property
    def augment(self) -> bool:
        """True when training images are augmented (a sample's pixels change from epoch to epoch)."""
        return bool(self.hparams.augment)

    @property
    def uses_emoji(self) -> bool:
        """True when training data is the in-memory emoji dataset."""
        return self.hparams.shards is None and self.hparams.train_manifest is None

    def _path(self, p: str) -> Path:
        """Relative manifest paths resolve against ``data_dir`` when it is given."""
        base = self.hparams.data_dir
        return Path(p) if base is None or Path(p).is_absolute() else Path(base) / p

    # -- datasets ------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets ``stage`` needs (``fit``: train + val; ``validate``; ``test``)."""
        if (
            self._holds_out_val()
            and (self.train_dataset is None or self.val_dataset is None)
            and stage in (None, "fit", "validate")
        ):
            self.train_dataset, self.val_dataset = self._held_out_split()
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._train_dataset()
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._eval_dataset(self.hparams.val_manifest, "val")
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self._eval_dataset(self.hparams.test_manifest, "test")

    def _emoji(self, split: str, train: bool) -> InMemoryImageText:
        """The in-memory emoji dataset of one split."""
        hp = self.hparams
        data = EmojiData.load(hp.data_dir or default_data_dir(), split, hp.image_size, cache_dir=hp.cache_dir)
        return InMemoryImageText(
            data,
            train=train,
            caption_mode=hp.caption_mode if train else "name",
            mean=hp.image_mean,
            std=hp.image_std,
            augment=hp.augment,
            augment_args=self.augment_settings,
        )

    def _manifest(self, path: str, train: bool) -> ImageTextManifest:
        """A manifest dataset with the train or eval transform."""
        hp = self.hparams
        transform = self._transform(train)
        return ImageTextManifest(
            self._path(path), image_col=hp.image_col, caption_col=hp.caption_col, transform=transform
        )

    def _transform(self, train: bool):
        """The PIL -> tensor pipeline for manifests and shards (the eval one for training without ``augment``)."""
        hp = self.hparams
        return build_transforms(
            hp.image_size, train and hp.augment, hp.image_mean, hp.image_std, **self.augment_settings
        )

    def _train_dataset(self) -> Dataset:
        hp = self.hparams
        if hp.shards is not None:
            return ShardDataset(
                hp.shards,
                transform=self._transform(True),
                train=True,
                shuffle=hp.shuffle_buffer,
                seed=hp.seed,
                epoch_size=hp.shard_epoch_size,
            )
        if hp.train_manifest is not None:
            return self._manifest(hp.train_manifest, train=True)
        return self._emoji("train", train=True)

    def _holds_out_val(self) -> bool:
        """True when the validation set is held out of the training manifest."""
        hp = self.hparams
        return hp.shards is None and hp.train_manifest is not None and hp.val_manifest is None and hp.val_fraction > 0

    def _held_out_split(self) -> tuple[Dataset, Dataset | None]:
        """(train, val) from the training manifest: ``val_fraction`` of its concepts (or images)
        held out, drawn with ``seed``; (the whole manifest, None) when it has a single group."""
        hp = self.hparams
        train = self._manifest(hp.train_manifest, train=True)
        c2i = train.caption_to_image.tolist()
        by_concept = any(hp.concept_col in meta for meta in train.metadata)

        def group(meta: dict[str, Any], image: int) -> tuple[str, Any]:
            concept = meta.get(hp.concept_col) if by_concept else None
            return ("concept", str(concept)) if concept not in (None, "") else ("image", image)

        keys = [group(meta, image) for meta, image in zip(train.metadata, c2i)]
        groups = sorted(set(keys))
        what = "concepts" if by_concept else "images"
        if len(groups) < 2:
            log.warning(
                "%s: one %s only, no validation set held out (give data.val_manifest)", hp.train_manifest, what[:-1]
            )
            return train, None
        n_val = min(len(groups) - 1, max(1, round(hp.val_fraction * len(groups))))
        held = set(random.Random(hp.seed).sample(groups, n_val))
        val_items = [i for i, k in enumerate(keys) if k in held]
        train_items = [i for i, k in enumerate(keys) if k not in held]
        rank_zero_info(
            f"validation: {n_val} of {len(groups)} {what} ({len(val_items)} of {len(keys)} captions) of "
            f"{hp.train_manifest} held out (data.val_fraction={hp.val_fraction}"
            + (f", by its {hp.concept_col!r} column" if by_concept else "")
            + "; give data.val_manifest to choose them)"
        )
        val = self._manifest(hp.train_manifest, train=False)
        return Subset(train, train_items), Subset(val, val_items)

    def _eval_dataset(self, manifest: str | None, split: str) -> Dataset | None:
        if manifest is not None:
            return self._manifest(manifest, train=False)
        return self._emoji(split, train=False) if self.uses_emoji else None

    # -- loaders -------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        """DataLoader with skip-and-count collation; shard datasets are not re-shuffled."""
        if dataset is None:
            raise RuntimeError(
                "no training data: give train_manifest, shards, or use the emoji data (and call setup('fit') first)"
            )
        if self.tokenizer is None:
            raise RuntimeError(
                "ImageTextDataModule has no tokenizer: pass tokenizer_path or call "
                "set_tokenizer(tok) before the loaders are built"
            )
        hp = self.hparams
        iterable = isinstance(dataset, ShardDataset)
        if not iterable and not isinstance(dataset, InMemoryImageText):
            dataset = SkipCorrupt(dataset)  # CorruptSample -> Skipped marker, inside the worker
        n = None if iterable else len(dataset)
        kwargs = dict(
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            drop_last=train and n is not None and n >= hp.batch_size,
            collate_fn=ImageTextCollator(
                self.tokenizer, hp.max_length, hp.image_size, getattr(dataset, "batch_transform", None)
            ),
            persistent_workers=hp.num_workers > 0,
        )
        if train and not iterable:  # seeded order that a mid-epoch checkpoint can continue exactly
            ranks = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
            sampler = ResumableSampler(dataset, shuffle=True, seed=hp.seed, **(ranks or {}))
            return ResumableDataLoader(dataset, sampler=sampler, **kwargs)
        if train:  # shards: each epoch's stream seeded by (seed, epoch, rank, worker), resumable mid-epoch
            return ResumableShardLoader(dataset, **kwargs)
        return DataLoader(dataset, shuffle=False, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Training batches; a warning when an epoch has fewer than :data:`MIN_BATCHES_PER_EPOCH`."""
        loader = self._loader(self.train_dataset, train=True)
        try:
            n_batches, n_samples = len(loader), len(loader.dataset)
        except TypeError:  # a stream of unknown length
            return loader
        if n_batches < MIN_BATCHES_PER_EPOCH:
            bs = self.hparams.batch_size
            suggest = max(2, n_samples // MIN_BATCHES_PER_EPOCH)
            log.warning(
                "%d training samples at data.batch_size=%d make %d batch(es) an epoch (fewer than %d): "
                "settings counted in epochs (check_val_every_n_epoch, max_epochs) pass in very few steps; "
                "lower the batch size (e.g. --data.batch_size %d) or add rows",
                n_samples,
                bs,
                n_batches,
                MIN_BATCHES_PER_EPOCH,
                suggest,
            )
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """Eval batches of the val split; ``[]`` (Lightning: no validation) without val data."""
        return self._loader(self.val_dataset, train=False) if self.val_dataset is not None else []

    def test_dataloader(self) -> DataLoader | list:
        """Eval batches of the test split; ``[]`` without test data."""
        return self._loader(self.test_dataset, train=False) if self.test_dataset is not None else []

    # -- skipped samples -----------------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training: count skipped samples per epoch and stop (:class:`TooManySkipped`) past
        ``max_skipped_fraction`` of the epoch (a fit on all-corrupt data must not 'succeed')."""
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict) and "n_skipped" in batch:
            epoch = trainer.current_epoch
            for e in [e for e in self._epoch_skips if e < epoch]:  # an epoch ended: iterable sources
                self._check_skips(e, self._epoch_skips.pop(e), ended=True)
            counts = self._epoch_skips.setdefault(epoch, [0, 0])
            counts[0] += int(batch["n_skipped"]) + int(batch["images"].shape[0])
            counts[1] += int(batch["n_skipped"])
            self._check_skips(epoch, counts, ended=False, example=batch.get("skipped"))
        return batch

    def _check_skips(self, epoch: int, counts: list[int], ended: bool, example: Any = None) -> None:
        seen, skipped = counts
        frac = self.hparams.max_skipped_fraction
        per_epoch = _samples_per_epoch(self.trainer, self.hparams.batch_size)
        if per_epoch is None:  # a stream of unknown length: shards with an epoch size, else judged at its end
            per_epoch = self.hparams.shard_epoch_size
        if per_epoch is None and not ended:
            return
        limit = math.ceil(frac * (per_epoch if per_epoch is not None and not ended else seen))
        if skipped and frac <= 1 and skipped >= max(1, limit):
            e = f" (e.g. {example[0]})" if example else ""
            raise TooManySkipped(
                f"epoch {epoch}: {skipped} of {per_epoch or seen} training samples were skipped as "
                f"corrupt{e}; at least max_skipped_fraction={frac} of an epoch stops the fit "
                "(set data.max_skipped_fraction above 1 to go on anyway)"
            )

    def skipped_summary(self, stage: str | None = None) -> str:
        """Skipped samples since the start, e.g. ``"train: skipped 2 corrupt samples (e.g. a.png:
        cannot decode image: ...)"``; one line per stage with skips (``stage`` picks one:
        ``"train"``, ``"validation"`` or ``"test"``); ``""`` when nothing was skipped.

        Counts come from :class:`SkippedSamplesCallback` (or from
        ``datamodule.skip_stats[stage].update(batch)`` called by the LightningModule).
        """
        stages = _STAGES if stage is None else (stage,)
        lines = [f"{s}: {self.skip_stats[s].summary(period=False)}" for s in stages if self.skip_stats[s].total]
        return "\n".join(lines)


def _samples_per_epoch(trainer, batch_size: int) -> int | None:
    """Samples one rank draws per training epoch (None when the loader has no length)."""
    dl = getattr(trainer, "train_dataloader", None)
    n_batches = getattr(trainer, "num_training_batches", None)
    try:
        n = len(dl.sampler)
    except (AttributeError, TypeError):
        return None
    bs = getattr(dl, "batch_size", None) or batch_size
    if getattr(dl, "drop_last", False):
        n = n // bs * bs
    if n_batches is not None and n_batches != float("inf"):
        n = min(n, int(n_batches) * bs)
    return n


def _load_tokenizer(path: str) -> Tokenizer:
    """``mmformer.tokenizer.Tokenizer.load(path)``."""
    return SentencePieceTokenizer.load(path)


class SkippedSamplesCallback(pl.Callback):
    """Counts ``batch["n_skipped"]`` per stage and logs one warning per epoch with skips.

    The warning reads ``"train epoch 3 (rank 0): skipped 2 corrupt samples (e.g. path: reason)"``;
    every training epoch also logs ``train/skipped_samples``, the training samples skipped so far.
    Uses the DataModule's ``skip_stats`` when the trainer has an :class:`ImageTextDataModule`, so
    ``datamodule.skipped_summary()`` sees the same numbers; otherwise its own. The one counter of
    skipped samples: ``MMFormerModule`` adds one to a Trainer that has none.
    """

    def __init__(self) -> None:
        self.stats: dict[str, SkipStats] = {stage: SkipStats() for stage in _STAGES}

    def _stats(self, trainer: pl.Trainer, stage: str) -> SkipStats:
        stats = getattr(trainer.datamodule, "skip_stats", None)
        return (stats if isinstance(stats, dict) else self.stats)[stage]

    def _update(self, trainer: pl.Trainer, batch: Any, stage: str) -> None:
        if isinstance(batch, dict):
            self._stats(trainer, stage).update(batch)

    def _report(self, trainer: pl.Trainer, stage: str) -> None:
        stats = self._stats(trainer, stage)
        if stats.count:
            log.warning("%s epoch %d (rank %d): %s", stage, trainer.current_epoch, trainer.global_rank, stats.summary())
        stats.reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        self._update(trainer, batch, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        self._update(trainer, batch, "validation")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        self._update(trainer, batch, "test")

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        pl_module.log("train/skipped_samples", float(self._stats(trainer, "train").total))
        self._report(trainer, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        self._report(trainer, "validation")

    def on_test_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        self._report(trainer, "test")


class NeedleDataModule(pl.LightningDataModule):
    """Emoji images with needle documents, for :class:`~mmformer.training.longdoc.LongDocModule`.

    Pairs the emoji images of the **train** split (training families only; the held-out twitter
    family is never seen) with documents of prose filler and the image's caption inserted at a
    random position, drawn afresh every epoch; validation uses the val split (unseen concepts) at
    one fixed document length and seed.

    Args:
        root: emoji data directory (default: bundled).
        prose: prose text file (default: ``data/prose/kjv.txt``).
        lengths: training document lengths in pieces, drawn uniformly per document.
        val_length: validation document length in pieces.
        batch_size, num_workers: loaders.
        image_size, image_mean, image_std: the model's image side and normalisation
            (``ModelConfig.image_size`` / ``image_mean`` / ``image_std``; ``mmformer fit`` links
            them from the model).
        max_chunks: chunk cap; a document over it is an error (the lengths should fit it).

    Documents are chunked as the model chunks them (its window and stride): the module hands its
    collator over in ``setup`` (:meth:`set_document_collator`, as :class:`LongDocModule` does).
    """

    def __init__(
        self,
        root: str | None = None,
        prose: str | None = None,
        lengths: Sequence[int] = (14, 64, 128, 256, 512, 1024),
        val_length: int = 512,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 64,
        max_chunks: int | None = None,
        seed: int = 0,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer: SentencePieceTokenizer | None = None
        self.document_collator: DocumentCollator | None = None
        self.train_ds: NeedleDataset | None = None
        self.val_ds: NeedleDataset | None = None

    def set_tokenizer(self, tokenizer: SentencePieceTokenizer) -> None:
        self.tokenizer = tokenizer

    def set_document_collator(self, collator: DocumentCollator) -> None:
        """Chunk documents with ``collator``'s tokenizer, window and stride (the model's
        :meth:`~mmformer.model.MMFormer.document_collator`), under this data module's
        ``max_chunks`` cap (over it: an error)."""
        self.document_collator = DocumentCollator(
            collator.tokenizer, collator.length, collator.stride, max_chunks=self.hparams.max_chunks, overflow="error"
        )

    def setup(self, stage: str) -> None:
        if self.tokenizer is None and self.trainer is not None:  # Lightning sets up data before the module
            self.tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        if self.tokenizer is None:
            raise RuntimeError(
                "NeedleDataModule needs a tokenizer: call set_tokenizer or attach it to a Trainer whose module has one"
            )
        if self.train_ds is not None:
            return
        hp = self.hparams
        root = hp.root or default_data_dir()
        filler = Filler(self.tokenizer, load_prose(self.tokenizer, hp.prose))
        train = EmojiData.load(root, "train", hp.image_size)
        val = EmojiData.load(root, "val", hp.image_size)
        norm = dict(mean=hp.image_mean, std=hp.image_std)
        self.train_ds = NeedleDataset(
            train.images, train.captions, self.tokenizer, filler, hp.lengths, train.concept_ids, seed=hp.seed, **norm
        )
        self.val_ds = NeedleDataset(
            val.images,
            val.captions,
            self.tokenizer,
            filler,
            [hp.val_length],
            val.concept_ids,
            seed=hp.seed + 1,
            fixed=True,
            **norm,
        )

    def _collate(self) -> NeedleCollator:
        """Chunking as the model will chunk at inference (its window, stride), cap as configured."""
        if self.document_collator is None:
            raise RuntimeError(
                "NeedleDataModule's loaders chunk documents as the model does: call "
                "set_document_collator(model.document_collator()) or train with a LongDocModule, "
                "which hands its collator over in setup"
            )
        return NeedleCollator(self.document_collator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_ds,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.hparams.num_workers,
            collate_fn=self._collate(),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_ds, batch_size=self.hparams.batch_size, shuffle=False, num_workers=0, collate_fn=self._collate()
        )
