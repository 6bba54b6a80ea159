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

from mmformer.model import model_fingerprint

from .embed import embed_images, embed_texts, evaluate_retrieval
from .index import Index, InvalidIndexError, build_index
from .metrics import format_metrics, retrieval_metrics, retrieval_ranks
from .retriever import Hit, Retriever

__all__ = [
    "Hit",
    "Index",
    "InvalidIndexError",
    "Retriever",
    "build_index",
    "embed_images",
    "embed_texts",
    "evaluate_retrieval",
    "format_metrics",
    "model_fingerprint",
    "retrieval_metrics",
    "retrieval_ranks",
]
