"""Multi-head attention on ``F.scaled_dot_product_attention``.

Masks follow one convention everywhere: a *key padding mask* is a bool tensor (B, S) that is
True for real tokens and False for padding. :func:`check_padding_mask` is the one check of it;
:func:`attn_bias_from_padding` turns it into the (B, 1, 1, S) boolean mask that SDPA broadcasts
over heads and queries. :func:`split_fused` is the one split of fused projections (``qkv``,
``kv``) into heads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: The signature of the blocks' attention kernels: fused projections (B, T, 3D), heads, key padding
#: mask (B, T) or None -> (B, T, D) before the output projection (:func:`attend` and its alternatives).
AttendFn = Callable[[torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


def check_heads(dim: int, heads: int) -> None:
    """Raise unless ``dim`` splits into ``heads`` heads."""
    if dim % heads:
        raise ValueError(f"dim={dim} is not divisible by heads={heads}")


def check_padding_mask(key_padding_mask: torch.Tensor | None, b: int, s: int) -> torch.Tensor | None:
    """The (B, S) bool key padding mask (True = real token), checked; None passes through."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, s):
        raise ValueError(
            f"key_padding_mask must be bool of shape (B, S) = ({b}, {s}), True = real token; "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    return key_padding_mask


def attn_bias_from_padding(key_padding_mask: torch.Tensor | None, b: int, s: int) -> torch.Tensor | None:
    """(B, S) bool, True = attend  ->  (B, 1, 1, S) bool for SDPA (or None); checked."""
    mask = check_padding_mask(key_padding_mask, b, s)
    return None if mask is None else mask[:, None, None, :]


def split_fused(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """Fused projections (B, T, parts*D) -> ``parts`` tensors (B, H, T, Dh), views of ``x``:
    q, k, v of a ``qkv`` Linear (``parts=3``), k, v of a ``kv`` Linear (``parts=2``)."""
    b, t, width = x.shape
    return x.view(b, t, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*Dh) -> (B, H, T, Dh)."""
    return split_fused(x, 1, heads)[0]


#: Longest query or key length for which low-precision CPU training takes the matmul path of
#: :func:`scaled_dot_product` (where it was measured faster: see the benchmarks pages).
MATMUL_PATH_MAX_LEN = 512


def use_matmul_path(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True where plain matmuls + softmax beat ``F.scaled_dot_product_attention`` on the CPU: bf16/fp16
    tensors that need gradients, sequences up to :data:`MATMUL_PATH_MAX_LEN`. There the CPU flash
    kernel's backward is several times slower than two batched matmuls, which run on the CPU's
    bf16 matmul units (AMX, AVX512-BF16); in fp32, without gradients, or for long sequences the
    kernel is as fast or faster and needs no (T, S) score matrix (see the benchmarks pages)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad)
        and max(q.shape[-2], k.shape[-2]) <= MATMUL_PATH_MAX_LEN
    )


def scaled_dot_product(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head) masked) V for (B, H, T, Dh) heads and a boolean ``mask``
    broadcastable to (B, H, T, S) (True = attend): ``F.scaled_dot_product_attention``, or the same
    computed with two matmuls where :func:`use_matmul_path` says that is faster."""
    if not use_matmul_path(q, k):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, Dh) -> (B, T, H*Dh)."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class SelfAttention(nn.Module):
    """Self-attention with one fused ``qkv`` Linear and an output projection ``proj``, both its own
    (the latents' self-attention in :class:`~mmformer.layers.fusion.DocumentFusion`; the
    multiway blocks share theirs across modalities in
    :class:`~mmformer.layers.multiway.MultiwayAttention`)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        check_heads(dim, heads)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D), key_padding_mask: (B, T) bool or None -> (B, T, D)."""
        return self.proj(attend(self.qkv(x), self.heads, key_padding_mask))


def attend(qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused projections (B, T, 3D) -> attention output before the output projection, (B, T, D).

    softmax(Q K^T / sqrt(d_head) + mask) V per head: head views of ``qkv`` into
    :func:`scaled_dot_product`, differentiated by autograd. D is the attention's inner width
    ``heads * d_head``, not necessarily the model width (a pruned block has fewer heads of the
    same ``d_head``). This is the reference every other kernel of the same signature is tested
    against (``ModelConfig.attention_kernel``: :mod:`mmformer.layers.cpu_attention`; the sparse
    text kernels of :mod:`mmformer.layers.sparse`).
    """
    check_fused_width(qkv, heads)
    q, k, v = split_fused(qkv, 3, heads)  # each (B, H, T, Dh)
    mask = attn_bias_from_padding(key_padding_mask, qkv.shape[0], qkv.shape[1])
    return merge_heads(scaled_dot_product(q, k, v, mask))


def check_fused_width(qkv: torch.Tensor, heads: int) -> None:
    """Raise unless the last dim of fused projections (B, T, 3D) splits into q, k, v of ``heads`` heads."""
    if qkv.shape[-1] % (3 * heads):
        raise ValueError(f"fused qkv width {qkv.shape[-1]} is not 3 x heads ({heads}) x d_head")


def cross_attend(
    q: torch.Tensor,
    kv: torch.Tensor,
    heads: int,
    key_padding_mask: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Queries (B, M, D) attend over fused key/value projections (B, S, 2D) -> (B, M, D) before the
    output projection: softmax(s Q K^T / sqrt(d_head) masked) V per head, via
    :func:`scaled_dot_product`. ``key_padding_mask``: (B, S) bool, True = a real key.
    ``logit_scale``: None, or a factor s broadcastable to (B, H, 1, 1) that multiplies each
    head's queries (a per-document, per-head temperature, as in
    :class:`~mmformer.layers.fusion.DocumentFusion`)."""
    if q.shape[-1] % heads or kv.shape[-1] != 2 * q.shape[-1]:
        raise ValueError(
            f"cross attention needs queries (B, M, D) with D divisible by heads ({heads}) and fused "
            f"keys/values (B, S, 2D); got {tuple(q.shape)} and {tuple(kv.shape)}"
        )
    qh = split_heads(q, heads)  # (B, H, M, Dh)
    if logit_scale is not None:
        qh = qh * logit_scale
    k, v = split_fused(kv, 2, heads)  # (B, H, S, Dh)
    mask = attn_bias_from_padding(key_padding_mask, kv.shape[0], kv.shape[1])
    return merge_heads(scaled_dot_product(qh, k, v, mask))
