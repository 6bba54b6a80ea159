"""What the service computes, without any transport: a model, named indexes, input checks.

:class:`Engine` turns request fields into model inputs (``prepare_text`` -> piece ids with the
number of pieces cut off, ``prepare_image`` -> a (3, S, S) tensor), runs whole batches of them
(``encode_text_batch`` pads to the longest text of the batch, exactly as ``Tokenizer.__call__``
does, so every row equals ``model.encode_texts([text])``) and searches an index through its
:class:`~mmformer.retrieval.Retriever`. Every refusal is a :class:`~mmformer.serve.errors.ServeError`
naming the field.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmformer.compress import quantize_int8
from mmformer.data.errors import CorruptSample
from mmformer.data.transforms import BatchNormalize, build_transforms, load_image
from mmformer.model import MMFormer, model_fingerprint
from mmformer.retrieval import Hit, Index, Retriever
from mmformer.serve.decode import DecodeSpec, check_upload, decode_reason
from mmformer.serve.errors import InvalidArgument, NotFound
from mmformer.tokenizer import wrap_and_pad

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
THUMBNAIL_PX = 160


@dataclass
class Limits:
    """Per-request limits (requests over them are refused with INVALID_ARGUMENT)."""

    max_texts: int = 256  # texts in one EmbedText request
    max_images: int = 64  # images in one EmbedImage request
    max_text_chars: int = 20_000  # longer texts are refused before tokenizing
    max_image_bytes: int = 8 << 20  # encoded bytes of one image (the upload limit)
    max_pixels: int = 4096 * 4096  # width * height read from the header: decompression bombs


@dataclass
class TextInput:
    """A tokenized text: its piece ids (already cut to the context) and how many were cut off."""

    pieces: list[int]
    dropped: int


class Engine:
    """A model in eval mode and the named indexes searched with it.

    ``precision``: "fp32", "bf16" (weights and inputs in bfloat16, results returned as float32)
    or "int8" (``quantize_int8``, CPU). Indexes must have been built with the same model.
    """

    def __init__(
        self,
        model: MMFormer,
        indexes: dict[str, Index] | None = None,
        *,
        precision: str = "fp32",
        limits: Limits | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer attached (tokenizer.model missing from its directory)")
        model = model.eval()
        fingerprint = model_fingerprint(model)
        if precision == "int8":
            model = quantize_int8(model)
        elif precision == "bf16":
            model = model.to(torch.bfloat16)
            model.source_fingerprint = fingerprint  # indexes built by the float model stay searchable
        self.model, self.precision, self.fingerprint = model, precision, fingerprint
        self.limits = limits or Limits()
        c = model.config
        self.context_length = c.context_length
        self.transform = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
        self.normalize = BatchNormalize(c.image_mean, c.image_std)
        self.decode_spec = DecodeSpec(c.image_size, self.limits.max_pixels)
        self.device = torch.device("cpu") if precision == "int8" else next(model.parameters()).device
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.retrievers = {name: Retriever(model, index) for name, index in (indexes or {}).items()}
        self._files: dict[str, dict[str, Path]] = {}  # index name -> id -> image file, read on first use
        self._files_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        index_dirs: dict[str, str | os.PathLike] | None = None,
        *,
        precision: str = "fp32",
        device: str = "cpu",
        limits: Limits | None = None,
        verify: bool | str = "auto",
    ) -> Engine:
        """Load a ``save_pretrained`` directory and open every index (checked against the model)."""
        model = MMFormer.from_pretrained(model_dir, map_location=device)
        indexes = {name: Index.open(d, verify=verify) for name, d in (index_dirs or {}).items()}
        return cls(model, indexes, precision=precision, limits=limits)

    # ---- inputs -------------------------------------------------------------------------------
    def prepare_text(self, text: Any, field: str) -> TextInput:
        """Check one text and tokenize it; over-long texts are cut to the context (counted)."""
        if not isinstance(text, str):
            raise InvalidArgument(f"expected a string, got {type(text).__name__}", field)
        if not text.strip():
            raise InvalidArgument("empty text (expected at least one non-space character)", field)
        if len(text) > self.limits.max_text_chars:
            raise InvalidArgument(f"{len(text)} characters exceeds the limit of {self.limits.max_text_chars}", field)
        check_unicode(text, field)
        pieces = self.model.tokenizer.encode(text)
        keep = self.context_length - 2  # bos and eos
        return TextInput(pieces[:keep], max(0, len(pieces) - keep))

    def prepare_texts(self, texts: Any, field: str = "texts") -> list[TextInput]:
        if not isinstance(texts, (list, tuple)) or not texts:
            raise InvalidArgument("expected a non-empty list of strings", field)
        if len(texts) > self.limits.max_texts:
            raise InvalidArgument(f"{len(texts)} texts exceeds the limit of {self.limits.max_texts} a request", field)
        return [self.prepare_text(t, f"{field}[{i}]") for i, t in enumerate(texts)]

    def prepare_image(self, data: Any, field: str) -> torch.Tensor:
        """Encoded image bytes -> (3, S, S) float tensor (eval transforms of the model), in this thread.
        The service decodes through a :class:`~mmformer.serve.decode.DecodePool` instead."""
        check_upload(data, field, self.limits.max_image_bytes)
        try:
            image = load_image(bytes(data), max_pixels=self.limits.max_pixels, name=field)
        except CorruptSample as e:
            raise InvalidArgument(f"not a readable image (PNG, JPEG, WebP...): {decode_reason(e)}", field) from None
        return self.transform(image)

    def check_images(self, images: Any, field: str = "images") -> None:
        if not isinstance(images, (list, tuple)) or not images:
            raise InvalidArgument("expected a non-empty list of encoded images", field)
        if len(images) > self.limits.max_images:
            raise InvalidArgument(
                f"{len(images)} images exceeds the limit of {self.limits.max_images} a request", field
            )

    # ---- model calls (run in the model thread) ------------------------------------------------
    @torch.inference_mode()
    def encode_text_batch(self, inputs: Sequence[TextInput]) -> list[np.ndarray]:
        """(B) texts -> B float32 (E,) embeddings; ids padded to the longest text of the batch."""
        ids, mask = wrap_and_pad(
            [t.pieces for t in inputs], self.context_length, specials=self.model.tokenizer.specials
        )
        z = self.model.encode_text(ids.to(self.device), mask.to(self.device)).float().cpu().numpy()
        return list(z)

    @torch.inference_mode()
    def encode_image_batch(self, images: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """(B) (3, S, S) tensors -> B float32 (E,) embeddings. uint8 tensors (decoded pixels, see
        :mod:`mmformer.serve.decode`) are normalised here, float ones are taken as already normalised."""
        x = torch.stack(list(images))
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        x = x.to(self.device, self.dtype)
        return list(self.model.encode_image(x).float().cpu().numpy())

    # ---- indexes ------------------------------------------------------------------------------
    def resolve_index(self, name: str, field: str = "index") -> str:
        """The index called ``name``; an empty name means the only one loaded."""
        if not name:
            if len(self.retrievers) == 1:
                return next(iter(self.retrievers))
            if not self.retrievers:
                raise NotFound("no index is loaded (start the service with --index NAME=DIR)", field)
            raise InvalidArgument(f"several indexes are loaded, name one of {sorted(self.retrievers)}", field)
        if name not in self.retrievers:
            loaded = sorted(self.retrievers) or "none"
            raise NotFound(f"unknown index {name!r} (loaded: {loaded})", field)
        return name

    def check_k(self, name: str, k: Any, field: str = "k") -> int:
        n = len(self.retrievers[name].index)
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidArgument(f"expected an integer, got {type(k).__name__}", field)
        if not 1 <= k <= n:
            raise InvalidArgument(f"k={k} must be between 1 and the gallery size {n} of index {name!r}", field)
        return k

    def search(self, name: str, embedding: np.ndarray, k: int) -> list[Hit]:
        """Top-k hits of one (E,) query embedding in index ``name``."""
        return self.retrievers[name].search_embeddings(embedding[None, :], k)[0]

    def thumbnail(self, name: str, item_id: str) -> bytes | None:
        """A small PNG of the image file that index ``name`` lists under ``item_id``; None for
        anything the index does not list (so no other file on disk can be reached)."""
        if name not in self.retrievers:
            return None
        with self._files_lock:
            if name not in self._files:
                self._files[name] = _listed_files(self.retrievers[name].index)
        path = self._files[name].get(item_id)
        if path is None or not path.is_file():
            return None
        try:
            with Image.open(path) as im:
                im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                buf = io.BytesIO()
                (im.convert("RGBA") if im.mode not in ("RGB", "RGBA", "L") else im).save(buf, format="PNG")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("thumbnail of %s in index %s: %s", item_id, name, e)
            return None
        return buf.getvalue()

    def info(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "config": self.model.config.to_dict(),
            "precision": self.precision,
            "indexes": [
                {
                    "name": n,
                    "kind": r.index.kind,
                    "count": len(r.index),
                    "backend": r.index.manifest["backend"],
                    "dim": int(r.index.manifest["dim"]),
                }
                for n, r in self.retrievers.items()
            ],
        }


def check_unicode(text: str, field: str, what: str = "") -> None:
    """Refuse a string that no UTF-8 text can hold: one with a lone surrogate (JSON's ``"\\ud800"``
    escape decodes to one). ``what`` names the string when it is not the field's value (``"a key"``)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        subject = f"{what} is not" if what else "not"
        raise InvalidArgument(
            f"{subject} valid Unicode (a lone surrogate U+{ord(text[e.start]):04X} at character "
            f"{e.start}; expected UTF-8 text)",
            field,
        ) from None


def _listed_files(index: Index) -> dict[str, Path]:
    """id -> image file of every row of an image index whose record holds a local file path (not a
    shard member ``url#key``)."""
    if index.kind != "image":
        return {}
    out = {}
    for row in range(len(index)):
        meta = index.metadata(row)
        path = meta.get("path")
        if isinstance(path, str) and "#" not in path:
            out[str(meta["id"])] = Path(path)
    return out


def hit_record(hit: Hit) -> dict[str, Any]:
    """A JSON-ready search hit (the stored record without local file paths)."""
    meta = {k: v for k, v in hit.metadata.items() if k != "path"}
    return {
        "id": hit.id,
        "score": hit.score,
        "row": hit.row,
        "caption": hit.metadata.get("caption") or "",
        "metadata": meta,
    }


def metadata_json(hit: Hit) -> str:
    return json.dumps({k: v for k, v in hit.metadata.items() if k != "path"}, ensure_ascii=False)
