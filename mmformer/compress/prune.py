"""Structured attention-head pruning of an :class:`~mmformer.model.MMFormer`.

Three steps, each usable on its own (``mmformer prune`` runs them in order):

1. :func:`head_importance` scores every head of every block, ``(depth, heads)``:

   - ``"gradient"`` (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"): a gate
     ``g_h = 1`` multiplies each head's attention output before the output projection
     (:attr:`mmformer.layers.multiway.MultiwayAttention.head_gate`); the importance of head h is
     the mean over the given batches of ``|dL/dg_h|``, L the CLIP loss of the batch
     (:func:`mmformer.losses.clip_loss`, concept ids as extra positives when the batch has
     them). One gate per head serves every modality route of the block (the QKV is shared), so
     the image and the text passes both contribute to the same derivative.
   - ``"magnitude"`` (the baseline): the p-norm of the head's q, k and v rows of each ``qkv``
     Linear plus the p-norm of its columns of each ``proj`` Linear, summed over the modality
     routes (one term per shared Linear, one per modality otherwise).

2. :func:`select_heads` turns scores and a fraction into the heads to remove: the lowest-scored
   heads over all blocks (one global ranking), never the last head of a block.

3. :func:`prune_heads` removes them for real: the kept heads' rows of every ``qkv`` (weight and
   bias) and columns of every ``proj`` weight are copied into a new model whose config records
   the heads each block keeps (``ModelConfig.block_heads``), so the result saves with
   ``save_pretrained`` and loads with ``MMFormer.from_pretrained``. Removing head h gives the
   outputs of the unpruned model with ``g_h = 0``; removing nothing gives the same model.

These are model transforms only: no optimizer, schedule or data loading here. The batches for
the gradient criterion come from the caller, and the recovery fine-tuning of a pruned model runs
through the Lightning Trainer (:mod:`mmformer.training.prune`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from mmformer.layers.multiway import each
from mmformer.losses import clip_loss
from mmformer.model import MMFormer, eval_mode

log = logging.getLogger(__name__)

CRITERIA = ("gradient", "magnitude")
Batch = Mapping[str, Any]  # {"images": (B, 3, S, S), "input_ids": (B, T), "attention_mask": (B, T), "concepts"?: (B,)}


# ---- importance --------------------------------------------------------------------------------
@contextlib.contextmanager
def head_gates(model: MMFormer) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every block's attention multiplies head h's output by ``gates[i][h]``
    (a float32 leaf of ones that requires grad, on the model's device); afterwards no gates."""
    device = next(model.parameters()).device
    gates = [torch.ones(block.attn.heads, device=device, requires_grad=True) for block in model.blocks]
    try:
        for block, gate in zip(model.blocks, gates):
            block.attn.head_gate = gate
        yield gates
    finally:
        for block in model.blocks:
            block.attn.head_gate = None


def _to_device(
    batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, input_ids, attention_mask, concepts or None) of a batch, on ``device``."""
    missing = [k for k in ("images", "input_ids", "attention_mask") if k not in batch]
    if missing:
        raise ValueError(f"a batch needs 'images', 'input_ids' and 'attention_mask'; this one lacks {missing}")
    concepts = batch.get("concepts")
    return (
        batch["images"].to(device),
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        None if concepts is None else concepts.to(device),
    )


def batch_clip_loss(model: MMFormer, batch: Batch) -> torch.Tensor:
    """The CLIP loss of one batch on this process (concept ids as extra positives when present)."""
    images, ids, mask, concepts = _to_device(batch, next(model.parameters()).device)
    if images.shape[0] < 2:
        raise ValueError(f"a contrastive batch needs at least 2 pairs, got {images.shape[0]}")
    out = model(images, ids, mask)
    return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], concepts, gather=False)


def head_importance(
    model: MMFormer, batches: Iterable[Batch] | None = None, criterion: str = "gradient", p: float = 2.0
) -> torch.Tensor:
    """Importance of every head, a float32 ``(depth, heads)`` tensor on the CPU (higher = keep).

    Row i holds block i's heads in their order; a block pruned earlier to fewer than ``heads``
    heads has NaN in the missing places. ``criterion``: ``"gradient"`` (needs ``batches``: mean
    over them of ``|dL/dg_h|``, the model in eval mode, its parameters' ``.grad`` untouched) or
    ``"magnitude"`` (weight p-norms, no data); see the module docstring.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} must be one of {CRITERIA}")
    if criterion == "magnitude":
        return magnitude_importance(model, p)
    if batches is None:
        raise ValueError("the gradient criterion needs batches of image-text pairs (or use criterion='magnitude')")
    c = model.config
    total = torch.zeros(c.depth, c.heads, dtype=torch.float64)
    n = 0
    with eval_mode(model), torch.enable_grad(), head_gates(model) as gates:
        for batch in batches:
            grads = torch.autograd.grad(batch_clip_loss(model, batch), gates)
            for i, g in enumerate(grads):
                total[i, : g.numel()] += g.detach().abs().double().cpu()
            n += 1
    if n == 0:
        raise ValueError("head_importance got no batches")
    log.info("gradient head importance from %d batches", n)
    return _mask_absent(model, (total / n).float())


def magnitude_importance(model: MMFormer, p: float = 2.0) -> torch.Tensor:
    """``(depth, heads)``: for head h of block i, the sum over that block's ``qkv`` Linears of the
    p-norm of the head's q, k and v weight rows, plus the sum over its ``proj`` Linears of the
    p-norm of the head's weight columns (biases not counted)."""
    c = model.config
    scores = torch.zeros(c.depth, c.heads, dtype=torch.float64)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            a = block.attn
            h, dh = a.heads, a.head_dim
            for qkv in each(a.qkv):  # (3 H Dh, D) -> (H, 3 * Dh * D): q, k, v rows of each head
                w = qkv.weight.detach().double().reshape(3, h, dh, -1).transpose(0, 1).reshape(h, -1)
                scores[i, :h] += torch.linalg.vector_norm(w, p, dim=1).cpu()
            for proj in each(a.proj):  # (D, H Dh) -> (H, D * Dh): the columns of each head
                w = proj.weight.detach().double().reshape(-1, h, dh).transpose(0, 1).reshape(h, -1)
                scores[i, :h] += torch.linalg.vector_norm(w, p, dim=1).cpu()
    return _mask_absent(model, scores.float())


def normalize_per_block(importance: torch.Tensor) -> torch.Tensor:
    """Each block's scores divided by their L2 norm over the heads the block has (NaN places,
    heads pruned earlier, are left out and stay NaN), as Michel et al. (2019) normalise per layer
    before ranking heads globally: without it a block whose scores are small overall gives up
    most of the removed heads. A block whose scores are all zero stays zero."""
    if importance.ndim != 2:
        raise ValueError(f"importance must be (depth, heads), got shape {tuple(importance.shape)}")
    present = ~torch.isnan(importance)
    norms = torch.where(present, importance, torch.zeros_like(importance)).double().pow(2).sum(1).sqrt()
    norms = torch.where(norms > 0, norms, torch.ones_like(norms)).to(importance.dtype)
    return importance / norms[:, None]


def _mask_absent(model: MMFormer, scores: torch.Tensor) -> torch.Tensor:
    for i, h in enumerate(model.config.heads_per_block):
        scores[i, h:] = float("nan")
    return scores


# ---- which heads ---------------------------------------------------------------------------------
def select_heads(importance: torch.Tensor, fraction: float, heads_per_block: Sequence[int]) -> list[list[int]]:
    """The heads to remove per block: ``round(fraction * total heads)`` of the lowest-scored heads
    over all blocks (ties: earlier block, then lower head index first), skipping a head whose
    removal would leave its block without heads. ``fraction`` in [0, 1)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"the fraction of heads to remove must be a number in [0, 1), got {fraction!r}")
    counts = list(heads_per_block)
    if importance.ndim != 2 or importance.shape[0] != len(counts) or importance.shape[1] < max(counts):
        raise ValueError(
            f"importance of shape {tuple(importance.shape)} does not fit blocks of {counts} heads "
            f"(expected (depth, heads) = ({len(counts)}, {max(counts)}) or wider)"
        )
    total = sum(counts)
    n_remove = math.floor(fraction * total + 0.5)
    most = total - len(counts)
    if n_remove > most:
        raise ValueError(
            f"removing {fraction:g} of the heads is {n_remove} of {total}, but each of the "
            f"{len(counts)} blocks keeps at least one head: at most {most} can go "
            f"(a fraction up to {most / total:.3f})"
        )
    ranked = sorted(((float(importance[i, j]), i, j) for i, h in enumerate(counts) for j in range(h)))
    if any(math.isnan(s) for s, _, _ in ranked):
        raise ValueError("importance has NaN scores for heads the model has")
    left, remove = list(counts), [[] for _ in counts]
    for _, i, j in ranked:
        if sum(map(len, remove)) == n_remove:
            break
        if left[i] > 1:
            remove[i].append(j)
            left[i] -= 1
    return [sorted(r) for r in remove]


# ---- slicing -------------------------------------------------------------------------------------
def _qkv_rows(keep: Sequence[int], heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a fused (3 H Dh, D) qkv weight that hold the q, k and v of the heads ``keep``."""
    inner = heads * head_dim
    return torch.tensor([part * inner + h * head_dim + j for part in range(3) for h in keep for j in range(head_dim)])


def _head_columns(keep: Sequence[int], head_dim: int) -> torch.Tensor:
    """Columns of a (D, H Dh) proj weight that read the heads ``keep``."""
    return torch.tensor([h * head_dim + j for h in keep for j in range(head_dim)])


def _check_removal(model: MMFormer, remove: Sequence[Sequence[int]]) -> list[list[int]]:
    counts = model.config.heads_per_block
    if isinstance(remove, (str, bytes)) or len(remove) != len(counts):
        raise ValueError(f"heads to remove: expected one list per block ({len(counts)} blocks), got {remove!r}")
    out = []
    for i, (r, h) in enumerate(zip(remove, counts)):
        r = list(r)
        bad = [j for j in r if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < h]
        if bad:
            raise ValueError(f"block {i} has heads 0..{h - 1}; cannot remove {bad}")
        if len(set(r)) != len(r):
            raise ValueError(f"block {i}: head(s) listed twice in {r}")
        if len(r) >= h:
            raise ValueError(
                f"block {i}: removing {sorted(r)} would remove all {h} of its heads; every block keeps at least one"
            )
        out.append(sorted(r))
    return out


def prune_heads(
    model: MMFormer, remove: float | Sequence[Sequence[int]], importance: torch.Tensor | None = None
) -> MMFormer:
    """A new model without the given heads (``model`` is left as it was).

    ``remove``: per block, the indices of the heads to remove (in the block's current
    numbering), or a fraction in [0, 1) of all heads, chosen by :func:`select_heads` from
    ``importance`` (default: :func:`magnitude_importance`). The new model keeps the order of the
    remaining heads, the tokenizer, device, dtype and train/eval mode; its config's
    ``block_heads`` lists the heads each block keeps (None when nothing was removed, so an
    unpruned result is the same model, fingerprint included).
    """
    if isinstance(remove, (int, float)) and not isinstance(remove, bool):
        if importance is None:
            importance = magnitude_importance(model)
        remove = select_heads(importance, remove, model.config.heads_per_block)
    remove = _check_removal(model, remove)
    c = model.config
    keep = [[j for j in range(h) if j not in r] for h, r in zip(c.heads_per_block, remove)]
    counts = [len(k) for k in keep]
    config = dataclasses.replace(c, block_heads=None if all(n == c.heads for n in counts) else counts)
    state = model.state_dict()
    for i, (block, kept) in enumerate(zip(model.blocks, keep)):
        rows = _qkv_rows(kept, block.attn.heads, block.attn.head_dim)
        cols = _head_columns(kept, block.attn.head_dim)
        for name in [n for n in state if n.startswith(f"blocks.{i}.attn.")]:
            part = name[len(f"blocks.{i}.attn.") :]
            if part.startswith("qkv."):  # weight (3 H Dh, D) and bias (3 H Dh,), shared or per modality
                state[name] = state[name].index_select(0, rows.to(state[name].device))
            elif part.startswith("proj.") and part.endswith("weight"):  # (D, H Dh); the bias stays
                state[name] = state[name].index_select(1, cols.to(state[name].device))
    ref = next(model.parameters())
    pruned = MMFormer(config, model.tokenizer).to(device=ref.device, dtype=ref.dtype)
    pruned.load_state_dict_checked(state, source="the pruned state dict")
    pruned.train(model.training)
    for i, (r, h) in enumerate(zip(remove, c.heads_per_block)):
        log.info("block %d: removed heads %s, %d of %d left", i, r, h - len(r), h)
    return pruned
