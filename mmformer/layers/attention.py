"""Multi-head attention on ``F.scaled_dot_product_attention``.

Masks follow one convention everywhere: a *key padding mask* is a bool tensor (B, S) that is
True for real tokens and False for padding. :func:`attn_bias_from_padding` turns it into the
(B, 1, 1, S) boolean mask that SDPA broadcasts over heads and queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attn_bias_from_padding(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) bool, True = attend  ->  (B, 1, 1, S) bool for SDPA (or None)."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}")
    return key_padding_mask[:, None, None, :]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*Dh) -> (B, H, T, Dh)."""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, Dh) -> (B, T, H*Dh)."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class SelfAttention(nn.Module):
    """Self-attention with one fused ``qkv`` Linear and an output projection ``proj``.

    ``qkv`` and ``proj`` may be given from outside (shared with another module) so a multiway
    block can reuse them across modalities; by default they are created here.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D), key_padding_mask: (B, T) bool or None -> (B, T, D)."""
        return self.proj(attend(self.qkv(x), self.heads, key_padding_mask))


def attend(
    qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused projections (B, T, 3D) -> attention output before the output projection, (B, T, D).

    softmax(Q K^T / sqrt(d_head) + mask) V per head, via scaled_dot_product_attention.
    """
    b, t, three_d = qkv.shape
    d = three_d // 3
    q, k, v = qkv.view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # each (B, H, T, Dh)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias_from_padding(key_padding_mask))
    return merge_heads(out)


class CrossAttention(nn.Module):
    """Queries (B, Tq, D) attend over a context (B, S, Dc) with an optional context padding mask."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, Tq, D), context: (B, S, Dc), context_mask: (B, S) bool -> (B, Tq, D)."""
        b, s, _ = context.shape
        q = split_heads(self.q(x), self.heads)  # (B, H, Tq, Dh)
        k, v = self.kv(context).view(b, s, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias_from_padding(context_mask))
        return self.proj(merge_heads(out))
