"""Image-text retrieval: embed with a model, exact search, Recall@K.

- :func:`embed_images`, :func:`embed_texts`: (N, E) float32 embeddings from a model's
  ``encode_image`` / ``encode_text`` under ``torch.inference_mode()``.
- :class:`ExactIndex`: brute-force inner-product top-k in torch, saved as ``.npy``.
- :func:`retrieval_metrics`, :func:`retrieval_ranks`: Recall@K (percent) and ranks, text->image
  and image->text (COCO convention: any of an image's captions is a hit), computed in blocks.
- :func:`evaluate_retrieval`: embed + metrics in one call.
"""

from .embed import embed_images, embed_texts, evaluate_retrieval
from .exact import ExactIndex
from .metrics import retrieval_metrics, retrieval_ranks

__all__ = [
    "ExactIndex",
    "embed_images",
    "embed_texts",
    "evaluate_retrieval",
    "retrieval_metrics",
    "retrieval_ranks",
]
