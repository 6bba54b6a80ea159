"""Contrastive losses.

:func:`clip_loss` is the symmetric InfoNCE of CLIP; :func:`siglip_loss` the pairwise sigmoid loss
of SigLIP. Under DDP/FSDP the embeddings of every rank are gathered *with gradient*, so each
rank's loss sees the negatives of the whole global batch and gradients flow back to the rank that
produced each embedding. :func:`contrastive_accumulation`
takes the loss and gradients of k micro-batches as if they were one batch. Distillation terms
(teacher -> student): :func:`affinity_distill_loss`, :func:`feature_distill_loss` (with a
:class:`FeatureProjection` when the widths differ) and :func:`interactive_contrastive_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (None = all of them); 1 when not running distributed."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank of ``group`` (None = all) along dim 0,
    differentiably; identity on one process. Under tensor or pipeline parallelism ``group`` is the
    data-parallel group: the ranks that hold different samples."""
    if world_size(group) == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    # backward: the rows' gradients summed over the ranks (reduce-scatter); unlike
    # torch.distributed.nn.functional.all_gather, correct for a subgroup on gloo too
    return all_gather_tensor_autograd(x.contiguous(), 0, group or dist.group.WORLD)


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
    gather: bool = True,
    group: Any = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the (global) batch.

    Args:
        image_embeds, text_embeds: (B, E) unit-length embeddings, row i of each is a pair.
        logit_scale: scalar temperature multiplier exp(s).
        positives: optional (B,) int group ids (e.g. concept ids). Pairs whose ids are equal
            are not treated as negatives of each other: their logits are masked out of the
            softmax, except the diagonal itself. None = only the diagonal is positive.
        gather: gather across ranks with gradient when running distributed.
        group: the ranks to gather from (None = all; the data-parallel group under tensor or
            pipeline parallelism, whose other ranks hold copies of the same samples).
    Returns:
        scalar loss = (CE(image->text) + CE(text->image)) / 2, averaged over the global batch.
    """
    if gather:
        image_embeds = gather_with_grad(image_embeds, group)
        text_embeds = gather_with_grad(text_embeds, group)
        positives = gather_groups(positives, group)
    logits = logit_scale * image_embeds @ text_embeds.t()  # (N, N), rows = images
    if positives is not None:
        same = positives[:, None] == positives[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.t().float(), labels)) / 2


def gather_groups(positives: torch.Tensor | None, group: Any = None) -> torch.Tensor | None:
    """Concatenate every rank's (B,) group ids (no gradient); identity on one process."""
    if positives is None or world_size(group) == 1:
        return positives
    parts = [torch.empty_like(positives) for _ in range(world_size(group))]
    dist.all_gather(parts, positives, group=group)
    return torch.cat(parts)


def siglip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    positives: torch.Tensor | None = None,
    gather: bool = True,
    group: Any = None,
) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP) over the (global) batch.

    Every image-text pair (i, j) is a binary problem: logit ``t * <x_i, y_j> + b``, label +1 for
    the pair itself (and, with ``positives``, for pairs of the same group, e.g. the same concept),
    -1 otherwise. The loss is ``-sum_ij log sigmoid(label_ij * logit_ij) / N``: a sum over the
    N x N pairs divided by the batch size N, as in the SigLIP paper.

    Args:
        image_embeds, text_embeds: (B, E) unit-length embeddings, row i of each is a pair.
        logit_scale: scalar t (already exponentiated).
        logit_bias: scalar b. With b near log(1/N) the initial loss is not dominated by the
            N^2 - N negatives (the paper's -10 suits batches of ~32k).
        positives: optional (B,) int group ids; pairs with equal ids count as positives.
        gather: gather across ranks with gradient when running distributed (every rank then
            computes the loss of the whole global batch, as :func:`clip_loss` does).
        group: the ranks to gather from (None = all), as in :func:`clip_loss`.
    Returns:
        scalar loss (float32).
    """
    if gather:
        image_embeds = gather_with_grad(image_embeds, group)
        text_embeds = gather_with_grad(text_embeds, group)
        positives = gather_groups(positives, group)
    logits = (logit_scale * image_embeds @ text_embeds.t() + logit_bias).float()  # (N, N), rows = images
    n = logits.shape[0]
    if positives is None:
        same = torch.eye(n, dtype=torch.bool, device=logits.device)
    else:
        same = positives[:, None] == positives[None, :]
    labels = same.float() * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / n


LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], "torch.Tensor | None"], torch.Tensor]


def clip_loss_fn(
    img: torch.Tensor, txt: torch.Tensor, params: dict[str, torch.Tensor], positives: torch.Tensor | None
) -> torch.Tensor:
    """:func:`clip_loss` with the temperature from ``params["logit_scale"]``."""
    return clip_loss(img, txt, params["logit_scale"], positives)


def siglip_loss_fn(
    img: torch.Tensor, txt: torch.Tensor, params: dict[str, torch.Tensor], positives: torch.Tensor | None
) -> torch.Tensor:
    """:func:`siglip_loss` with ``params["logit_scale"]`` and ``params["logit_bias"]``."""
    return siglip_loss(img, txt, params["logit_scale"], params["logit_bias"], positives)


def contrastive_accumulation(
    encode,
    micro_batches: list[dict[str, Any]],
    backward,
    positives: torch.Tensor | None = None,
    is_finite=None,
    loss_fn: LossFn = clip_loss_fn,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of a contrastive loss over k micro-batches as if they were one batch of k*B.

    Args:
        encode: batch -> {"image_embeds": (B, E), "text_embeds": (B, E), "logit_scale": (), ...}:
            every entry besides the embeddings is a scalar parameter of the loss (e.g.
            "logit_bias" for SigLIP) handed to ``loss_fn``.
        micro_batches: the k batches (sizes may differ).
        backward: ``backward(loss, last)`` accumulates gradients (``last`` for the k-th call).
        positives: (sum B,) concept ids of all micro-batches in order, or None.
        is_finite: ``is_finite(loss) -> bool`` on the full loss before any backward; False = no
            backward at all (returns ``(None, logit_scale)``).
        loss_fn: ``loss_fn(image_embeds, text_embeds, params, positives)``; :func:`clip_loss_fn`
            (default) or :func:`siglip_loss_fn`.
    Returns:
        (the loss over all k*B pairs, detached; the logit scale).

    1) embeddings of every micro-batch without gradient (cache); 2) for each micro-batch j,
    re-run it with gradient, put its rows into the cache and backward the full loss: only
    micro-batch j's rows carry gradient, so the k backwards sum to the full gradient. The loss's
    scalar parameters (logit scale, bias) enter with gradient in the first re-run only (else their
    gradient would count k times). Under DDP/FSDP the losses gather the k*B rows of every rank.
    """
    with torch.no_grad():
        cached = [encode(b) for b in micro_batches]
    img = torch.cat([c["image_embeds"] for c in cached])  # (k*B, E)
    txt = torch.cat([c["text_embeds"] for c in cached])
    scale = cached[0]["logit_scale"]
    with torch.no_grad():
        full = loss_fn(img, txt, _loss_params(cached[0], detach=False), positives)
    if is_finite is not None and not is_finite(full):
        return None, scale
    ends = torch.tensor([c["image_embeds"].shape[0] for c in cached]).cumsum(0).tolist()
    for j, b in enumerate(micro_batches):
        lo, hi = (ends[j - 1] if j else 0), ends[j]
        out = encode(b)
        img_j = torch.cat([img[:lo], out["image_embeds"], img[hi:]])
        txt_j = torch.cat([txt[:lo], out["text_embeds"], txt[hi:]])
        params = _loss_params(out, detach=j > 0)
        backward(loss_fn(img_j, txt_j, params, positives), j == len(micro_batches) - 1)
    return full.detach(), scale.detach()


def _loss_params(out: dict[str, torch.Tensor], detach: bool) -> dict[str, torch.Tensor]:
    """The loss's scalar parameters among an ``encode`` output (everything but the embeddings)."""
    return {k: (v.detach() if detach else v) for k, v in out.items() if k not in ("image_embeds", "text_embeds")}


# ---- distillation terms (teacher -> student) ------------------------------------------------------
# Every term takes the student's and the teacher's (B, E) embeddings of the same batch; the teacher's
# are treated as constants (computed without gradient, detached here). Like clip_loss, the
# similarity-based terms gather the rows of every rank, so every rank computes the loss of the
# global batch.


def _soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """-sum_j softmax(teacher)_ij log softmax(student)_ij, averaged over rows i (float32)."""
    p = teacher_logits.float().softmax(dim=1)
    return -(p * student_logits.float().log_softmax(dim=1)).sum(dim=1).mean()


def affinity_distill_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_image_embeds: torch.Tensor,
    teacher_text_embeds: torch.Tensor,
    teacher_logit_scale: torch.Tensor,
    gather: bool = True,
) -> torch.Tensor:
    """Affinity distillation: the student's image-text similarity distributions follow the teacher's.

    With S = s * X Y^T (student, N x N, rows = images) and T = t * X' Y'^T (teacher), the loss is
    ``(H(softmax T, softmax S) + H(softmax T^T, softmax S^T)) / 2``, H the soft cross-entropy
    ``-sum_j p_ij log q_ij`` averaged over rows: image->text and text->image distributions, as
    open_clip's ``DistillClipLoss`` and TinyCLIP's affinity mimicking. The student and teacher
    embedding widths may differ (only the N x N similarities are compared).

    Args:
        image_embeds, text_embeds: the student's (B, E) unit embeddings (row i of each a pair).
        logit_scale, teacher_logit_scale: the scalar temperature multipliers exp(s) of each model.
        teacher_image_embeds, teacher_text_embeds: the teacher's (B, E') unit embeddings.
        gather: gather every rank's rows (student's with gradient) when running distributed.
    Returns:
        scalar loss (float32). Its minimum over the student is the teacher's entropy, not 0.
    """
    t_img, t_txt = teacher_image_embeds.detach(), teacher_text_embeds.detach()
    if gather:
        image_embeds, text_embeds = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
        t_img, t_txt = gather_with_grad(t_img), gather_with_grad(t_txt)
    student = logit_scale * image_embeds @ text_embeds.t()  # (N, N)
    teacher = teacher_logit_scale.detach() * t_img @ t_txt.t()
    return (_soft_cross_entropy(teacher, student) + _soft_cross_entropy(teacher.t(), student.t())) / 2


class FeatureProjection(nn.Module):
    """A learned linear map from the student's embedding width to the teacher's, (B, Es) -> (B, Et),
    for :func:`feature_distill_loss` (and :func:`interactive_contrastive_loss`) when the widths
    differ. Trained with the student; not part of the deployed model.

    Initialised to a (semi-)orthogonal matrix: norms and angles of the student's embeddings are
    kept at the start (exactly so when ``Es <= Et``).
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False)
        nn.init.orthogonal_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def feature_distill_loss(
    student_embeds: torch.Tensor, teacher_embeds: torch.Tensor, projection: nn.Module | None = None
) -> torch.Tensor:
    """Feature distillation: MSE between the student's and the teacher's normalised embeddings.

    ``mean_i || norm(P x_i) - norm(y_i) ||^2`` (= ``2 - 2 mean_i cos(P x_i, y_i)``), where P is
    ``projection`` (a :class:`FeatureProjection` when the widths differ, else None = identity)
    and ``norm`` scales to unit length. A per-row term: every rank averages its own rows (the
    mean over ranks of DDP's gradient averaging makes it the global mean), no gather needed.

    Args:
        student_embeds: (B, Es) student embeddings of one modality (normalised or not).
        teacher_embeds: (B, Et) the teacher's embeddings of the same inputs.
    Returns:
        scalar loss (float32), in [0, 4].
    """
    x = projection(student_embeds) if projection is not None else student_embeds
    if x.shape != teacher_embeds.shape:
        raise ValueError(
            f"student embeddings {tuple(x.shape)} (after the projection) do not match the "
            f"teacher's {tuple(teacher_embeds.shape)}; pass a FeatureProjection(student_dim, teacher_dim)"
        )
    x = F.normalize(x.float(), dim=-1)
    y = F.normalize(teacher_embeds.detach().float(), dim=-1)
    return (x - y).pow(2).sum(dim=-1).mean()


def interactive_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    teacher_image_embeds: torch.Tensor,
    teacher_text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """CLIP-KD's interactive contrastive term: the student's embeddings of one modality against the
    teacher's embeddings of the other, InfoNCE.

    ``(CE(s * X_student Y_teacher^T) + CE(s * Y_student X_teacher^T)) / 2`` with the diagonal as
    the positives: each student image must pick its own caption among the teacher's text
    embeddings of the (global) batch, and each student text its image among the teacher's image
    embeddings. The student's embeddings must have the teacher's width (project them with a
    :class:`FeatureProjection` and re-normalise first when they do not).

    Args:
        image_embeds, text_embeds: the student's (B, E) unit embeddings.
        teacher_image_embeds, teacher_text_embeds: the teacher's (B, E) unit embeddings.
        logit_scale: the student's scalar exp(s).
        positives: optional (B,) group ids: pairs of the same group are not negatives of each
            other (as in :func:`clip_loss`).
        gather: gather every rank's rows (student's with gradient) when running distributed.
    Returns:
        scalar loss (float32).
    """
    if image_embeds.shape[-1] != teacher_text_embeds.shape[-1]:
        raise ValueError(
            f"student width {image_embeds.shape[-1]} != teacher width {teacher_text_embeds.shape[-1]}: "
            "project the student's embeddings (FeatureProjection) before the interactive term"
        )
    t_img, t_txt = teacher_image_embeds.detach(), teacher_text_embeds.detach()
    if gather:
        image_embeds, text_embeds = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
        t_img, t_txt = gather_with_grad(t_img), gather_with_grad(t_txt)
        positives = gather_groups(positives)
    logits_i = logit_scale * image_embeds @ t_txt.t()  # (N, N): student images vs teacher texts
    logits_t = logit_scale * text_embeds @ t_img.t()  # (N, N): student texts vs teacher images
    if positives is not None:
        same = positives[:, None] == positives[None, :]
        same.fill_diagonal_(False)
        logits_i, logits_t = logits_i.masked_fill(same, float("-inf")), logits_t.masked_fill(same, float("-inf"))
    labels = torch.arange(logits_i.shape[0], device=logits_i.device)
    return (F.cross_entropy(logits_i.float(), labels) + F.cross_entropy(logits_t.float(), labels)) / 2
