"""WebDataset shards: read (an IterableDataset) and write (``write_shards``).

A shard is a ``.tar`` whose members are grouped by key: ``{key}.png|jpg|jpeg|webp`` plus
``{key}.txt`` (the caption) or ``{key}.json`` (an object with a caption field). Bad samples
(undecodable image, missing caption, unreadable tar) do not stop the stream: they come out as
:class:`~mmformer.data.errors.Skipped` markers, which the collator drops and counts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmformer.data.errors import CorruptSample, Skipped
from mmformer.data.transforms import (
    DEFAULT_MAX_PIXELS,
    SampleKey,
    build_transforms,
    load_and_transform,
    sample_rng,
    sample_seed,
)
from mmformer.files import atomic_path

__all__ = ["IMAGE_EXTENSIONS", "ResumableShardLoader", "ShardDataset", "expand_shards", "write_shards"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def expand_shards(shards: str | Iterable[str]) -> list[str]:
    """A brace pattern (``"d/shard-{000000..000009}.tar"``, ``::``-separated) or a list -> list."""
    if isinstance(shards, (str, os.PathLike)):
        return list(wds.shardlists.expand_urls(os.fspath(shards)))
    return [os.fspath(s) for s in shards]


class _SkipRecorder:
    """webdataset exception handler: records the error as a ``Skipped`` and continues."""

    def __init__(self) -> None:
        self.pending: list[Skipped] = []

    def __call__(self, exn: Exception) -> bool:
        # webdataset appends the shard URL as the last argument where it knows it
        where = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "<shard>"
        first = exn.args[0] if exn.args else ""
        self.pending.append(Skipped(where, f"unreadable shard data: {type(exn).__name__}: {first}"))
        log.debug("shard error: %r", exn)
        return True  # continue with the next member / shard


class ShardDataset(IterableDataset):
    """Stream (image, caption) samples from WebDataset shards.

    Each pass: shard list -> ``split_by_node`` (rank) -> ``split_by_worker`` -> shard order
    shuffled locally (after splitting, so ranks never overlap) -> tar members grouped by key ->
    shuffle buffer -> decode with :func:`load_image` + ``transform``. Yields
    ``{"image": (3, S, S), "caption", "index": -1, "key", "url"}`` or a :class:`Skipped` marker.

    Args:
        shards: brace pattern or list of paths/URLs (anything ``webdataset`` can open).
        transform: ``PIL.Image -> tensor``; default ``build_transforms(image_size, train)``.
        train: default-transform mode; also picks a random caption when a JSON caption is a list
            (eval takes the first).
        shuffle: buffer size for sample shuffling (0 = no shuffling, shard order kept).
        caption_key: field of ``{key}.json`` holding the caption (``.txt`` wins if both exist).
        seed: base seed; the per-pass seed also mixes in the DataLoader worker seed (which
            changes every epoch) or, in the main process, a pass counter.
        epoch_size: items (samples + skip markers) per rank per epoch. None: one pass over this
            rank's shards, so ranks may yield different numbers of batches, which hangs DDP/FSDP
            at the epoch's end; set it for multi-rank training: each worker then cycles through
            its shards (reshuffled each cycle) until it has yielded its share,
            ``ceil(epoch_size / num_workers)``.
    """

    def __init__(
        self,
        shards: str | Iterable[str],
        *,
        transform: Callable[[Any], torch.Tensor] | None = None,
        image_size: int = 64,
        train: bool = True,
        shuffle: int = 1000,
        caption_key: str = "caption",
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        epoch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.urls = expand_shards(shards)
        if not self.urls:
            raise ValueError(f"no shards in {shards!r}")
        self.transform = transform if transform is not None else build_transforms(image_size, train)
        self.train, self.shuffle, self.caption_key = train, shuffle, caption_key
        self.seed, self.max_pixels, self.epoch_size = seed, max_pixels, epoch_size
        self._passes = 0
        self.epoch: int | None = None  # set by ResumableShardLoader: passes seeded by (seed, epoch, rank, worker)

    def set_epoch(self, epoch: int) -> None:
        """Seed every pass (shard order, shuffle buffer, caption choice, augmentation) by (seed,
        epoch, rank, worker) only, so a resumed run replays an epoch exactly."""
        self.epoch = int(epoch)

    def _pass_rng(self) -> random.Random:
        """RNG for this pass: differs per worker and per epoch, reproducible under a fixed seed."""
        if self.epoch is not None:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            return random.Random(sample_seed(self.seed, self.epoch, rank * 65536 + worker))
        info = get_worker_info()
        base = info.seed if info is not None else self._passes
        self._passes += 1
        return random.Random(hash((self.seed, base)))

    def _my_urls(self, rng: random.Random) -> list[str]:
        """This rank's and worker's shards, locally shuffled when shuffling."""
        urls = list(wds.split_by_worker(wds.split_by_node(self.urls)))
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        if len(self.urls) < world * workers and worker == 0 and rank == 0:
            warnings.warn(
                f"{len(self.urls)} shards for {world} rank(s) x {workers} worker(s): "
                "some workers get no data; write more, smaller shards",
                stacklevel=2,
            )
        if self.shuffle:
            rng.shuffle(urls)
        return urls

    def __iter__(self) -> Iterator[dict[str, Any] | Skipped]:
        rng = self._pass_rng()
        if self.epoch_size is None:
            yield from self._one_pass(rng)
            return
        workers = wds.utils.pytorch_worker_info()[3]
        quota = -(-self.epoch_size // workers)  # ceil
        n = 0
        while n < quota:
            before = n
            for item in self._one_pass(rng):
                yield item
                n += 1
                if n == quota:
                    return
            if n == before:  # this worker has no shards, or they hold nothing
                warnings.warn(f"shard worker yielded nothing; epoch has {n} of {quota} items", stacklevel=2)
                return

    def _one_pass(self, rng: random.Random) -> Iterator[dict[str, Any] | Skipped]:
        """Every sample of this rank's and worker's shards once (shuffled when shuffling)."""
        recorder = _SkipRecorder()
        samples = wds.tarfile_samples(({"url": u} for u in self._my_urls(rng)), handler=recorder)
        if self.shuffle:
            samples = wds.shuffle(bufsize=self.shuffle, initial=min(100, self.shuffle), rng=rng)(samples)
        for raw in samples:
            yield from _drain(recorder)
            yield self._decode(raw, rng)
        yield from _drain(recorder)

    def _decode(self, raw: Mapping[str, Any], rng: random.Random) -> dict[str, Any] | Skipped:
        """Grouped tar members -> sample dict, or a ``Skipped`` marker naming ``url/key``."""
        name = f"{raw.get('__url__', '<shard>')}/{raw.get('__key__', '?')}"
        try:
            caption = self._caption(raw, name, rng)
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
            if ext is None:
                raise CorruptSample(
                    name,
                    f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)}); "
                    f"members: {sorted(k for k in raw if not k.startswith('__'))}",
                )
            key = SampleKey(0, rng.getrandbits(63)) if self.epoch is not None else 0  # seeded augmentation
            with sample_rng(key):
                image = load_and_transform(raw[ext], self.transform, max_pixels=self.max_pixels, name=f"{name}.{ext}")
            return {
                "image": image,
                "caption": caption,
                "index": -1,
                "key": raw.get("__key__"),
                "url": raw.get("__url__"),
            }
        except CorruptSample as err:
            log.debug("skipping corrupt shard sample %s", err)
            return Skipped.from_error(err)

    def _caption(self, raw: Mapping[str, Any], name: str, rng: random.Random) -> str:
        """Caption from ``.txt``, else ``.json[caption_key]`` (a list: random in train, else first)."""
        if "txt" in raw:
            caption: Any = raw["txt"].decode("utf-8", errors="replace")
        elif "json" in raw:
            try:
                caption = json.loads(raw["json"]).get(self.caption_key)
            except (ValueError, AttributeError) as err:
                raise CorruptSample(f"{name}.json", f"bad JSON caption record: {err}") from err
            if isinstance(caption, list):
                caption = (rng.choice(caption) if self.train else caption[0]) if caption else ""
        else:
            raise CorruptSample(name, "no caption member (.txt or .json)")
        caption = "" if caption is None else str(caption).strip()
        if not caption:
            raise CorruptSample(name, "empty caption")
        return caption


class ResumableShardLoader(DataLoader):
    """A training DataLoader over a :class:`ShardDataset` whose position is checkpointed: epoch
    and ``batches_done`` (kept up to date by :class:`mmformer.training.checkpoint.ExactResume`,
    which also calls :meth:`set_epoch`). Each epoch's stream is seeded by (seed, epoch, rank,
    worker); a resumed epoch re-reads and drops its first ``batches_done`` batches (exact, at the
    cost of decoding them again). Workers are not persistent (they must see the epoch)."""

    def __init__(self, dataset: ShardDataset, **kwargs: Any) -> None:
        if not isinstance(dataset, ShardDataset):
            raise TypeError(f"ResumableShardLoader needs a ShardDataset, got {type(dataset).__name__}")
        kwargs["persistent_workers"] = False
        super().__init__(dataset, **kwargs)
        self.epoch, self.batches_done, self._skip = 0, 0, 0
        dataset.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self._skip = int(epoch), 0
        self.dataset.set_epoch(self.epoch)

    def __iter__(self):
        it = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(it, None)
        return it

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "batch_size": self.batch_size,
            "seed": self.dataset.seed,
            "epoch_size": self.dataset.epoch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self.dataset.set_epoch(self.epoch)
        same = all(
            state.get(k) == v
            for k, v in (
                ("batch_size", self.batch_size),
                ("seed", self.dataset.seed),
                ("epoch_size", self.dataset.epoch_size),
            )
        )
        self._skip = self.batches_done if same else 0
        if not same and self.batches_done:
            log.warning(
                "resuming shard epoch %d from its beginning: batch size, seed or epoch size changed", self.epoch
            )


def _drain(recorder: _SkipRecorder) -> Iterator[Skipped]:
    """Yield and clear the errors the webdataset handler recorded."""
    while recorder.pending:
        yield recorder.pending.pop(0)


def _image_bytes(image: Any, ext: str | None) -> tuple[bytes, str]:
    """(encoded bytes, extension) for a path, raw bytes (``ext`` required) or a PIL image (PNG)."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "png"
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), (ext or "png").lower()
    path = Path(image)
    return path.read_bytes(), (ext or path.suffix.lstrip(".")).lower()


def _encode_sample(sample: Mapping[str, Any], key: str, caption_format: str) -> dict[str, Any]:
    """One ``write_shards`` input sample -> webdataset member dict (all values bytes)."""
    if "." in key or "/" in key:
        raise ValueError(f"shard key {key!r} must not contain '.' or '/'")
    data, ext = _image_bytes(sample["image"], sample.get("image_ext"))
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"sample {key!r}: image extension {ext!r} not in {IMAGE_EXTENSIONS}")
    meta = dict(sample.get("meta") or {})
    out: dict[str, Any] = {"__key__": key, ext: data}
    if caption_format == "json":
        out["json"] = json.dumps({**meta, "caption": sample["caption"]}, ensure_ascii=False).encode()
    else:
        out["txt"] = str(sample["caption"]).encode("utf-8")
        if meta:
            out["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return out


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_pattern: str,
    maxcount: int = 10000,
    *,
    caption_format: Literal["txt", "json"] = "txt",
    start: int = 0,
) -> list[str]:
    """Write samples into ``.tar`` shards; each shard appears atomically (temp file, then rename).

    Args:
        samples: dicts with ``image`` (a path, encoded bytes with ``image_ext``, or a PIL image,
            stored as PNG), ``caption`` (str), optional ``key`` (default: running number, 9 digits;
            no '.' or '/'), optional ``meta`` (dict, stored in ``{key}.json``).
        out_pattern: printf-style shard name, e.g. ``"out/shard-%06d.tar"``.
        maxcount: samples per shard.
        caption_format: ``"txt"`` -> ``{key}.txt``; ``"json"`` -> ``{key}.json`` with ``caption``.
        start: number of the first shard.

    Returns:
        The shard paths written, in order (none for no samples).
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    written: list[str] = []
    batch: list[dict[str, Any]] = []
    for i, sample in enumerate(samples):
        batch.append(_encode_sample(sample, str(sample.get("key", f"{i:09d}")), caption_format))
        if len(batch) == maxcount:
            written.append(_write_one_shard(batch, out_pattern % (start + len(written))))
            batch = []
    if batch:
        written.append(_write_one_shard(batch, out_pattern % (start + len(written))))
    return written


def _write_one_shard(members: list[dict[str, Any]], path: str) -> str:
    """Write one tar to a temp file in the target directory, then ``os.replace`` it into place."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)
        for m in members:
            writer.write(m)
        writer.close()
    log.info("wrote %d samples to %s", len(members), target)
    return str(target)
