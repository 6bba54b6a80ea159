"""``Retriever``: a model and an index together; search by text or by image.

>>> r = Retriever.from_pretrained("runs/demo/model", "runs/emoji-index")
>>> hits = r.search_text(["red apple"], k=5)[0]
>>> [(h.id, round(h.score, 3)) for h in hits]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmformer.compress import quantize_int8
from mmformer.data.transforms import build_transforms, load_and_transform, to_rgb
from mmformer.model import MMFormer, model_fingerprint
from mmformer.retrieval.embed import pieces_dropped
from mmformer.retrieval.index import Index, InvalidIndexError


@dataclass
class Hit:
    """One search result: the row's id, its score (cosine similarity), row number and stored record."""

    id: str
    score: float
    row: int
    metadata: dict[str, Any] = field(default_factory=dict)


class Retriever:
    """Embeds queries with ``model`` and searches ``index``.

    The index must have been built with this model (same fingerprint) or its int8 copy;
    otherwise the embeddings live in different spaces and :class:`InvalidIndexError` is raised.
    """

    def __init__(self, model, index: Index, batch_size: int = 256) -> None:
        fp = model_fingerprint(model)
        if fp != index.fingerprint:
            built = index.manifest["model"].get("path") or "another model"
            raise InvalidIndexError(
                f"{index.directory} was built with model {index.fingerprint} ({built}), but the given model "
                f"is {fp}: embeddings of different models cannot be compared; search with the model the "
                "index was built with, or rebuild the index"
            )
        self.model, self.index, self.batch_size = model.eval(), index, batch_size

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike | None,
        index_dir: str | os.PathLike,
        *,
        int8: bool = False,
        device: str = "cpu",
        backend: str | None = None,
        search_params: dict[str, Any] | None = None,
        verify: bool | str = "auto",
    ) -> Retriever:
        """Load a ``save_pretrained`` model and open an index.

        ``model_dir=None`` takes the model path recorded in the index manifest. ``int8``
        quantizes the model's Linear layers for CPU inference.
        """
        index = Index.open(index_dir, verify=verify, backend=backend, search_params=search_params)
        if model_dir is None:
            model_dir = index.manifest["model"].get("path")
            if not model_dir:
                raise ValueError(f"{index_dir} records no model path; pass the model directory")
        model = MMFormer.from_pretrained(model_dir, map_location=device)
        if int8:
            model = quantize_int8(model)
        return cls(model, index)

    # ---- queries ------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(Q, E) unit embeddings of ``texts``."""
        if isinstance(texts, str):
            raise TypeError("search_text takes a list of strings; wrap a single query in a list")
        if not texts or any(not str(t).strip() for t in texts):
            raise ValueError("queries must be a non-empty list of non-empty strings")
        out = [
            self.model.encode_texts(list(texts[s : s + self.batch_size])).float()
            for s in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(out)

    def pieces_dropped(self, texts: Sequence[str]) -> list[int]:
        """Per text query, how many of its pieces the model's context cuts off (0 when it fits),
        as the service reports ``pieces_dropped``."""
        if self.model.tokenizer is None:
            raise RuntimeError("this model has no tokenizer attached")
        return pieces_dropped(self.model.tokenizer, texts, self.model.config.context_length)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image | str | os.PathLike]) -> torch.Tensor:
        """(Q, E) unit embeddings of PIL images or image paths (eval transforms of the model)."""
        c = self.model.config
        tf = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        device = next(self.model.parameters()).device if not getattr(self.model, "is_int8", False) else "cpu"
        out = []
        for s in range(0, len(images), self.batch_size):
            batch = [
                load_and_transform(im, tf) if isinstance(im, (str, os.PathLike)) else tf(to_rgb(im))
                for im in images[s : s + self.batch_size]
            ]
            out.append(self.model.encode_image(torch.stack(batch).to(device)).float())
        return torch.cat(out)

    def search_text(self, texts: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Top-k rows for each text query (text->image on an image index, text->text on a text index)."""
        return self.search_embeddings(self.embed_texts(texts), k)

    def search_image(self, images: Sequence[Image.Image | str | os.PathLike], k: int = 10) -> list[list[Hit]]:
        """Top-k rows for each image query (image->image or image->text)."""
        return self.search_embeddings(self.embed_images(images), k)

    def search_embeddings(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> list[list[Hit]]:
        scores, rows = self.index.search(queries, k)
        return [
            [
                Hit(id=(m := self.index.metadata(int(r)))["id"], score=float(s), row=int(r), metadata=m)
                for s, r in zip(srow, rrow)
                if r >= 0
            ]
            for srow, rrow in zip(scores, rows)
        ]

    def __repr__(self) -> str:
        return f"Retriever(index={self.index!r}, int8={bool(getattr(self.model, 'is_int8', False))})"


def evaluate_index(
    retriever: Retriever, ks: Sequence[int] = (1, 5, 10), compare_exact: bool = True
) -> dict[str, dict[str, float]]:
    """Text->image Recall@K of an image index whose rows carry captions, searched through the index.

    Queries are the distinct captions stored in the index metadata; a hit is any row with the
    query's caption among the top K (several images may share one caption). Returns
    ``{backend: {"R@K": percent, ...}}`` for the index's backend and, when ``compare_exact``
    and the backend is approximate, for exact search too, with ``"overlap@K"``: the percentage
    of the exact top-K rows that the approximate search also returns.
    """
    index = retriever.index
    if index.kind != "image":
        raise ValueError(f"{index.directory}: evaluation needs an image index (this one holds {index.kind}s)")
    rows_of: dict[str, list[int]] = {}
    for row in range(len(index)):
        caption = index.metadata(row).get("caption")
        if caption:
            rows_of.setdefault(caption, []).append(row)
    if not rows_of:
        raise ValueError(
            f"{index.directory}: no captions in the metadata; build the index from a manifest "
            "with a caption column to evaluate it"
        )
    captions = list(rows_of)
    queries = retriever.embed_texts(captions).numpy()
    kmax = max(ks)
    results = {index.manifest["backend"]: index.search(queries, kmax)[1]}
    if compare_exact and index.manifest["backend"] not in ("exact", "flat"):
        results["exact"] = index.search_exact(queries, kmax)[1]
    out: dict[str, dict[str, float]] = {}
    for name, top in results.items():
        hit_rank = np.full(len(captions), np.inf)
        for i, cap in enumerate(captions):
            found = np.flatnonzero(np.isin(top[i], rows_of[cap]))
            if found.size:
                hit_rank[i] = found[0]
        out[name] = {f"R@{k}": float(100 * np.mean(hit_rank < k)) for k in ks}
        out[name]["n_queries"] = len(captions)
    if "exact" in results and len(results) == 2:
        approx = results[index.manifest["backend"]]
        overlap = [len(np.intersect1d(a, e)) / kmax for a, e in zip(approx, results["exact"])]
        out[index.manifest["backend"]][f"overlap@{kmax}"] = float(100 * np.mean(overlap))
    return out
