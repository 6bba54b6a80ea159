"""Recall@K and rank statistics for image-text retrieval.

Conventions (COCO / CLIP style):

- Similarity is the dot product of the embeddings; they are expected to be L2-normalised, so
  it is the cosine similarity. All scores are computed in float32, whatever the input dtype.
- Text -> image (``t2i``): every caption is a query; its single correct image is
  ``text_to_image[caption]``; the rank is that image's position among all images.
- Image -> text (``i2t``): every image is a query; its rank is the BEST rank among all of its
  captions (a hit on any one of them counts).
- Ranks are 1-based. Ties are resolved optimistically: an item is ranked after exactly the items
  with a STRICTLY greater score, so ``rank = 1 + #{items scoring > the correct item}``. A caption
  that ties with its own image's best score does not push it down. For i2t this means
  ``rank = 1 + #{captions scoring > max score over the image's own captions}``.
- Recall@K is a percentage (0-100) of queries with ``rank <= K``.

The similarity matrix is never materialised in full: queries are processed in blocks of
``block_size`` rows, each against the whole gallery, so peak extra memory is about
``block_size * N_gallery * 5`` bytes (float32 scores plus a boolean comparison).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["retrieval_metrics", "retrieval_ranks"]

_MAX_LISTED = 20  # how many offending indices an error message lists


def _as_index_tensor(text_to_image: Tensor | Sequence[int], n_texts: int, n_images: int) -> Tensor:
    t2i = torch.as_tensor(text_to_image)
    if t2i.dtype.is_floating_point or t2i.dtype == torch.bool or t2i.is_complex():
        raise TypeError(f"text_to_image must hold integer image indices, got dtype {t2i.dtype}")
    if t2i.dim() != 1 or t2i.shape[0] != n_texts:
        raise ValueError(
            f"text_to_image must have shape ({n_texts},) (one image index per caption), got {tuple(t2i.shape)}"
        )
    t2i = t2i.long()
    bad = ((t2i < 0) | (t2i >= n_images)).nonzero().flatten()
    if bad.numel():
        shown = bad[:_MAX_LISTED].tolist()
        values = t2i[bad[:_MAX_LISTED]].tolist()
        raise ValueError(
            f"text_to_image must be in [0, {n_images}) (there are {n_images} images); "
            f"{bad.numel()} caption(s) out of range, e.g. caption indices {shown} -> {values}"
        )
    return t2i


def _check_inputs(image_emb: Tensor, text_emb: Tensor, text_to_image) -> Tensor:
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(emb, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
        if emb.dim() != 2:
            raise ValueError(f"{name} must have shape (N, D), got {tuple(emb.shape)}")
        if not emb.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got dtype {emb.dtype}")
        if emb.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(emb.shape)})")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"embedding dims differ: image_emb has D={image_emb.shape[1]}, text_emb has D={text_emb.shape[1]}"
        )
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        finite = torch.isfinite(emb).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().flatten()
            raise ValueError(
                f"{name} has non-finite values (NaN/inf) in {rows.numel()} row(s), "
                f"e.g. rows {rows[:_MAX_LISTED].tolist()}"
            )
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    t2i = _as_index_tensor(text_to_image, n_texts, n_images).to(image_emb.device)
    counts = torch.bincount(t2i, minlength=n_images)
    orphans = (counts == 0).nonzero().flatten()
    if orphans.numel():
        raise ValueError(
            f"every image needs at least one caption for image->text retrieval; "
            f"{orphans.numel()} of {n_images} image(s) have none, image indices "
            f"{orphans[:_MAX_LISTED].tolist()}"
            + (" ..." if orphans.numel() > _MAX_LISTED else "")
            + " (drop those images from image_emb and renumber text_to_image)"
        )
    return t2i


@torch.no_grad()
def retrieval_ranks(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor | Sequence[int],
    *,
    block_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """1-based ranks of the correct items, in both directions.

    Args:
        image_emb: (N_img, D) L2-normalised image embeddings (any float dtype).
        text_emb: (N_txt, D) L2-normalised caption embeddings.
        text_to_image: (N_txt,) integer index of each caption's image in ``image_emb``.
        block_size: number of queries scored at a time against the whole gallery.

    Returns:
        ``(t2i_ranks (N_txt,), i2t_ranks (N_img,))`` as int64 tensors on ``image_emb.device``.
        ``t2i_ranks[c]`` is the rank of caption c's image among all images; ``i2t_ranks[i]`` is the
        best rank among all captions of image i. Ties count optimistically (see module docstring).

    Raises:
        ValueError: shapes/dims differ, non-finite values, an index out of range, or an image
            without any caption (the message lists those image indices).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    device = image_emb.device if isinstance(image_emb, Tensor) else None
    if isinstance(text_emb, Tensor) and device is not None:
        text_emb = text_emb.to(device)
    t2i = _check_inputs(image_emb, text_emb, text_to_image)
    images = image_emb.float()  # (N_img, D) float32 accumulation whatever the input dtype
    texts = text_emb.float()  # (N_txt, D)
    n_images, n_texts = images.shape[0], texts.shape[0]

    # Text -> image: each caption against all images.
    t2i_ranks = torch.empty(n_texts, dtype=torch.long, device=images.device)
    for start in range(0, n_texts, block_size):
        stop = min(start + block_size, n_texts)
        scores = texts[start:stop] @ images.T  # (B, N_img)
        rows = torch.arange(stop - start, device=images.device)
        correct = scores[rows, t2i[start:stop]]  # (B,) taken from the same matrix: no rounding gap
        t2i_ranks[start:stop] = (scores > correct[:, None]).sum(dim=1) + 1

    # Image -> text: each image against all captions; the best of its captions decides.
    order = torch.argsort(t2i, stable=True)  # caption indices grouped by image
    sorted_images = t2i[order]
    i2t_ranks = torch.empty(n_images, dtype=torch.long, device=images.device)
    for start in range(0, n_images, block_size):
        stop = min(start + block_size, n_images)
        scores = images[start:stop] @ texts.T  # (B, N_txt)
        lo = int(torch.searchsorted(sorted_images, start))
        hi = int(torch.searchsorted(sorted_images, stop))
        captions = order[lo:hi]  # captions of images [start, stop)
        local = sorted_images[lo:hi] - start  # their image, relative to the block
        best = torch.full((stop - start,), float("-inf"), device=images.device)
        best = best.scatter_reduce(0, local, scores[local, captions], reduce="amax")  # (B,)
        i2t_ranks[start:stop] = (scores > best[:, None]).sum(dim=1) + 1
    return t2i_ranks, i2t_ranks


def _median(ranks: Tensor) -> float:
    # The usual median (mean of the two middle values for an even count), as numpy defines it.
    return float(np.median(ranks.cpu().numpy()))


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_size: int = 1024,
) -> dict[str, float]:
    """Recall@K (percent), mean and median rank, in both directions.

    Args:
        image_emb: (N_img, D) L2-normalised image embeddings (float32/fp16/bf16; scored in float32).
        text_emb: (N_txt, D) L2-normalised caption embeddings.
        text_to_image: (N_txt,) index of each caption's image. Every image must have at least one
            caption (COCO: about 5 per image); otherwise ValueError naming the image indices.
        ks: the K of Recall@K, positive ints.
        block_size: queries scored at a time (memory ~ ``block_size * N_gallery * 5`` bytes).

    Returns:
        ``{"t2i_R@K", "i2t_R@K" (for each K, percent 0-100), "t2i_mean_rank", "t2i_median_rank",
        "i2t_mean_rank", "i2t_median_rank" (1-based; median averages the two middle values for an
        even count), "t2i_chance_R@1" (= 100 / N_img), "i2t_chance_R@1"
        (= 100 * mean captions per image / N_txt, the expected R@1 of a random ranking, which
        equals 100 / N_img because every image has a caption), "n_images", "n_texts" (ints)}``.
        Ties are ranked optimistically (after only the strictly greater scores).
    """
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    t2i_ranks, i2t_ranks = retrieval_ranks(image_emb, text_emb, text_to_image, block_size=block_size)
    n_images, n_texts = int(i2t_ranks.shape[0]), int(t2i_ranks.shape[0])
    out: dict[str, float] = {}
    for direction, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        for k in ks:
            out[f"{direction}_R@{k}"] = 100.0 * float((ranks <= k).double().mean())
    for direction, ranks in (("t2i", t2i_ranks), ("i2t", i2t_ranks)):
        out[f"{direction}_mean_rank"] = float(ranks.double().mean())
        out[f"{direction}_median_rank"] = _median(ranks)
    out["t2i_chance_R@1"] = 100.0 / n_images
    captions_per_image = n_texts / n_images  # mean over images (each has >= 1)
    out["i2t_chance_R@1"] = 100.0 * captions_per_image / n_texts
    out["n_images"] = n_images
    out["n_texts"] = n_texts
    return out


def pair_retrieval_metrics(image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor) -> dict[str, float]:
    """Metrics for rows of (image, caption) pairs where the same image may appear on several rows.

    image: (R, E), text: (R, E), image_ids: (R,) identity of each row's image. Images are
    de-duplicated by id (first row wins) so several captions of one image count as in COCO.
    """
    first, inverse = first_of_each(image_ids)
    return retrieval_metrics(image[first], text, inverse)


def first_of_each(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of the first occurrence of each distinct id, (R,) index of each row's id among them)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((len(uniq),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
    return first, inverse


def concept_retrieval_metrics(image: torch.Tensor, text: torch.Tensor, concepts: torch.Tensor) -> dict[str, float]:
    """Metrics where every image of a concept is a correct answer for the concept's caption.

    image, text: (R, E) per row; concepts: (R,) concept id per row, rows of one concept sharing
    one caption. Queries are the distinct concept captions (text->image: a hit on any image of
    the concept) and every image (image->text: its concept's caption among all captions).
    """
    first, inverse = first_of_each(concepts)
    # retrieval_metrics(gallery A, queries B, B->A): roles swapped so that each caption may own
    # several images.
    m = retrieval_metrics(text[first], image, inverse)
    swap = {"t2i": "i2t", "i2t": "t2i"}
    out = {}
    for k, v in m.items():
        head, _, tail = k.partition("_")
        out[f"{swap[head]}_{tail}" if head in swap else k] = v
    out["n_images"], out["n_texts"] = m["n_texts"], m["n_images"]
    return out


def format_metrics(m: dict, source: str) -> str:
    lines = [
        f"retrieval on {source}",
        f"{'direction':<14}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean rank':>11}{'median':>8}{'chance R@1':>12}",
    ]
    for d, name in (("t2i", "text->image"), ("i2t", "image->text")):
        lines.append(
            f"{name:<14}{m[f'{d}_R@1']:>8.2f}{m[f'{d}_R@5']:>8.2f}{m[f'{d}_R@10']:>8.2f}"
            f"{m[f'{d}_mean_rank']:>11.1f}{m[f'{d}_median_rank']:>8.1f}{m[f'{d}_chance_R@1']:>12.3f}"
        )
    return "\n".join(lines)
