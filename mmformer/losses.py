"""Contrastive losses.

:func:`clip_loss` is the symmetric InfoNCE of CLIP. Under DDP/FSDP the embeddings of every rank
are gathered *with gradient*, so each rank's loss sees the negatives of the whole global batch
and gradients flow back to the rank that produced each embedding.
"""

from __future__ import annotations

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
