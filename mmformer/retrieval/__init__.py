"""Image-text retrieval: embed with a model, index on disk, search, Recall@K.

- :func:`embed_images`, :func:`embed_texts`: (N, E) float32 embeddings from a model's
  ``encode_image`` / ``encode_text`` under ``torch.inference_mode()``.
- :func:`build_index`, :class:`Index`: an on-disk index (embeddings, metadata, FAISS structure,
  checked manifest) built in this process, resumable (across devices or nodes:
  :func:`mmformer.training.index_build.build_index`); opened with checks; searched exactly
  (torch top-k, :class:`~mmformer.retrieval.backends.ExactBackend`) or with FAISS.
- :class:`Retriever`: a model and an index; ``search_text`` / ``search_image`` -> :class:`Hit` lists.
- :func:`retrieval_metrics`, :func:`retrieval_ranks`: Recall@K (percent) and ranks, text->image
  and image->text (COCO convention: any of an image's captions is a hit), computed in blocks.
- :func:`evaluate_retrieval`: embed + metrics in one call.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and the API reference; at run time, __getattr__ below
    from mmformer.model import model_fingerprint

    from .embed import embed_images, embed_texts, evaluate_retrieval
    from .index import Index, InvalidIndexError, ShardedIndex, build_from_embeddings, build_index, write_shard_list
    from .metrics import format_metrics, retrieval_metrics, retrieval_ranks
    from .retriever import Hit, Retriever

#: Where each public name lives; imported on first use, so that importing a submodule (the verbs'
#: flags in :mod:`.options`) loads no torch.
_HOMES = {
    "model_fingerprint": "mmformer.model",
    "embed_images": ".embed",
    "embed_texts": ".embed",
    "evaluate_retrieval": ".embed",
    "Index": ".index",
    "InvalidIndexError": ".index",
    "build_index": ".index",
    "ShardedIndex": ".index",
    "build_from_embeddings": ".index",
    "write_shard_list": ".index",
    "format_metrics": ".metrics",
    "retrieval_metrics": ".metrics",
    "retrieval_ranks": ".metrics",
    "Hit": ".retriever",
    "Retriever": ".retriever",
}

__all__ = [
    "Hit",
    "Index",
    "InvalidIndexError",
    "Retriever",
    "ShardedIndex",
    "build_from_embeddings",
    "build_index",
    "embed_images",
    "embed_texts",
    "evaluate_retrieval",
    "format_metrics",
    "model_fingerprint",
    "retrieval_metrics",
    "retrieval_ranks",
    "write_shard_list",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'mmformer.retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
