"""Sparse attention for one long window, on top of ``F.scaled_dot_product_attention``.

Both functions have the signature of :func:`mmformer.layers.attention.attend` (fused
projections (B, T, 3D) -> (B, T, D) before the output projection), so a model can swap them in
without new weights (``ModelConfig.attention``):

- :func:`local_global_attention`: token i attends to the keys j with |i - j| <= ``window``
  plus the first ``n_global`` tokens; the first ``n_global`` tokens attend to every key. Queries
  are processed in blocks, so memory is O(T * (window + n_global)) instead of O(T^2). With
  ``window >= T - 1`` it is dense attention.
- :func:`compressed_attention`: memory-compressed attention; keys and values are mean-pooled
  over strides of ``compression`` tokens (padding excluded from the means) and every query
  attends to the T / compression pooled slots. With ``compression = 1`` it is dense attention.

Padding convention as everywhere: ``key_padding_mask`` (B, T) bool, True = real token. The
outputs at padding positions are unspecified (finite); real positions never attend to padding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mmformer.config import ATTENTION_KINDS
from mmformer.layers.attention import AttendFn, attend, check_padding_mask, merge_heads, split_fused


def local_global_attention(
    qkv: torch.Tensor,
    heads: int,
    key_padding_mask: torch.Tensor | None = None,
    *,
    window: int = 128,
    n_global: int = 1,
    block: int | None = None,
) -> torch.Tensor:
    """Sliding-window attention plus global tokens; (B, T, 3D) -> (B, T, D).

    Args:
        window: each query sees keys within ``window`` positions on either side (>= 0).
        n_global: the first ``n_global`` tokens (e.g. BOS) are seen by and see every token.
        block: queries per SDPA call (default ``max(window, 64)``); only memory/speed change.
    """
    if window < 0 or n_global < 0:
        raise ValueError(f"need window >= 0 and n_global >= 0, got window={window}, n_global={n_global}")
    q, k, v = split_fused(qkv, 3, heads)
    b, _, t, _ = q.shape
    pad = _padding_mask(key_padding_mask, b, t, q.device)
    g = min(n_global, t)
    out = torch.empty_like(q)  # (B, H, T, Dh)
    if g:  # global queries attend to everything
        out[:, :, :g] = F.scaled_dot_product_attention(q[:, :, :g], k, v, attn_mask=pad[:, None, None, :])
    bs = block or max(window, 64)
    pos = torch.arange(t, device=q.device)
    for s in range(g, t, bs):
        e = min(s + bs, t)
        ks, ke = max(g, s - window), min(t, e + window)  # local keys, global ones excluded
        qi, kj = pos[s:e, None], pos[None, ks:ke]
        band = (kj - qi).abs() <= window  # (bq, bk)
        keys = torch.cat([k[:, :, :g], k[:, :, ks:ke]], dim=2)
        vals = torch.cat([v[:, :, :g], v[:, :, ks:ke]], dim=2)
        allowed = torch.cat([band.new_ones(e - s, g), band], dim=1)[None]  # (1, bq, g+bk)
        real = torch.cat([pad[:, :g], pad[:, ks:ke]], dim=1)[:, None, :]  # (B, 1, g+bk)
        # a padding query whose band holds no real key attends to itself (finite, never read)
        self_key = torch.cat([band.new_zeros(e - s, g), kj == qi], dim=1)[None]
        mask = (allowed & real) | self_key  # (B, bq, g+bk)
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], keys, vals, attn_mask=mask[:, None])
    return merge_heads(out)


def _padding_mask(key_padding_mask: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor:
    """The (B, T) bool mask (True = real token), all True when None; checked."""
    if key_padding_mask is None:
        return torch.ones(b, t, dtype=torch.bool, device=device)
    return check_padding_mask(key_padding_mask, b, t)


def compressed_attention(
    qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor | None = None, *, compression: int = 4
) -> torch.Tensor:
    """Memory-compressed attention (strided mean pooling of K and V); (B, T, 3D) -> (B, T, D)."""
    if compression < 1:
        raise ValueError(f"compression must be >= 1, got {compression}")
    q, k, v = split_fused(qkv, 3, heads)
    b, h, t, dh = q.shape
    pad = _padding_mask(key_padding_mask, b, t, q.device)
    c = compression
    slots = -(-t // c)
    extra = slots * c - t
    w = pad.to(q.dtype)  # (B, T)
    if extra:
        k, v = F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra))
        w = F.pad(w, (0, extra))
    w = w.view(b, 1, slots, c, 1)
    count = w.sum(3)  # (B, 1, S, 1) real tokens per slot
    kp = (k.view(b, h, slots, c, dh) * w).sum(3) / count.clamp(min=1)  # (B, H, S, Dh)
    vp = (v.view(b, h, slots, c, dh) * w).sum(3) / count.clamp(min=1)
    slot_real = count[:, 0, :, 0] > 0  # (B, S)
    out = F.scaled_dot_product_attention(q, kp, vp, attn_mask=slot_real[:, None, None, :])
    return merge_heads(out)


def make_attend(
    kind: str = "dense", window: int = 128, n_global: int = 1, compression: int = 4, dense: AttendFn = attend
) -> AttendFn:
    """The text attention function for ``ModelConfig.attention`` (picklable: a partial or a
    module-level function): ``dense`` (the blocks' dense kernel, by default
    :func:`~mmformer.layers.attention.attend`) for ``"dense"``."""
    if kind == "dense":
        return dense
    if kind == "local":
        return functools.partial(local_global_attention, window=window, n_global=n_global)
    if kind == "compressed":
        return functools.partial(compressed_attention, compression=compression)
    raise ValueError(f"attention={kind!r} must be one of {ATTENTION_KINDS}")
