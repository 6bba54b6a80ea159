"""Multi-head attention on ``F.scaled_dot_product_attention``.

Masks follow one convention everywhere: a *key padding mask* is a bool tensor (B, S) that is
True for real tokens and False for padding. :func:`check_padding_mask` is the one check of it;
:func:`attn_bias_from_padding` turns it into the (B, 1, 1, S) boolean mask that SDPA broadcasts
over heads and queries. :func:`split_fused` is the one split of fused projections (``qkv``,
``kv``) into heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def check_heads(dim: int, heads: int) -> None:
    """Raise unless ``dim`` splits into ``heads`` heads."""
    if dim % heads:
        raise ValueError(f"dim={dim} is not divisible by heads={heads}")


def check_padding_mask(key_padding_mask: torch.Tensor | None, b: int, s: int) -> torch.Tensor | None:
    """The (B, S) bool key padding mask (True = real token), checked; None passes through."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, s):
        raise ValueError(f"key_padding_mask must be bool of shape (B, S) = ({b}, {s}), True = real token; "
                         f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
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
#: :func:`scaled_dot_product` (measured in bench/attention_kernels.py).
MATMUL_PATH_MAX_LEN = 512


def use_matmul_path(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True where plain matmuls + softmax beat ``F.scaled_dot_product_attention`` on the CPU: bf16/fp16
    tensors that need gradients, sequences up to :data:`MATMUL_PATH_MAX_LEN`. There the CPU flash
    kernel's backward is 3-10x slower than two batched matmuls, which run on the CPU's bf16 matmul
    units (AMX, AVX512-BF16); in fp32, without gradients, or for long sequences the kernel is as
    fast or faster and needs no (T, S) score matrix (bench/attention_kernels.py)."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad)
            and max(q.shape[-2], k.shape[-2]) <= MATMUL_PATH_MAX_LEN)


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head) masked) V for (B, H, T, Dh) heads and a boolean ``mask``
    broadcastable to (B, H, T, S) (True = attend): ``F.scaled_dot_product_attention``, or the same
    computed with two matmuls where :func:`use_matmul_path` says that is faster."""
    if not use_matmul_path(q, k):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def use_fused_qkv_path(qkv: torch.Tensor) -> bool:
    """True where :func:`attend` computes attention with :class:`FusedQKVAttention`: the conditions
    of :func:`use_matmul_path` (CPU, bf16/fp16, gradients, T <= :data:`MATMUL_PATH_MAX_LEN`) on a
    plain tensor (tensor subclasses such as DTensor keep the composite path). fp32 stays on SDPA's
    flash kernel: the fused path is 0.78-1.04x its time up to T = 128 there, but a step gains only
    ~1.5% and its gradients depend more on the batch split (bench/attention_kernels.py)."""
    return type(qkv) is torch.Tensor and use_matmul_path(qkv, qkv)  # (B, T, 3D): T is dim -2, as for heads


class FusedQKVAttention(torch.autograd.Function):
    """softmax(Q K^T / sqrt(d_head) masked) V from fused projections (B, T, 3 H Dh), with its own
    backward: the training case of :func:`attend` on the CPU in bf16/fp16 (:func:`use_fused_qkv_path`).

    The composite path (views of ``qkv`` into :func:`scaled_dot_product`) lets autograd copy each
    head-strided operand and gradient on its own and scale Q in a separate pass; here ``qkv`` is
    copied once into a head-major (3, B H, T, Dh) buffer, the scale (and the padding mask, as an
    additive -inf bias) go into ``baddbmm``, and the backward writes dQ, dK, dV into one buffer that
    is copied once back to the (B, T, 3 H Dh) layout. The same six batched matmuls and one softmax
    (forward and backward) as the composite path, in 0.66-0.92x its time at the presets' shapes
    at batch 256 in bf16 (the second table of ``python bench/attention_kernels.py``). Saved for
    backward: the head-major buffer and the (B H, T, T) probabilities."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, width = qkv.shape
        dh = width // (3 * heads)
        scale = dh ** -0.5
        with torch.autocast(qkv.device.type, enabled=False):
            # contiguous(), not reshape: a view with odd strides (an expanded tensor) sends bmm down a slow path
            hm = qkv.reshape(b, t, 3, heads, dh).permute(2, 0, 3, 1, 4).contiguous().view(3, b * heads, t, dh)
            q, k, v = hm.unbind(0)
            if mask is None:
                scores = torch.empty(b * heads, t, t, dtype=qkv.dtype)
                torch.baddbmm(scores, q, k.transpose(1, 2), beta=0.0, alpha=scale, out=scores)
            else:
                bias = torch.zeros(b, 1, 1, t, dtype=qkv.dtype).masked_fill_(~mask[:, None, None, :], float("-inf"))
                scores = torch.baddbmm(bias.expand(b, heads, t, t).reshape(b * heads, t, t), q, k.transpose(1, 2),
                                       alpha=scale)
            probs = torch.softmax(scores, dim=-1)
            out = torch.bmm(probs, v)
        ctx.save_for_backward(hm, probs)
        ctx.heads = heads
        return out.view(b, heads, t, dh).transpose(1, 2).reshape(b, t, heads * dh)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        hm, probs = ctx.saved_tensors
        heads = ctx.heads
        _, bh, t, dh = hm.shape
        b = bh // heads
        scale = dh ** -0.5
        q, k, v = hm.unbind(0)
        g = grad.to(hm.dtype).reshape(b, t, heads, dh).transpose(1, 2).contiguous().view(bh, t, dh)
        dhm = torch.empty_like(hm)
        dq, dk, dv = dhm.unbind(0)
        torch.bmm(probs.transpose(1, 2), g, out=dv)
        dscores = torch._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), probs, -1, probs.dtype)
        torch.baddbmm(dq, dscores, k, beta=0.0, alpha=scale, out=dq)
        torch.baddbmm(dk, dscores.transpose(1, 2), q, beta=0.0, alpha=scale, out=dk)
        return dhm.view(3, b, heads, t, dh).permute(1, 3, 0, 2, 4).reshape(b, t, 3 * heads * dh), None, None


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


def attend(
    qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused projections (B, T, 3D) -> attention output before the output projection, (B, T, D).

    softmax(Q K^T / sqrt(d_head) + mask) V per head, via :func:`scaled_dot_product`, or, for CPU
    training in bf16/fp16 (:func:`use_fused_qkv_path`), :class:`FusedQKVAttention`. D is the
    attention's inner width ``heads * d_head``, not necessarily the model width (a pruned block
    has fewer heads of the same ``d_head``).
    """
    if qkv.shape[-1] % (3 * heads):
        raise ValueError(f"fused qkv width {qkv.shape[-1]} is not 3 x heads ({heads}) x d_head")
    if use_fused_qkv_path(qkv):
        return FusedQKVAttention.apply(qkv, heads, check_padding_mask(key_padding_mask, qkv.shape[0], qkv.shape[1]))
    return attend_composite(qkv, heads, key_padding_mask)


def attend_composite(
    qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`attend` by head views of ``qkv`` into :func:`scaled_dot_product` (autograd's
    backward): what it takes outside :func:`use_fused_qkv_path`, and the reference the fused path
    is measured and tested against."""
    q, k, v = split_fused(qkv, 3, heads)  # each (B, H, T, Dh)
    mask = attn_bias_from_padding(key_padding_mask, qkv.shape[0], qkv.shape[1])
    return merge_heads(scaled_dot_product(q, k, v, mask))


class CrossAttention(nn.Module):
    """Queries (B, Tq, D) attend over a context (B, S, Dc) with an optional context padding mask."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = True):
        super().__init__()
        check_heads(dim, heads)
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, Tq, D), context: (B, S, Dc), context_mask: (B, S) bool -> (B, Tq, D)."""
        q = split_heads(self.q(x), self.heads)  # (B, H, Tq, Dh)
        k, v = split_fused(self.kv(context), 2, self.heads)  # (B, H, S, Dh)
        mask = attn_bias_from_padding(context_mask, context.shape[0], context.shape[1])
        return self.proj(merge_heads(scaled_dot_product(q, k, v, mask)))
