"""Weight inheritance: start a smaller student from a trained teacher's weights (as TinyCLIP does).

:func:`inherit_weights` copies a teacher :class:`~mmformer.model.MMFormer` into a student of the
same kind that is shallower, narrower, or both:

- **depth**: student block ``i`` of ``L_s`` takes teacher block ``round(i * L_t / L_s)`` (rounded
  half up; :func:`teacher_blocks`): every other block for half the depth, the first block
  always;
- **heads**: a student with fewer heads of the same head width (``width / heads``) keeps, in
  every block, the teacher's most important heads: the largest L2 norm of the head's slices of
  the q, k and v rows of every ``qkv`` Linear and of the columns of every output ``proj`` (all
  modalities' copies in that block), in their original order;
- **width**: the narrower residual stream that fewer heads imply keeps the teacher's channels of
  largest norm over every weight that reads or writes the stream (patch and token embeddings,
  class token, LayerNorms, ``qkv`` columns, ``proj`` and ``fc2`` rows, ``fc1`` columns, the
  joint-space projections' columns);
- **FFN**: a smaller hidden layer keeps, per FFN, the neurons whose ``fc1`` row and ``fc2``
  column have the largest norm; a smaller joint space (``embed_dim``) the rows of the image and
  text projections with the largest norm together.

Where the student has the teacher's size, tensors are copied exactly. Fixed tables (sin-cos
positions) are not weights: a narrower student keeps its own. Everything else must agree (share
mode, image and patch size, vocabulary, normalisation, biases, no fusion module or document
expert); otherwise :class:`InheritanceError` says which field differs. Only plain Linear, Conv,
LayerNorm and embedding weights are sliced: a model with per-block head counts or other
structures has no rule here and is refused by name.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch

from mmformer.config import ModelConfig
from mmformer.model import MMFormer

log = logging.getLogger(__name__)

__all__ = ["InheritanceError", "InheritancePlan", "inherit_weights", "plan_inheritance", "teacher_blocks"]

#: Config fields on which student and teacher must agree for weights to carry over.
SAME_FIELDS = (
    "share",
    "image_size",
    "patch_size",
    "in_chans",
    "image_pos",
    "image_pre_norm",
    "qkv_bias",
    "vocab_size",
    "image_mean",
    "image_std",
    "document_expert",
    "fusion_latents",
)

# How each dimension of a state-dict tensor is indexed: "D" residual channels, "E" joint-space
# channels, "A" attention channels of the block's kept heads, "QKV" the same inside each of the
# q, k, v thirds of a fused qkv Linear, "F" hidden neurons of that FFN, None the whole dimension.
_TOP_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"cls_token", (None, None, "D")),
    (r"logit_scale", ()),
    (r"patch_embed\.proj\.weight", ("D", None, None, None)),
    (r"patch_embed\.proj\.bias", ("D",)),
    (r"norm_pre\.(weight|bias)", ("D",)),
    (r"pos_embed", (None, None, "D")),
    (r"token_embed\.weight", (None, "D")),
    (r"norm\.\w+\.(weight|bias)", ("D",)),
    (r"(image|text)_proj\.weight", ("E", "D")),
]
_BLOCK_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"norm[12]\.\w+\.(weight|bias)", ("D",)),
    (r"attn\.qkv(\.\w+)?\.weight", ("QKV", "D")),
    (r"attn\.qkv(\.\w+)?\.bias", ("QKV",)),
    (r"attn\.proj(\.\w+)?\.weight", ("D", "A")),
    (r"attn\.proj(\.\w+)?\.bias", ("D",)),
    (r"mlp(\.\w+)?\.fc1\.weight", ("F", "D")),
    (r"mlp(\.\w+)?\.fc1\.bias", ("F",)),
    (r"mlp(\.\w+)?\.fc2\.weight", ("D", "F")),
    (r"mlp(\.\w+)?\.fc2\.bias", ("D",)),
]
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


class InheritanceError(ValueError):
    """The student's shape does not allow inheriting the teacher's weights (the message says why)."""


@dataclass
class InheritancePlan:
    """Which teacher weights each student weight takes.

    Attributes:
        blocks: the teacher block of each student block.
        heads: the teacher heads kept in each student block (ascending).
        channels: the teacher's residual channels kept (ascending), D_s of D_t.
        embed_channels: the teacher's joint-space channels kept, E_s of E_t.
        hidden: per FFN (its state-dict prefix in the student, e.g. ``blocks.1.mlp.text``), the
            teacher's hidden neurons kept.
    """

    blocks: list[int]
    heads: list[list[int]]
    channels: list[int]
    embed_channels: list[int]
    hidden: dict[str, list[int]] = field(default_factory=dict)


def teacher_blocks(student_depth: int, teacher_depth: int) -> list[int]:
    """The teacher block of each student block: ``round(i * L_t / L_s)``, halves rounded up
    (6 -> 3: ``[0, 2, 4]``; 6 -> 6: every block; 4 -> 1: ``[0]``)."""
    if not 1 <= student_depth <= teacher_depth:
        raise InheritanceError(f"student depth {student_depth} must be between 1 and the teacher's {teacher_depth}")
    return [math.floor(i * teacher_depth / student_depth + 0.5) for i in range(student_depth)]


def _rule(key: str) -> tuple[int | None, str, tuple[str | None, ...]]:
    """(block index or None, the key inside its block, the axis kinds) of a state-dict key."""
    m = _BLOCK_KEY.fullmatch(key)
    block, rest, rules = (int(m.group(1)), m.group(2), _BLOCK_RULES) if m else (None, key, _TOP_RULES)
    for pattern, axes in rules:
        if re.fullmatch(pattern, rest):
            return block, rest, axes
    raise InheritanceError(
        f"no inheritance rule for the weight {key!r}: only plain embeddings, LayerNorms and "
        "Linear layers of MMFormer blocks are sliced (a model with other parts can't inherit)"
    )


def _check_configs(s: ModelConfig, t: ModelConfig) -> None:
    problems = [
        f"{name}: student {getattr(s, name)!r}, teacher {getattr(t, name)!r}"
        for name in SAME_FIELDS
        if getattr(s, name) != getattr(t, name)
    ]
    s_hd, t_hd = s.width // s.heads, t.width // t.heads
    if s_hd != t_hd:
        problems.append(
            f"head width (width / heads): student {s.width}/{s.heads} = {s_hd}, teacher "
            f"{t.width}/{t.heads} = {t_hd}; whole heads are kept, so give the student "
            f"width = heads * {t_hd}"
        )
    elif s.heads > t.heads:
        problems.append(f"heads: the student has {s.heads}, more than the teacher's {t.heads}")
    if s.mlp_hidden > t.mlp_hidden:
        problems.append(f"FFN hidden size: student {s.mlp_hidden} > teacher {t.mlp_hidden}")
    if s.embed_dim > t.embed_dim:
        problems.append(f"embed_dim: student {s.embed_dim} > teacher {t.embed_dim}")
    if s.depth > t.depth:
        problems.append(f"depth: student {s.depth} > teacher {t.depth}")
    if problems:
        raise InheritanceError(
            "the student can't inherit the teacher's weights: "
            + "; ".join(problems)
            + " (set inherit=false for a freshly initialised student)"
        )


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """The indices of the ``k`` largest ``scores`` in ascending order; all of them when k = len."""
    if k == scores.numel():
        return list(range(k))
    return sorted(torch.topk(scores, k).indices.tolist())


def _dims_of(axes: tuple[str | None, ...], kind: str) -> list[int]:
    return [d for d, a in enumerate(axes) if a == kind]


def _sum_sq_along(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares of ``t`` over every dimension but ``dim``: shape (t.shape[dim],)."""
    x = t.detach().double().pow(2)
    return x.movedim(dim, 0).reshape(x.shape[dim], -1).sum(dim=1)


def plan_inheritance(student_config: ModelConfig, teacher: MMFormer) -> InheritancePlan:
    """The :class:`InheritancePlan` of a student of ``student_config`` from ``teacher`` (weights
    ranked by magnitude as described in the module docstring); raises :class:`InheritanceError`
    when the shapes don't allow it."""
    s, t = student_config, teacher.config
    _check_configs(s, t)
    state = teacher.state_dict()
    hd = t.width // t.heads
    blocks = teacher_blocks(s.depth, t.depth)
    used = set(blocks)
    # residual channels: every weight of the kept blocks and outside the blocks, along its D axis
    d_score = torch.zeros(t.width, dtype=torch.float64)
    e_score = torch.zeros(t.embed_dim, dtype=torch.float64)
    for key, value in state.items():
        block, rest, axes = _rule(key)
        if block is not None and block not in used:
            continue
        for d in _dims_of(axes, "D"):
            d_score += _sum_sq_along(value, d)
        for d in _dims_of(axes, "E"):
            e_score += _sum_sq_along(value, d)
    heads = []
    for b in blocks:
        h_score = torch.zeros(t.heads, dtype=torch.float64)
        for key, value in state.items():
            block, rest, axes = _rule(key)
            if block != b:
                continue
            for d in _dims_of(axes, "QKV"):  # (3 * H * hd) rows: q, k, v thirds, each head's hd rows
                h_score += _sum_sq_along(value, d).view(3, t.heads, hd).sum(dim=(0, 2))
            for d in _dims_of(axes, "A"):
                h_score += _sum_sq_along(value, d).view(t.heads, hd).sum(dim=1)
        heads.append(_top(h_score, s.heads))
    hidden: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        scores: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            block, rest, axes = _rule(key)
            if block != b:
                continue
            for d in _dims_of(axes, "F"):
                prefix = f"blocks.{i}." + rest.rsplit(".", 2)[0]  # blocks.i.mlp[.modality]
                scores[prefix] = scores.get(prefix, 0) + _sum_sq_along(value, d)
        hidden.update({prefix: _top(score, s.mlp_hidden) for prefix, score in scores.items()})
    return InheritancePlan(
        blocks=blocks,
        heads=heads,
        channels=_top(d_score, s.width),
        embed_channels=_top(e_score, s.embed_dim),
        hidden=hidden,
    )


def _index(
    kind: str | None, plan: InheritancePlan, student_block: int | None, prefix: str, t: ModelConfig
) -> list[int] | None:
    """The teacher indices along one dimension of kind ``kind`` (None = the whole dimension)."""
    hd = t.width // t.heads
    if kind is None:
        return None
    if kind == "D":
        return plan.channels
    if kind == "E":
        return plan.embed_channels
    if kind == "F":
        return plan.hidden[prefix]
    heads = plan.heads[student_block]
    attn = [h * hd + j for h in heads for j in range(hd)]
    if kind == "A":
        return attn
    return [part * t.width + c for part in range(3) for c in attn]  # QKV


def inherit_weights(student: MMFormer, teacher: MMFormer) -> InheritancePlan:
    """Copy ``teacher``'s weights into ``student`` in place (see the module docstring) and return
    the plan that says which ones; raises :class:`InheritanceError` (nothing copied) when the
    shapes don't allow it."""
    plan = plan_inheritance(student.config, teacher)
    t_state = teacher.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, target in student.state_dict().items():
        block, rest, axes = _rule(key)
        source_key = key if block is None else f"blocks.{plan.blocks[block]}.{rest}"
        prefix = "" if block is None else f"blocks.{block}." + rest.rsplit(".", 2)[0]
        value = t_state[source_key]
        for dim, kind in enumerate(axes):
            idx = _index(kind, plan, block, prefix, teacher.config)
            if idx is not None and len(idx) != value.shape[dim]:
                value = value.index_select(dim, torch.tensor(idx, device=value.device))
        if value.shape != target.shape:
            raise InheritanceError(
                f"{key}: the teacher's {source_key} gives {tuple(value.shape)}, the student needs {tuple(target.shape)}"
            )
        new[key] = value.detach().clone().to(target.dtype)
    student.load_state_dict(new, strict=True)
    log.info(
        "inherited the teacher's weights: blocks %s, %d of %d heads, %d of %d channels",
        plan.blocks,
        student.config.heads,
        teacher.config.heads,
        student.config.width,
        teacher.config.width,
    )
    return plan
