"""On-disk retrieval indexes: build (resumable), open (checked), search.

An index directory holds::

    index.json        manifest: format, kind (image|text), model fingerprint, dim, count, dtype,
                      metric, backend + parameters, inputs skipped, texts truncated to the model's
                      context, sizes and sha256 of every file; written last
    embeddings.npy    (N, D) float32 or float16, unit rows, memory-mappable
    metadata.jsonl    one JSON object per row: id, path (images) or text, caption when known
    skipped.jsonl     inputs that could not be read, with the reason
    faiss.index       the FAISS structure (backends flat, hnsw, ivfpq)

Building splits the inputs into parts of ``part_size`` items, embeds one part per step and
stores each finished part atomically under ``parts/`` (:func:`build_index` here, in this process;
:func:`mmformer.training.index_build.build_index` runs the same steps with ``trainer.predict``
over several devices or nodes, each rank writing its own parts). A re-run after a kill embeds only the missing parts; the final files are
assembled from the parts, each written to a temporary file and renamed, and ``index.json``
is written last, so a directory without it is an unfinished build, never a damaged index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap as mmap_module
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mmformer.data.errors import CorruptSample, Skipped
from mmformer.data.manifest import ImageTextManifest
from mmformer.data.shards import IMAGE_EXTENSIONS, expand_shards
from mmformer.data.transforms import build_transforms, load_and_transform
from mmformer.files import atomic_path, remove_stale_temps, swap_dir, write_text_atomic
from mmformer.model import model_fingerprint
from mmformer.retrieval.backends import (
    BLOCK_ROWS,
    FAISS_FILE,
    IVF_DATA_FILE,
    BackendParams,
    ExactBackend,
    FaissBackend,
    choose_backend,
    iter_npy_blocks,
    npy_shape,
)
from mmformer.tokenizer import wrap_and_pad

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "index.json"
EMBEDDINGS = "embeddings.npy"
INDEX_DTYPES = ("float32", "float16")  # storage of embeddings.npy
METADATA = "metadata.jsonl"
SKIPPED = "skipped.jsonl"
PARTS = "parts"
BUILD_INFO = "build.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VERIFY_AUTO_BYTES = 1 << 30  # "auto" verification hashes indexes up to 1 GiB


class InvalidIndexError(ValueError):
    """A missing, unfinished, damaged or mismatched index (the message says which file and why)."""


# ---- model identity -------------------------------------------------------------------------
# ---- inputs ---------------------------------------------------------------------------------
@dataclass
class Part:
    """A unit of work: some items of a list source, or one WebDataset shard."""

    index: int
    items: list[dict[str, Any]] | None = None
    shard: str | None = None


def collect_parts(
    source: str | os.PathLike | Sequence[Any],
    kind: str,
    part_size: int,
    image_col: str = "image",
    caption_col: str = "caption",
    split: str | None = None,
    root: str | os.PathLike | None = None,
) -> tuple[list[Part], str]:
    """Split ``source`` into parts; returns (parts, a description of the source).

    Images: a folder (searched recursively), a CSV/TSV/JSONL manifest (unique images, first
    caption kept as metadata; ``split`` keeps the rows whose ``split`` column equals it),
    WebDataset shards (``.tar`` path or brace pattern; one part per shard) or a list of paths. Texts: a ``.txt`` file (one text a line), a manifest (every
    caption, with its image path as metadata) or a list of strings.
    """
    if kind not in ("image", "text"):
        raise ValueError(f"kind={kind!r} must be 'image' or 'text'")
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    if not isinstance(source, (str, os.PathLike)):
        items = [
            ({"id": str(i), "text": str(s)} if kind == "text" else {"id": str(s), "path": str(s)})
            for i, s in enumerate(source)
        ]
        return _split(items, part_size), f"{len(items)} {kind}s given in memory"
    src = str(source)
    if kind == "image" and (src.endswith(".tar") or "{" in src):
        urls = expand_shards(src)
        missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {src!r} not found, e.g. {missing[:3]}")
        return [Part(i, shard=u) for i, u in enumerate(urls)], f"{len(urls)} WebDataset shard(s) {src}"
    path = Path(src)
    if kind == "image" and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        items = [{"id": str(p.relative_to(path)), "path": os.path.abspath(p)} for p in files]
        return _split(items, part_size), f"folder {path} ({len(items)} images)"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file or folder (expected a folder of images, a manifest"
            f"{', a .txt file' if kind == 'text' else ', shards'})"
        )
    if kind == "text" and path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        items = [{"id": f"line-{i}", "text": t.strip()} for i, t in enumerate(lines, 1) if t.strip()]
        if not items:
            raise ValueError(f"{path}: no non-empty lines")
        return _split(items, part_size), f"{path} ({len(items)} texts)"

    man = ImageTextManifest(
        path, image_col=image_col, caption_col=caption_col, split=split, check_files=kind == "image", confine=root
    )
    if kind == "image":
        first: dict[int, str] = {}
        for cap, img in zip(man.captions, man.caption_to_image.tolist()):
            first.setdefault(img, cap)
        items = [
            {"id": os.path.relpath(p, man.root), "path": os.path.abspath(p), "caption": first.get(i)}
            for i, p in enumerate(man.image_paths)
        ]
        return _split(items, part_size), f"manifest {path}{_split_note(split)} ({len(items)} images)"
    items = [
        {
            "id": f"caption-{i}",
            "text": cap,
            "row": man.row_numbers[i],
            "image": os.path.relpath(man.image_paths[img], man.root),
        }
        for i, (cap, img) in enumerate(zip(man.captions, man.caption_to_image.tolist()))
    ]
    return _split(items, part_size), f"manifest {path}{_split_note(split)} ({len(items)} captions)"


def _split_note(split: str | None) -> str:
    return f" split={split}" if split is not None else ""


def _split(items: list[dict[str, Any]], size: int) -> list[Part]:
    return [Part(i, items=items[s : s + size]) for i, s in enumerate(range(0, len(items), size))]


class PartDataset(Dataset):
    """Loads one whole part per item (in DataLoader workers): decoded images or token ids."""

    def __init__(
        self,
        parts: list[Part],
        kind: str,
        transform=None,
        tokenizer=None,
        max_length: int = 16,
        max_pixels: int | None = None,
    ) -> None:
        self.parts, self.kind = parts, kind
        self.transform, self.tokenizer, self.max_length = transform, tokenizer, max_length
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        part = self.parts[i]
        if self.kind == "text":
            items = [it for it in part.items if it["text"].strip()]
            skipped = [Skipped(it["id"], "empty text") for it in part.items if not it["text"].strip()]
            pieces = self.tokenizer.encode_batch([it["text"] for it in items])
            ids, mask = (
                wrap_and_pad(pieces, self.max_length, specials=self.tokenizer.specials)
                if items
                else (torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool))
            )
            truncated = sum(len(p) > self.max_length - 2 for p in pieces)
            return {
                "part": part.index,
                "input_ids": ids,
                "attention_mask": mask,
                "items": items,
                "skipped": skipped,
                "truncated": truncated,
            }
        items, images, skipped = [], [], []
        for item, loaded in self._images(part):
            if isinstance(loaded, Skipped):
                skipped.append(loaded)
            else:
                items.append(item)
                images.append(loaded)
        x = torch.stack(images) if images else torch.zeros(0, 3, 1, 1)
        return {"part": part.index, "images": x, "items": items, "skipped": skipped}

    def _images(self, part: Part) -> Iterable[tuple[dict[str, Any], Any]]:

        def decode(src, name):
            try:
                return load_and_transform(src, self.transform, max_pixels=self.max_pixels, name=name)
            except CorruptSample as e:
                return Skipped.from_error(e)

        if part.shard is None:
            for item in part.items:
                yield item, decode(item["path"], item["path"])
            return
        yield from self._shard_images(part.shard, decode)

    def _shard_images(self, url: str, decode) -> Iterable[tuple[dict[str, Any], Any]]:
        import webdataset as wds

        errors: list[Exception] = []
        name = os.path.basename(url)
        for raw in wds.tarfile_samples([{"url": url}], handler=lambda e: errors.append(e) or True):
            key = raw.get("__key__", "?")
            item: dict[str, Any] = {"id": f"{name}/{key}", "path": f"{url}#{key}"}
            if "txt" in raw:
                item["caption"] = raw["txt"].decode("utf-8", errors="replace").strip()
            ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
            if ext is None:
                yield item, Skipped(item["id"], "no image member in the shard sample")
                continue
            yield item, decode(raw[ext], f"{url}/{key}.{ext}")
        for e in errors:
            yield {"id": f"{name}/?"}, Skipped(url, f"unreadable shard data: {type(e).__name__}: {e}")


def _collate_one(batch: dict[str, Any]) -> dict[str, Any]:
    return batch  # one part per step; the part is already batched


# ---- embedding one part ----------------------------------------------------------------------
def embed_part(model: nn.Module, part: dict[str, Any], kind: str, batch_size: int) -> dict[str, Any]:
    """One part of :class:`PartDataset` -> ``{"part", "embeddings": (n, E) float32 CPU, "items",
    "skipped"}``, encoded in sub-batches of ``batch_size`` (the record :func:`write_part` stores)."""
    out = []
    n = len(part["items"])
    for s in range(0, n, batch_size):
        if kind == "image":
            z = model.encode_image(part["images"][s : s + batch_size])
        else:
            z = model.encode_text(part["input_ids"][s : s + batch_size], part["attention_mask"][s : s + batch_size])
        out.append(z.float().cpu())
    emb = torch.cat(out) if out else torch.zeros(0, 0)
    return {
        "part": part["part"],
        "embeddings": emb,
        "items": part["items"],
        "skipped": part["skipped"],
        "truncated": int(part.get("truncated", 0)),
    }


def write_part(parts_dir: Path, prediction: dict[str, Any]) -> None:
    stem = parts_dir / f"part-{prediction['part']:06d}"
    emb = prediction["embeddings"].numpy().astype(np.float32)
    _save_npy_atomic(stem.with_suffix(".npy"), emb)
    record = {
        "n": len(prediction["items"]),
        "items": prediction["items"],
        "skipped": [list(s) for s in prediction["skipped"]],
        "truncated": int(prediction.get("truncated", 0)),
    }
    write_text_atomic(stem.with_suffix(".json"), json.dumps(record))


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _done_parts(parts_dir: Path) -> set[int]:
    done = set()
    for j in parts_dir.glob("part-*.json"):
        if j.with_suffix(".npy").is_file():
            done.add(int(j.stem.split("-")[1]))
    return done


# ---- build ----------------------------------------------------------------------------------
@dataclass
class BuildPlan:
    """What is left to do for one index build: the parts still to embed (``dataset``, one part per
    item) and where they go. Made by :func:`plan_build`, finished by :func:`finish_build`; the
    embedding in between is :func:`build_index`'s loop here, or ``trainer.predict`` across
    processes in :func:`mmformer.training.index_build.build_index`."""

    model: nn.Module
    target: Path  # the index folder the user named
    out: Path  # where this build writes (``target``, or ``.NAME.rebuild`` beside it under overwrite)
    parts: list[Part]
    todo: list[Part]
    dataset: PartDataset | None  # the parts in ``todo``; None when every part is done
    build: dict[str, Any]
    kind: str
    dtype: str
    backend: str
    params: BackendParams
    seed: int
    model_path: str | None

    @property
    def parts_dir(self) -> Path:
        return self.out / PARTS

    def loader(self, num_workers: int = 0) -> torch.utils.data.DataLoader:
        """The parts still to embed, one per step (a part is already a batch)."""
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=num_workers, collate_fn=_collate_one, persistent_workers=False
        )


def plan_build(
    model: nn.Module,
    source: str | os.PathLike | Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    kind: str = "image",
    backend: str = "auto",
    backend_params: dict[str, Any] | None = None,
    dtype: str = "float32",
    part_size: int = 1024,
    model_path: str | None = None,
    image_col: str = "image",
    caption_col: str = "caption",
    split: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    shard: tuple[int, int] | None = None,
) -> BuildPlan | Index:
    """Check ``out_dir`` and list the parts left to embed; an existing complete index of the same
    model and source is returned opened instead (see :func:`build_index` for the rules)."""
    if dtype not in INDEX_DTYPES:
        raise ValueError(f"dtype={dtype!r} must be 'float32' or 'float16'")
    out = Path(out_dir)
    params = BackendParams.from_dict(backend_params)
    parts, description = collect_parts(source, kind, part_size, image_col, caption_col, split, root)
    if shard is not None:
        parts, description = _shard_parts(parts, shard), f"{description}, shard {shard[0]} of {shard[1]}"
    fingerprint = model_fingerprint(model)
    build = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "source": description,
        "part_size": part_size,
        "model_fingerprint": fingerprint,
        "n_parts": len(parts),
    }
    target = out
    state = _folder_state(out, build)
    if state == "same index" and not overwrite:
        log.info("%s is already built from the same model and source", out)
        remove_stale_temps(out)
        return Index.open(out)
    if state in ("other index", "other build", "foreign") and not overwrite:
        raise InvalidIndexError(_refusal(out, state))
    if state in ("same index", "other index", "other build", "foreign"):
        # overwrite: build beside it and swap at the end; until then the old folder stays as it was
        out = out.parent / f".{out.name}.rebuild"
        if _folder_state(out, build) != "same build":
            shutil.rmtree(out, ignore_errors=True)
    parts_dir = out / PARTS
    parts_dir.mkdir(parents=True, exist_ok=True)
    info_path = parts_dir / BUILD_INFO
    if not info_path.is_file():
        write_text_atomic(info_path, json.dumps(build, indent=1))
    done = _done_parts(parts_dir)
    todo = [p for p in parts if p.index not in done]
    log.info("%s: %d parts, %d already done", description, len(parts), len(parts) - len(todo))
    dataset = None
    if todo:
        if kind == "text" and getattr(model, "tokenizer", None) is None:
            raise ValueError("text indexes need a model with a tokenizer")
        c = model.config
        dataset = PartDataset(
            todo,
            kind,
            transform=build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std),
            tokenizer=model.tokenizer,
            max_length=c.context_length,
        )
    return BuildPlan(
        model=model,
        target=target,
        out=out,
        parts=parts,
        todo=todo,
        dataset=dataset,
        build=build,
        kind=kind,
        dtype=dtype,
        backend=backend,
        params=params,
        seed=seed,
        model_path=model_path,
    )


def _shard_parts(parts: list[Part], shard: tuple[int, int]) -> list[Part]:
    """Shard ``i`` of ``n``: the i-th of n contiguous ranges of parts (so shards 0..n-1, listed
    in order, number their rows as one index over all parts would)."""
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard={shard!r} must be a pair (i, n) with 0 <= i < n") from None
    if not 0 <= i < n:
        raise ValueError(f"shard={shard!r} must be a pair (i, n) with 0 <= i < n")
    if n > len(parts):
        raise ValueError(
            f"shard={shard!r}: {len(parts)} part(s) cannot make {n} shards; use a smaller part_size or fewer shards"
        )
    return parts[i * len(parts) // n : (i + 1) * len(parts) // n]


def finish_build(plan: BuildPlan, embed_seconds: float) -> Index:
    """Every part written -> the index files (assembled, manifest last), the parts removed, the
    folder swapped in when rebuilding; returns the index opened."""
    out = plan.out
    missing = sorted({p.index for p in plan.parts} - _done_parts(plan.parts_dir))
    if missing:
        raise InvalidIndexError(f"{out}: parts {missing[:10]} were not written; rerun the build to finish them")
    model = plan.model
    manifest = _assemble(out, plan.parts, plan.dtype, plan.backend, plan.params, plan.seed)
    manifest.update(
        kind=plan.kind,
        build=plan.build,
        embed_seconds=round(embed_seconds, 3),
        model={
            "fingerprint": plan.build["model_fingerprint"],
            "path": plan.model_path,
            "int8": bool(getattr(model, "is_int8", False)),
            "config": model.config.to_dict() if hasattr(model, "config") else None,
        },
    )
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _remove_parts(plan.parts_dir)
    if out != plan.target:
        swap_dir(out, plan.target)
    return Index.open(plan.target)


def build_index(
    model: nn.Module,
    source: str | os.PathLike | Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    kind: str = "image",
    backend: str = "auto",
    backend_params: dict[str, Any] | None = None,
    dtype: str = "float32",
    batch_size: int = 256,
    part_size: int = 1024,
    num_workers: int = 0,
    model_path: str | None = None,
    image_col: str = "image",
    caption_col: str = "caption",
    split: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    shard: tuple[int, int] | None = None,
) -> Index:
    """Embed ``source`` with ``model`` in this process and write an index to ``out_dir``; returns
    it opened. (Across devices or nodes: :func:`mmformer.training.index_build.build_index`, the
    same files from ``trainer.predict``.)

    Resumable: parts finished by an earlier (killed) run with the same model, source and
    settings are reused. An existing complete index of the same model and source is returned
    as is; anything else in a non-empty ``out_dir`` (another index, another build's parts, or
    files that are not an index) is refused unless ``overwrite``. With ``overwrite`` the new
    index is built in ``.NAME.rebuild`` beside ``out_dir`` (resumable as well) and swapped in
    when complete: a failed or killed rebuild leaves the old folder as it was.

    Args:
        model: an ``MMFormer`` (or an int8 copy from ``quantize_int8``).
        source: see :func:`collect_parts`.
        kind: ``"image"`` or ``"text"`` (what the rows of the index are).
        backend: ``auto`` | ``exact`` | ``flat`` | ``hnsw`` | ``ivfpq`` (see backends.py).
        dtype: ``float32`` or ``float16`` storage of ``embeddings.npy``.
        batch_size: inputs per model call; ``part_size``: inputs per resumable part.
        num_workers: data-loader worker processes that decode the inputs.
        model_path: where the model lives, recorded so ``mmformer search`` can find it.
        image_col, caption_col, split: manifest columns and row filter (manifest sources).
        root: manifest sources: refuse image paths that resolve outside this folder.
        shard: ``(i, n)``: embed only the i-th of n contiguous ranges of parts (one shard per
            node or job, each in its own folder); :func:`write_shard_list` then lists the
            shards so that they open and serve as one index.
    """
    plan = plan_build(
        model,
        source,
        out_dir,
        kind=kind,
        backend=backend,
        backend_params=backend_params,
        dtype=dtype,
        part_size=part_size,
        model_path=model_path,
        image_col=image_col,
        caption_col=caption_col,
        split=split,
        overwrite=overwrite,
        seed=seed,
        root=root,
        shard=shard,
    )
    if isinstance(plan, Index):
        return plan
    t0 = time.perf_counter()
    if plan.todo:
        from tqdm.auto import tqdm

        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for part in tqdm(
                    plan.loader(num_workers),
                    total=len(plan.todo),
                    desc="embedding parts",
                    unit="part",
                    disable=not progress,
                ):
                    write_part(plan.parts_dir, embed_part(model, part, kind, batch_size))
        finally:
            model.train(was_training)
    return finish_build(plan, time.perf_counter() - t0)


def _folder_state(out: Path, build: dict[str, Any]) -> str:
    """What ``out`` holds: "empty" (or missing), "same index" / "other index" (a finished
    index of the same / another input), "same build" / "other build" (parts of an unfinished
    build), or "foreign" (anything else: never written into nor deleted without overwrite)."""
    if not out.exists():
        return "empty"
    if not out.is_dir():
        return "foreign"
    entries = [e for e in out.iterdir() if not _is_our_temp(e.name)]
    if not entries:
        return "empty"
    if (out / MANIFEST).is_file():
        try:
            existing = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return "foreign"
        if not isinstance(existing, dict) or existing.get("format") is None or "build" not in existing:
            return "foreign"
        return "same index" if _same_input(existing.get("build", {}), build) else "other index"
    info = out / PARTS / BUILD_INFO
    ours = {PARTS, EMBEDDINGS, METADATA, SKIPPED, FAISS_FILE, IVF_DATA_FILE}
    if (
        info.is_file()
        and all(e.name in ours for e in entries)
        and all(_is_part_file(f.name) or _is_our_temp(f.name) for f in (out / PARTS).iterdir())
    ):
        try:
            previous = json.loads(info.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return "foreign"
        return "same build" if previous == build else "other build"
    return "foreign"


def _is_part_file(name: str) -> bool:
    return name == BUILD_INFO or (name.startswith("part-") and name.endswith((".npy", ".json")))


def _is_our_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith((".tmp", ".tmpdir"))


def _refusal(out: Path, state: str) -> str:
    if state == "other index":
        existing = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return (
            f"{out} already holds an index built from {existing.get('build', {}).get('source')!r} with model "
            f"{existing.get('model', {}).get('fingerprint')}; pass overwrite=True (--overwrite) to replace it"
        )
    if state == "other build":
        previous = json.loads((out / PARTS / BUILD_INFO).read_text(encoding="utf-8"))
        return (
            f"{out} holds parts of another build ({previous.get('source')!r}, model "
            f"{previous.get('model_fingerprint')}, part_size {previous.get('part_size')}); "
            "pass overwrite=True (--overwrite) or use another directory"
        )
    return (
        f"{out} is not empty and is not an mmformer index (no {MANIFEST}); refusing to write into it. "
        "Choose an empty or new directory, or pass overwrite=True (--overwrite) to replace the folder "
        "(the new index is built beside it and swapped in when complete)"
    )


def _remove_parts(parts_dir: Path) -> None:
    """Remove the part files of a finished build (only those), then the folder if it is empty."""
    for f in parts_dir.iterdir():
        if _is_part_file(f.name) or _is_our_temp(f.name):
            f.unlink()
    try:
        parts_dir.rmdir()
    except OSError:
        log.warning("%s holds files that are not parts of the build; left in place", parts_dir)


def _same_input(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same model, kind and source (the part size only matters to an unfinished build)."""
    keys = ("format", "kind", "source", "model_fingerprint")
    return all(a.get(k) == b.get(k) for k in keys)


def _assemble(
    out: Path, parts: list[Part], dtype: str, backend: str, params: BackendParams, seed: int
) -> dict[str, Any]:
    """Parts -> embeddings.npy, metadata.jsonl, skipped.jsonl, backend files; the manifest's body.
    Streams: one part's embeddings and records are held at a time."""
    parts_dir = out / PARTS

    def record(p: Part) -> dict[str, Any]:
        return json.loads((parts_dir / f"part-{p.index:06d}.json").read_text())

    counts, skipped, truncated = [], [], 0
    for p in parts:
        r = record(p)
        counts.append(r["n"])
        skipped += r["skipped"]
        truncated += int(r.get("truncated", 0))
    n = sum(counts)
    if n == 0:
        raise InvalidIndexError(f"{out}: no input could be embedded (every one was skipped; see {PARTS}/*.json)")
    dim = next(
        np.load(parts_dir / f"part-{p.index:06d}.npy", mmap_mode="r").shape[1] for p, c in zip(parts, counts) if c
    )

    def blocks() -> Iterable[np.ndarray]:
        for p, c in zip(parts, counts):
            if c:
                block = np.load(parts_dir / f"part-{p.index:06d}.npy")
                if block.shape != (c, dim):
                    raise InvalidIndexError(
                        f"{parts_dir}/part-{p.index:06d}.npy has shape {block.shape}, "
                        f"expected ({c}, {dim}); delete it and rerun the build"
                    )
                yield block

    def items() -> Iterable[dict[str, Any]]:
        for p in parts:
            yield from record(p)["items"]

    return _write_index_files(
        out,
        n,
        dim,
        blocks(),
        items(),
        [(s[0], s[1]) for s in skipped],
        dtype,
        backend,
        params,
        seed,
        truncated=truncated,
    )


def _write_index_files(
    out: Path,
    n: int,
    dim: int,
    blocks: Iterable[np.ndarray],
    items: Iterable[dict[str, Any]],
    skipped: Sequence[tuple[str, str]],
    dtype: str,
    backend: str,
    params: BackendParams,
    seed: int,
    block_rows: int = BLOCK_ROWS,
    truncated: int = 0,
) -> dict[str, Any]:
    """The index files from (n, dim) embeddings given as row blocks and one metadata record per
    row, written with plain file writes (nothing of them stays in memory); the manifest's body."""
    with atomic_path(out / EMBEDDINGS) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n, dim)}
        )
        row = 0
        for block in blocks:
            block = np.asarray(block)
            if block.ndim != 2 or block.shape[1] != dim or row + len(block) > n:
                raise ValueError(
                    f"{out / EMBEDDINGS}: a block of shape {block.shape} at row {row} does not fit ({n}, {dim})"
                )
            f.write(np.ascontiguousarray(block, dtype=np.dtype(dtype)).tobytes())
            row += len(block)
        if row != n:
            raise ValueError(f"{out / EMBEDDINGS}: {row} rows written, expected {n}")
    with atomic_path(out / METADATA) as tmp, open(tmp, "w", encoding="utf-8") as f:
        rows = 0
        for it in items:
            f.write(json.dumps(it) + "\n")
            rows += 1
        if rows != n:
            raise ValueError(f"{out / METADATA}: {rows} metadata records for {n} embeddings")
    write_text_atomic(out / SKIPPED, "".join(json.dumps({"source": s[0], "reason": s[1]}) + "\n" for s in skipped))
    if skipped:
        log.warning("skipped %d unreadable input(s); listed in %s", len(skipped), out / SKIPPED)
    kind = choose_backend(n, backend)
    t0 = time.perf_counter()
    (out / IVF_DATA_FILE).unlink(missing_ok=True)
    if kind != "exact":
        b = FaissBackend.build_from_npy(kind, out / EMBEDDINGS, out, params, seed=seed, block_rows=block_rows)
        params = b.params
        del b
    build_s = time.perf_counter() - t0
    files = (
        [EMBEDDINGS, METADATA, SKIPPED]
        + ([FAISS_FILE] if kind != "exact" else [])
        + ([IVF_DATA_FILE] if (out / IVF_DATA_FILE).is_file() else [])
    )
    return {
        "format": FORMAT_VERSION,
        "count": n,
        "dim": int(dim),
        "dtype": dtype,
        "metric": "inner_product",
        "backend": kind,
        "backend_params": params.to_dict(),
        "skipped": len(skipped),
        "truncated": truncated,
        "index_seconds": round(build_s, 3),
        "files": {f: _file_info(out / f) for f in files},
    }


def build_from_embeddings(
    embeddings: str | os.PathLike | np.ndarray | Sequence[str | os.PathLike | np.ndarray],
    out_dir: str | os.PathLike,
    items: Iterable[dict[str, Any]] | None = None,
    *,
    kind: str = "image",
    backend: str = "auto",
    backend_params: dict[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    fingerprint: str = "external",
    block_rows: int = BLOCK_ROWS,
) -> Index:
    """Write an index from embeddings computed elsewhere (no model): the same files and the same
    streaming build as :func:`build_index`, whose parts go through the same writer.

    Args:
        embeddings: a 2-D ``.npy`` file (float32 or float16, unit rows), an array, or a sequence of
            either (part files, concatenated in order). Files are read in blocks of ``block_rows``
            with plain reads, so memory stays bounded whatever their size.
        out_dir: a new or empty folder.
        items: one metadata record per row (each with an ``"id"``); default ``{"id": "<row>"}``.
        fingerprint: recorded as the model fingerprint; searching through a :class:`Retriever`
            needs the fingerprint of the model that made the embeddings.
    """
    if dtype not in INDEX_DTYPES:
        raise ValueError(f"dtype={dtype!r} must be 'float32' or 'float16'")
    if kind not in ("image", "text"):
        raise ValueError(f"kind={kind!r} must be 'image' or 'text'")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidIndexError(f"{out} exists and is not an empty folder; choose a new or empty directory")
    sources = [embeddings] if isinstance(embeddings, (str, os.PathLike, np.ndarray)) else list(embeddings)
    if not sources:
        raise ValueError("embeddings: nothing given (expected a .npy file, an array or a list of them)")
    shapes = []
    for i, src in enumerate(sources):
        if isinstance(src, (str, os.PathLike)):
            rows, dim, _ = npy_shape(Path(src))
        else:
            if np.ndim(src) != 2:
                raise ValueError(f"embeddings[{i}]: expected a 2-D array, got shape {np.shape(src)}")
            rows, dim = np.shape(src)
        shapes.append((rows, dim))
    dims = {d for _, d in shapes}
    if len(dims) != 1:
        raise ValueError(f"embeddings: every part needs the same dim, got {sorted(dims)}")
    n, dim = sum(r for r, _ in shapes), dims.pop()
    if n == 0:
        raise ValueError("embeddings: 0 rows")

    def blocks() -> Iterable[np.ndarray]:
        for src in sources:
            if isinstance(src, (str, os.PathLike)):
                for _, block in iter_npy_blocks(Path(src), block_rows):
                    yield block
            else:
                for s in range(0, len(src), block_rows):
                    yield np.asarray(src[s : s + block_rows], dtype=np.float32)

    out.mkdir(parents=True, exist_ok=True)
    params = BackendParams.from_dict(backend_params)
    description = f"{n} embeddings from {len(sources)} file(s) or array(s)"
    manifest = _write_index_files(
        out,
        n,
        dim,
        blocks(),
        items if items is not None else ({"id": str(i)} for i in range(n)),
        [],
        dtype,
        backend,
        params,
        seed,
        block_rows,
    )
    manifest.update(
        kind=kind,
        embed_seconds=0.0,
        build={
            "format": FORMAT_VERSION,
            "kind": kind,
            "source": description,
            "model_fingerprint": fingerprint,
            "n_parts": len(sources),
        },
        model={"fingerprint": fingerprint, "path": None, "int8": False, "config": None},
    )
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return Index.open(out)


_REQUIRED = {"kind": str, "count": int, "dim": int, "dtype": str, "backend": str, "files": dict, "model": dict}


def _check_manifest_fields(man_path: Path, manifest: dict[str, Any]) -> None:
    """Every field :meth:`Index.open` reads is present with the right type (else one error)."""
    bad = [
        f"{k!r} ({t.__name__})"
        for k, t in _REQUIRED.items()
        if not isinstance(manifest.get(k), t) or isinstance(manifest.get(k), bool)
    ]
    if not bad and not isinstance(manifest["model"].get("fingerprint"), str):
        bad.append("'model.fingerprint' (str)")
    if not bad:
        for name, info in manifest["files"].items():
            if not (
                isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)
            ):
                bad.append(f"'files.{name}' ({{bytes, sha256}})")
            elif Path(name).name != name or name.startswith("."):
                bad.append(f"'files.{name}' (a file name inside the index folder)")
    if bad:
        raise InvalidIndexError(f"{man_path}: missing or malformed field(s) {', '.join(bad)}; rebuild the index")
    if manifest["kind"] not in ("image", "text") or manifest["dtype"] not in ("float32", "float16"):
        raise InvalidIndexError(
            f"{man_path}: kind {manifest['kind']!r} / dtype {manifest['dtype']!r} unknown; rebuild the index"
        )


def _file_info(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _advise_random(array: np.ndarray) -> None:
    """Tell the kernel that a memory-mapped array is read at random rows (exact re-ranking reads a
    few hundred rows a query): no read-ahead around each row, so resident memory stays near the rows
    actually read instead of growing toward the whole file."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap_module, "MADV_RANDOM"):
        mapping.madvise(mmap_module.MADV_RANDOM)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---- open / search --------------------------------------------------------------------------
class Index:
    """An opened index directory: manifest, memory-mapped embeddings, metadata and a backend.

    Use :meth:`open`. ``search(queries (Q, D), k)`` returns (scores, row ids) as numpy arrays;
    :meth:`metadata` gives a row's stored record.
    """

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        embeddings: np.ndarray,
        backend,
        metadata_bytes: bytes,
        line_starts: np.ndarray,
    ) -> None:
        self.directory, self.manifest, self.embeddings, self.backend = directory, manifest, embeddings, backend
        self._meta, self._starts = metadata_bytes, line_starts

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Index({str(self.directory)!r}, kind={m['kind']}, count={m['count']}, dim={m['dim']}, "
            f"backend={m['backend']}, model={self.fingerprint})"
        )

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        *,
        verify: bool | str = "auto",
        mmap: bool = True,
        backend: str | None = None,
        search_params: dict[str, Any] | None = None,
    ) -> Index:
        """Open and check an index directory.

        A folder with a ``shards.json`` instead of an ``index.json`` opens as one
        :class:`ShardedIndex` over the shards it lists (see :func:`write_shard_list`).

        Args:
            verify: True = check every file's sha256; "auto" = only when the files total at
                most 1 GiB (sizes and shapes are always checked); False = sizes and shapes only.
            mmap: memory-map the embeddings, the metadata and the FAISS structure where FAISS allows
                it (the inverted lists of ``ivfpq``, the vectors of ``flat`` / ``hnsw``; ``ivfpq``
                lists stored in ``faiss.ivfdata`` are mapped either way).
            backend: search with another backend than the stored one: ``exact`` always works;
                a FAISS kind other than the stored one is built in memory now.
            search_params: override ``ef_search`` / ``nprobe`` / ``refine``.
        Raises:
            InvalidIndexError: no manifest (unfinished build), unknown format, a missing, resized or
                (when verified) altered file, or embeddings whose shape disagrees.
        """
        d = Path(directory)
        man_path = d / MANIFEST
        if not man_path.is_file() and (d / SHARDS).is_file():
            return ShardedIndex.open(
                d,
                verify=verify,
                mmap=mmap,
                backend=backend,  # type: ignore[return-value]
                search_params=search_params,
            )
        if not man_path.is_file():
            hint = (
                (" (it holds an unfinished build: rerun `mmformer index build` with the same arguments to finish it)")
                if (d / PARTS).is_dir()
                else ""
            )
            raise InvalidIndexError(f"{d}: not an mmformer index, {MANIFEST} is missing{hint}")
        try:
            manifest = json.loads(man_path.read_text())
        except ValueError as e:
            raise InvalidIndexError(f"{man_path}: damaged manifest ({e}); rebuild the index") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
            got = manifest.get("format") if isinstance(manifest, dict) else manifest
            raise InvalidIndexError(
                f"{man_path}: index format {got!r}, this version reads {FORMAT_VERSION}; rebuild the index"
            )
        _check_manifest_fields(man_path, manifest)
        kind = backend or manifest["backend"]
        # searching exactly needs no FAISS file: leave it out of the checks (it may be absent)
        files = {
            n: i for n, i in manifest["files"].items() if not (kind == "exact" and n in (FAISS_FILE, IVF_DATA_FILE))
        }
        total = 0
        for name, info in files.items():
            p = d / name
            if not p.is_file():
                raise InvalidIndexError(f"{p}: missing (the index lists it); rebuild the index")
            if p.stat().st_size != info["bytes"]:
                raise InvalidIndexError(
                    f"{p}: {p.stat().st_size} bytes, the manifest says {info['bytes']} "
                    "(truncated or replaced); rebuild the index"
                )
            total += info["bytes"]
        if verify is True or (verify == "auto" and total <= VERIFY_AUTO_BYTES):
            for name, info in files.items():
                if _sha256(d / name) != info["sha256"]:
                    raise InvalidIndexError(
                        f"{d / name}: checksum mismatch (the file was altered or damaged); rebuild the index"
                    )
        try:
            emb = np.load(d / EMBEDDINGS, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as e:
            raise InvalidIndexError(f"{d / EMBEDDINGS}: unreadable ({e}); rebuild the index") from e
        if mmap:
            _advise_random(emb)
        if emb.shape != (manifest["count"], manifest["dim"]) or emb.dtype != np.dtype(manifest["dtype"]):
            raise InvalidIndexError(
                f"{d / EMBEDDINGS}: shape {emb.shape} {emb.dtype}, the manifest says "
                f"({manifest['count']}, {manifest['dim']}) {manifest['dtype']}"
            )
        meta = _read_metadata(d / METADATA, mmap)
        starts = _line_starts(meta)
        if len(starts) - 1 != manifest["count"]:
            raise InvalidIndexError(f"{d / METADATA}: {len(starts) - 1} rows, the manifest says {manifest['count']}")
        params = BackendParams.from_dict({**manifest.get("backend_params", {}), **(search_params or {})})
        stored = manifest["backend"]
        if kind == "exact":
            b = ExactBackend(emb)
        elif kind == stored:
            try:
                b = FaissBackend.load(
                    kind,
                    d,
                    params,
                    embeddings=emb if kind == "ivfpq" else None,
                    mmap=mmap,
                    expect=(int(manifest["count"]), int(manifest["dim"])),
                )
            except ValueError as e:
                raise InvalidIndexError(str(e)) from e
        else:
            b = FaissBackend.build(kind, emb, params)
        return cls(d, manifest, emb, b, meta, starts)

    @classmethod
    def open_many(cls, directories: Sequence[str | os.PathLike], **kwargs: Any) -> ShardedIndex:
        """Open several indexes (shards of one corpus, same model, kind and dim) as one
        :class:`ShardedIndex`; ``kwargs`` as for :meth:`open`."""
        return ShardedIndex([cls.open(d, **kwargs) for d in directories])

    def metadata(self, row: int) -> dict[str, Any]:
        """The stored record of row ``row`` (id, path or text, caption...)."""
        return json.loads(self._meta[self._starts[row] : self._starts[row + 1]])

    def search_exact(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored embeddings, whatever the backend (for checking recall)."""
        return ExactBackend(self.embeddings).search(np.asarray(queries, dtype=np.float32), k)

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) unit query embeddings -> (scores (Q, k) float32, rows (Q, k) int64)."""
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.manifest["dim"]:
            raise ValueError(f"queries must have shape (Q, {self.manifest['dim']}), got {q.shape}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        return self.backend.search(q, k)


def _read_metadata(path: Path, mmap: bool):
    """metadata.jsonl as bytes (read into memory) or as a read-only memory map."""
    if not mmap or path.stat().st_size == 0:
        return path.read_bytes()
    import mmap as _mmap

    with open(path, "rb") as f:
        return _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)


def _line_starts(meta, chunk: int = 1 << 26) -> np.ndarray:
    """Byte offset of every line of ``meta`` and its end: (rows + 1,) int64, scanned in chunks."""
    found = [np.zeros(1, dtype=np.int64)]
    size = len(meta)
    for s in range(0, size, chunk):
        view = np.frombuffer(meta, dtype=np.uint8, count=min(chunk, size - s), offset=s)
        found.append(np.flatnonzero(view == 10).astype(np.int64) + s + 1)
        del view
    return np.concatenate(found)


# ---- shards ---------------------------------------------------------------------------------
SHARDS = "shards.json"


def write_shard_list(directory: str | os.PathLike, shards: Sequence[str | os.PathLike]) -> Path:
    """Write ``directory/shards.json`` listing ``shards`` (index folders, in row order), so that
    ``Index.open(directory)`` (and ``mmformer serve --index NAME=directory``) opens them as one
    :class:`ShardedIndex`. Shards inside ``directory`` are stored by relative path. The shards
    are opened once to check that they fit together."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / MANIFEST).is_file():
        raise InvalidIndexError(f"{d} holds an index ({MANIFEST}); put {SHARDS} in a folder of its own")
    if not shards:
        raise ValueError("shards: at least one index folder is needed")
    listed = []
    for s in shards:
        p = Path(s).resolve()
        try:
            listed.append(str(p.relative_to(d.resolve())))
        except ValueError:
            listed.append(str(p))
    ShardedIndex([Index.open(d / s, verify=False) for s in listed])
    write_text_atomic(d / SHARDS, json.dumps({"format": FORMAT_VERSION, "shards": listed}, indent=1) + "\n")
    return d / SHARDS


class ShardedIndex:
    """Several indexes of one model searched as one: rows are numbered shard after shard, and
    :meth:`search` merges each shard's top-k, which is exact: the global top-k of the union is
    in the union of the per-shard top-k (each shard searched with its own backend).

    Open with :meth:`Index.open_many` or :meth:`Index.open` on a folder with ``shards.json``.
    """

    def __init__(self, shards: Sequence[Index], directory: Path | None = None) -> None:
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        first = shards[0]
        for sh in shards[1:]:
            for what, a, b in (
                ("model", first.fingerprint, sh.fingerprint),
                ("kind", first.kind, sh.kind),
                ("dim", first.manifest["dim"], sh.manifest["dim"]),
            ):
                if a != b:
                    raise InvalidIndexError(
                        f"{sh.directory}: {what} {b!r} differs from {first.directory}'s {a!r}; "
                        "shards of one index need the same model, kind and dim"
                    )
        self.shards = list(shards)
        self.directory = directory or first.directory
        self.offsets = np.cumsum([0] + [len(sh) for sh in self.shards])
        backends = sorted({sh.manifest["backend"] for sh in self.shards})
        self.manifest = {
            "format": FORMAT_VERSION,
            "kind": first.kind,
            "count": int(self.offsets[-1]),
            "dim": first.manifest["dim"],
            "dtype": first.manifest["dtype"],
            "metric": first.manifest.get("metric", "inner_product"),
            "backend": backends[0] if len(backends) == 1 else "+".join(backends),
            "model": first.manifest["model"],
            "files": {},  # each shard checks its own
            "shards": [str(sh.directory) for sh in self.shards],
        }

    @classmethod
    def open(cls, directory: str | os.PathLike, **kwargs: Any) -> ShardedIndex:
        """Open the shards listed in ``directory/shards.json``; ``kwargs`` as for :meth:`Index.open`."""
        d = Path(directory)
        path = d / SHARDS
        try:
            listing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidIndexError(f"{path}: unreadable shard list ({e})") from e
        if not isinstance(listing, dict) or listing.get("format") != FORMAT_VERSION:
            got = listing.get("format") if isinstance(listing, dict) else listing
            raise InvalidIndexError(f"{path}: shard list format {got!r}, this version reads {FORMAT_VERSION}")
        names = listing.get("shards")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InvalidIndexError(f"{path}: 'shards' must be a non-empty list of index folders")
        return cls([Index.open(d / n, **kwargs) for n in names], directory=d)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def fingerprint(self) -> str:
        return self.shards[0].fingerprint

    def __len__(self) -> int:
        return self.manifest["count"]

    def __repr__(self) -> str:
        return (
            f"ShardedIndex({str(self.directory)!r}, shards={len(self.shards)}, kind={self.kind}, "
            f"count={len(self)}, backend={self.manifest['backend']}, model={self.fingerprint})"
        )

    def metadata(self, row: int) -> dict[str, Any]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        i = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.shards[i].metadata(row - int(self.offsets[i]))

    def search(self, queries: np.ndarray | torch.Tensor, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) unit queries -> (scores (Q, k), global rows (Q, k)); ties keep shard order."""
        return self._merge([sh.search(queries, k) for sh in self.shards], k)

    def search_exact(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        return self._merge([sh.search_exact(queries, k) for sh in self.shards], k)

    def _merge(self, results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.concatenate([s for s, _ in results], axis=1)
        rows = np.concatenate([np.where(r >= 0, r + off, -1) for (_, r), off in zip(results, self.offsets)], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return (
            np.take_along_axis(scores, order, 1).astype(np.float32),
            np.take_along_axis(rows, order, 1).astype(np.int64),
        )
