"""Contrastive losses.

:func:`clip_loss` is the symmetric InfoNCE of CLIP. Under DDP/FSDP the embeddings of every rank
are gathered *with gradient*, so each rank's loss sees the negatives of the whole global batch
and gradients flow back to the rank that produced each embedding. :func:`contrastive_accumulation`
takes the loss and gradients of k micro-batches as if they were one batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0, differentiably; identity on one process."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
              positives: torch.Tensor | None = None, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE over the (global) batch.

    Args:
        image_embeds, text_embeds: (B, E) unit-length embeddings, row i of each is a pair.
        logit_scale: scalar temperature multiplier exp(s).
        positives: optional (B,) int group ids (e.g. concept ids). Pairs whose ids are equal
            are not treated as negatives of each other: their logits are masked out of the
            softmax, except the diagonal itself. None = only the diagonal is positive.
        gather: gather across ranks with gradient when running distributed.
    Returns:
        scalar loss = (CE(image->text) + CE(text->image)) / 2, averaged over the global batch.
    """
    if gather:
        image_embeds = gather_with_grad(image_embeds)
        text_embeds = gather_with_grad(text_embeds)
        if positives is not None and world_size() > 1:
            parts = [torch.empty_like(positives) for _ in range(world_size())]
            dist.all_gather(parts, positives)
            positives = torch.cat(parts)
    logits = logit_scale * image_embeds @ text_embeds.t()  # (N, N), rows = images
    if positives is not None:
        same = positives[:, None] == positives[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.t().float(), labels)) / 2


def contrastive_accumulation(encode, micro_batches: list[dict[str, Any]], backward,
                             positives: torch.Tensor | None = None, is_finite=None
                             ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of the CLIP loss over k micro-batches as if they were one batch of k*B.

    Args:
        encode: batch -> {"image_embeds": (B, E), "text_embeds": (B, E), "logit_scale": ()}.
        micro_batches: the k batches (sizes may differ).
        backward: ``backward(loss, last)`` accumulates gradients (``last`` for the k-th call).
        positives: (sum B,) concept ids of all micro-batches in order, or None.
        is_finite: ``is_finite(loss) -> bool`` on the full loss before any backward; False = no
            backward at all (returns ``(None, logit_scale)``).
    Returns:
        (the loss over all k*B pairs, detached; the logit scale).

    1) embeddings of every micro-batch without gradient (cache); 2) for each micro-batch j,
    re-run it with gradient, put its rows into the cache and backward the full loss: only
    micro-batch j's rows carry gradient, so the k backwards sum to the full gradient. The logit
    scale enters with gradient in the first re-run only (else its gradient would count k times).
    Under DDP/FSDP :func:`~mmformer.losses.clip_loss` gathers the k*B rows of every rank.
    """
    with torch.no_grad():
        cached = [encode(b) for b in micro_batches]
    img = torch.cat([c["image_embeds"] for c in cached])  # (k*B, E)
    txt = torch.cat([c["text_embeds"] for c in cached])
    scale = cached[0]["logit_scale"]
    with torch.no_grad():
        full = clip_loss(img, txt, scale, positives)
    if is_finite is not None and not is_finite(full):
        return None, scale
    ends = torch.tensor([c["image_embeds"].shape[0] for c in cached]).cumsum(0).tolist()
    for j, b in enumerate(micro_batches):
        lo, hi = (ends[j - 1] if j else 0), ends[j]
        out = encode(b)
        img_j = torch.cat([img[:lo], out["image_embeds"], img[hi:]])
        txt_j = torch.cat([txt[:lo], out["text_embeds"], txt[hi:]])
        s = out["logit_scale"] if j == 0 else out["logit_scale"].detach()
        backward(clip_loss(img_j, txt_j, s, positives), j == len(micro_batches) - 1)
    return full.detach(), scale.detach()
