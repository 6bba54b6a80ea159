"""The bundled multi-vendor emoji dataset (``data/emoji``), decoded once into memory.

Layout (see ``data/README.md``)::

    manifest.jsonl   {"image": "images/google/1F600.png", "caption": "grinning face",
                      "hexcode": "1F600", "family": "google", "split": "train"|"val"|"test"}
    concepts.jsonl   {"hexcode", "emoji", "name", "keywords": [...], "group", "split"}  (optional)

The images are small (64x64), so :meth:`EmojiData.load` decodes every PNG of a split once into
a uint8 tensor ``(N, 3, S, S)`` (alpha composited on white) and :class:`InMemoryImageText`
serves training pairs from it with cheap tensor-level augmentation: decoding PNGs every step
would waste the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from mmformer.data.bundled import bundled_dir
from mmformer.data.errors import CorruptSample, Skipped
from mmformer.data.manifest import ImageTextManifest
from mmformer.data.transforms import (
    DEFAULT_MAX_PIXELS,
    BatchNormalize,
    BatchTrainTransform,
    build_transforms,
    load_image,
    sample_random,
    sample_rng,
)
from mmformer.files import atomic_path, write_text_atomic

__all__ = ["CaptionMode", "EmojiData", "InMemoryImageText", "default_data_dir", "read_concepts"]

log = logging.getLogger(__name__)

CaptionMode = Literal["name", "name+keywords"]


def default_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The emoji dataset directory (the one holding ``manifest.jsonl``).

    ``explicit`` (the emoji folder, or a folder holding ``emoji/``), else ``$MMFORMER_DATA``
    (a folder holding ``emoji/``, or the emoji folder itself when it is named ``emoji``), else the repository checkout's
    ``data/emoji``, else the copy inside an installed wheel: see :mod:`mmformer.data.bundled`.

    Raises:
        BundledDataNotFound: a ``FileNotFoundError`` naming the places looked at and how to get the data.
    """
    return bundled_dir("emoji", explicit)


def read_concepts(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``concepts.jsonl`` as ``{hexcode: row}``; ``{}`` if the file does not exist.

    A row's key is its ``hexcode`` (emoji) or, when it has none, its ``id`` (e.g. the icon name
    in ``data/icons``, which is also the image's file stem).
    """
    path = Path(path)
    if not path.is_file():
        return {}
    concepts: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    concepts[str(row["hexcode"] if "hexcode" in row else row["id"])] = row
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{path}: line {line_no}: expected a JSON object with 'hexcode' or 'id': {err!r}"
                    ) from err
    return concepts


@dataclass
class EmojiData:
    """A decoded split of the emoji dataset; per-image lists align with ``images``.

    Attributes:
        images: uint8 ``(N, 3, S, S)``, composited on white.
        captions: per image, its manifest caption (the concept name).
        hexcodes, families, paths: per image.
        concept_ids: long ``(N,)``, index into the ``concept_*`` lists.
        concept_hexcodes, concept_names, concept_keywords: per concept present in this split,
            in first-seen order (keywords from ``concepts.jsonl``; ``[]`` if it is absent).
        skipped: images that could not be decoded (left out and counted, with a warning).
    """

    images: torch.Tensor
    captions: list[str]
    hexcodes: list[str]
    families: list[str]
    paths: list[str]
    concept_ids: torch.Tensor
    concept_hexcodes: list[str]
    concept_names: list[str]
    concept_keywords: list[list[str]]
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def image_size(self) -> int:
        """S, the stored image side."""
        return int(self.images.shape[-1])

    def subset(self, keep: Sequence[int] | torch.Tensor) -> EmojiData:
        """The images at ``keep`` (in that order), with the concept lists re-indexed."""
        keep = [int(i) for i in keep]
        old = [int(self.concept_ids[i]) for i in keep]
        remap = {c: j for j, c in enumerate(dict.fromkeys(old))}
        return EmojiData(
            images=self.images[keep],
            captions=[self.captions[i] for i in keep],
            hexcodes=[self.hexcodes[i] for i in keep],
            families=[self.families[i] for i in keep],
            paths=[self.paths[i] for i in keep],
            concept_ids=torch.tensor([remap[c] for c in old], dtype=torch.long),
            concept_hexcodes=[self.concept_hexcodes[c] for c in remap],
            concept_names=[self.concept_names[c] for c in remap],
            concept_keywords=[self.concept_keywords[c] for c in remap],
            skipped=list(self.skipped),
        )

    @classmethod
    def load(
        cls,
        root: str | os.PathLike[str] | None = None,
        split: str | None = "train",
        image_size: int = 64,
        *,
        families: Sequence[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> EmojiData:
        """Decode the images of ``split`` (None = all rows) from ``root`` (default: bundled).

        Args:
            root: dataset directory (with ``manifest.jsonl``); None -> :func:`default_data_dir`.
            split: value of the manifest's ``split`` column to keep.
            image_size: S; images of another size are resized (shorter side) and centre-cropped.
            families: keep only these families (None = all).
            cache_dir: optional directory for a ``.npy`` cache of the decoded pixels, keyed by the
                manifest's content, split, families and S. Never inside the repository by default.
            max_pixels: per-image decode limit, see :func:`mmformer.data.transforms.load_image`.
        """
        root = Path(root) if root is not None else default_data_dir()
        manifest = ImageTextManifest(root / "manifest.jsonl", split=split, image_size=image_size)
        items = _manifest_items(manifest, families)
        if not items:
            raise ValueError(f"{root / 'manifest.jsonl'}: no images for split={split!r}, families={families}")
        cache = _cache_path(cache_dir, root, split, families, image_size)
        pixels, skipped = _load_cached(cache, len(items), image_size)
        if pixels is None:
            pixels, skipped = _decode_all([it["path"] for it in items], image_size, max_pixels)
            _save_cache(cache, pixels, skipped)
        return cls._assemble(items, pixels, skipped, read_concepts(root / "concepts.jsonl"))

    @classmethod
    def _assemble(
        cls,
        items: list[dict[str, str]],
        pixels: np.ndarray,
        skipped: list[Skipped],
        concepts: dict[str, dict[str, Any]],
    ) -> EmojiData:
        """Drop skipped rows and build the per-image and per-concept lists."""
        bad = {s.path for s in skipped}
        keep = [i for i, it in enumerate(items) if it["path"] not in bad]
        items = [items[i] for i in keep]
        concept_index: dict[str, int] = {}
        names: list[str] = []
        keywords: list[list[str]] = []
        for it in items:
            if it["hexcode"] not in concept_index:
                concept_index[it["hexcode"]] = len(names)
                row = concepts.get(it["hexcode"], {})
                names.append(str(row.get("name") or it["caption"]))
                keywords.append([str(k) for k in row.get("keywords", [])])
        if skipped:
            log.warning("emoji data: skipped %d corrupt image(s) (e.g. %s)", len(skipped), skipped[0])
        return cls(
            images=torch.from_numpy(pixels[keep]),
            captions=[it["caption"] for it in items],
            hexcodes=[it["hexcode"] for it in items],
            families=[it["family"] for it in items],
            paths=[it["path"] for it in items],
            concept_ids=torch.tensor([concept_index[it["hexcode"]] for it in items], dtype=torch.long),
            concept_hexcodes=list(concept_index),
            concept_names=names,
            concept_keywords=keywords,
            skipped=skipped,
        )


def _manifest_items(manifest: ImageTextManifest, families: Sequence[str] | None) -> list[dict[str, str]]:
    """Per item: path, caption, hexcode (default: file stem), family (default: parent dir)."""
    items = []
    for i, caption in enumerate(manifest.captions):
        path = manifest.image_paths[int(manifest.caption_to_image[i])]
        meta = manifest.metadata[i]
        family = str(meta.get("family") or Path(path).parent.name)
        if families is None or family in families:
            items.append(
                {
                    "path": path,
                    "caption": caption.strip(),
                    "family": family,
                    "hexcode": str(meta.get("hexcode") or Path(path).stem),
                }
            )
    return items


def _decode_all(paths: list[str], size: int, max_pixels: int | None) -> tuple[np.ndarray, list[Skipped]]:
    """Decode ``paths`` to uint8 ``(N, 3, S, S)``; rows of undecodable files stay white."""
    out = np.full((len(paths), 3, size, size), 255, dtype=np.uint8)
    skipped: list[Skipped] = []
    for i, path in enumerate(paths):
        try:
            img = load_image(path, max_pixels=max_pixels)
        except CorruptSample as err:
            skipped.append(Skipped.from_error(err))
            continue
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return out, skipped


def _cache_path(
    cache_dir: str | os.PathLike[str] | None, root: Path, split: str | None, families: Sequence[str] | None, size: int
) -> Path | None:
    """``<cache_dir>/emoji-<split>-<S>-<hash>.npy`` (hash of manifest bytes + options), or None."""
    if cache_dir is None:
        return None
    h = hashlib.sha1((root / "manifest.jsonl").read_bytes())
    h.update(repr((split, sorted(families) if families else None, size, str(root.resolve()))).encode())
    return Path(cache_dir) / f"emoji-{split or 'all'}-{size}-{h.hexdigest()[:16]}.npy"


def _load_cached(path: Path | None, n: int, size: int) -> tuple[np.ndarray | None, list[Skipped]]:
    """Cached pixels and skip list if the cache exists and has the expected shape."""
    if path is None or not path.is_file():
        return None, []
    pixels = np.load(path, allow_pickle=False)
    if pixels.shape != (n, 3, size, size) or pixels.dtype != np.uint8:
        log.warning("ignoring emoji cache %s: shape %s, expected %s", path, pixels.shape, (n, 3, size, size))
        return None, []
    side = path.with_suffix(".skipped.json")
    skipped = [Skipped(*s) for s in json.loads(side.read_text())] if side.is_file() else []
    return pixels, skipped


def _save_cache(path: Path | None, pixels: np.ndarray, skipped: list[Skipped]) -> None:
    """Write the cache atomically (temp file, then rename): the skip list first, then the pixels,
    whose presence marks a complete cache."""
    if path is None:
        return
    write_text_atomic(path.with_suffix(".skipped.json"), json.dumps([list(s) for s in skipped]))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, pixels, allow_pickle=False)


class InMemoryImageText(Dataset):
    """Training/eval pairs from :class:`EmojiData`, augmented on uint8 tensors.

    Item ``i`` is image ``i`` with a caption: in eval (``train=False``) always the concept name;
    in training per ``caption_mode``: ``"name"`` -> the name, ``"name+keywords"`` -> uniformly
    the name or its keywords joined by ", " (the name when there are no keywords). Training
    images are augmented (``augment_args``: keys of
    :data:`~mmformer.data.transforms.AUGMENT_DEFAULTS`) unless ``augment=False``: then item ``i`` always has the same pixels,
    those of eval (what lets a teacher's embeddings of it be computed once, see
    :class:`~mmformer.training.distill.DistillModule`).

    Returns ``{"image": float (3, S, S), "caption", "index": i, "image_index": i, "concept": int}``.
    Retrieval metadata: ``captions`` (the names, one per image), ``caption_to_image`` (identity),
    ``concept_ids`` (images sharing a concept share a caption: count a hit on any of them).
    """

    def __init__(
        self,
        data: EmojiData,
        *,
        train: bool,
        image_size: int | None = None,
        caption_mode: CaptionMode = "name",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        augment: bool = True,
        augment_args: dict | None = None,
    ) -> None:
        if caption_mode not in get_args(CaptionMode):
            raise ValueError(f"caption_mode must be 'name' or 'name+keywords', got {caption_mode!r}")
        self.data, self.train, self.caption_mode = data, train, caption_mode
        self.augment = train and augment
        aug = augment_args or {}
        self.transform = build_transforms(image_size or data.image_size, self.augment, mean, std, **aug)
        # training items stay uint8; the collator transforms the whole batch at once (much cheaper)
        same_size = image_size in (None, data.image_size)
        self.batch_transform = None
        if train and same_size:
            self.batch_transform = BatchTrainTransform(mean, std, **aug) if self.augment else BatchNormalize(mean, std)
        self.names = [data.concept_names[int(c)] for c in data.concept_ids]  # per image
        self.choices = [self._caption_choices(int(c)) for c in range(len(data.concept_names))]

    def _caption_choices(self, concept: int) -> list[str]:
        """Training captions of one concept under ``caption_mode``."""
        name, kws = self.data.concept_names[concept], self.data.concept_keywords[concept]
        if self.caption_mode == "name+keywords" and kws:
            return [name, ", ".join(kws)]
        return [name]

    @property
    def captions(self) -> list[str]:
        """Eval captions, one per image (the concept name)."""
        return self.names

    @property
    def caption_to_image(self) -> torch.Tensor:
        """Identity ``(N,)``: caption i belongs to image i."""
        return torch.arange(len(self.names))

    @property
    def concept_ids(self) -> torch.Tensor:
        """``(N,)`` concept of each image."""
        return self.data.concept_ids

    def __len__(self) -> int:
        return len(self.data)

    @classmethod
    def eval_split(
        cls,
        split: str,
        image_size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        root: str | os.PathLike[str] | None = None,
    ) -> InMemoryImageText:
        """The eval dataset of one split of the emoji data (default: the bundled copy)."""
        data = EmojiData.load(root if root is not None else default_data_dir(), split, image_size)
        return cls(data, train=False, mean=mean, std=std)

    def stacked_images(self) -> torch.Tensor:
        """Every item's (transformed) image as one ``(N, 3, S, S)`` float tensor."""
        return torch.stack([self[i]["image"] for i in range(len(self))])

    def __getitem__(self, index: int) -> dict[str, Any]:
        concept = int(self.data.concept_ids[index])
        if self.batch_transform is not None:
            # the image is transformed with its batch (in the collator): only the caption choice is
            # random here, and it needs no torch RNG (seeding and restoring it per sample would
            # cost more than the rest of the item)
            image = self.data.images[index]
            choices = self.choices[concept]
            caption = choices[0] if len(choices) == 1 else sample_random(index).choice(choices)
        else:
            with sample_rng(index) as rng:  # seeded by (seed, epoch, index) under a ResumableSampler
                caption = rng.choice(self.choices[concept]) if self.train else self.names[index]
                image = self.transform(self.data.images[index])
        item = {"image": image, "caption": caption, "index": int(index), "image_index": int(index), "concept": concept}
        if getattr(index, "seed", None) is not None:
            item["seed"] = index.seed  # the collator seeds the batch augmentation from these
        return item
