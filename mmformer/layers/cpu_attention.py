"""An opt-in CPU kernel for the blocks' attention: fused-qkv attention with its own backward.

Selected by ONE switch, ``ModelConfig.attention_kernel = "fused_cpu"`` (default ``"default"``:
the reference :func:`mmformer.layers.attention.attend`), or on a built model by
:meth:`mmformer.model.MMFormer.set_attention_kernel`. Even then it only runs where it was measured
to pay, low-precision (bf16/fp16) training on the CPU (:func:`use_fused_qkv_path`); everywhere else
:func:`attend_fused_cpu` is :func:`~mmformer.layers.attention.attend`. It computes the same
function as the reference, tested against it forward and backward; the timings that made the
shipped CPU recipes turn it on are in the benchmarks pages.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mmformer.layers.attention import attend, check_fused_width, check_padding_mask, use_matmul_path


def use_fused_qkv_path(qkv: torch.Tensor) -> bool:
    """True where :func:`attend_fused_cpu` takes :class:`FusedQKVAttention`: the conditions of
    :func:`~mmformer.layers.attention.use_matmul_path` (CPU, bf16/fp16, gradients, T <=
    ``MATMUL_PATH_MAX_LEN``) on a plain tensor (tensor subclasses such as DTensor keep the
    reference path). fp32 stays on SDPA's flash kernel: there the gain is small and the gradients
    depend more on how a batch is split (see the benchmarks pages)."""
    return type(qkv) is torch.Tensor and use_matmul_path(qkv, qkv)  # (B, T, 3D): T is dim -2, as for heads


def attend_fused_cpu(qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~mmformer.layers.attention.attend` (same signature, same result) computed by
    :class:`FusedQKVAttention` where :func:`use_fused_qkv_path` holds, by ``attend`` elsewhere."""
    if not use_fused_qkv_path(qkv):
        return attend(qkv, heads, key_padding_mask)
    check_fused_width(qkv, heads)
    return FusedQKVAttention.apply(qkv, heads, check_padding_mask(key_padding_mask, qkv.shape[0], qkv.shape[1]))


class FusedQKVAttention(torch.autograd.Function):
    """softmax(Q K^T / sqrt(d_head) masked) V from fused projections (B, T, 3 H Dh), with its own
    backward: what :func:`attend_fused_cpu` runs where :func:`use_fused_qkv_path` holds.

    :func:`~mmformer.layers.attention.attend` (views of ``qkv`` into ``scaled_dot_product``) lets
    autograd copy each head-strided operand and gradient on its own and scale Q in a separate pass;
    here ``qkv`` is copied once into a head-major (3, B H, T, Dh) buffer, the scale (and the padding
    mask, as an additive -inf bias) go into ``baddbmm``, and the backward writes dQ, dK, dV into one
    buffer that is copied once back to the (B, T, 3 H Dh) layout: the same six batched matmuls and
    one softmax (forward and backward) with fewer copies. Saved for backward: the head-major buffer
    and the (B H, T, T) probabilities. The backward calls the private
    ``torch._softmax_backward_data`` (the softmax gradient without a second autograd graph).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, width = qkv.shape
        dh = width // (3 * heads)
        scale = dh**-0.5
        with torch.autocast(qkv.device.type, enabled=False):
            # contiguous(), not reshape: a view with odd strides (an expanded tensor) sends bmm down a slow path
            hm = qkv.reshape(b, t, 3, heads, dh).permute(2, 0, 3, 1, 4).contiguous().view(3, b * heads, t, dh)
            q, k, v = hm.unbind(0)
            if mask is None:
                scores = torch.empty(b * heads, t, t, dtype=qkv.dtype)
                torch.baddbmm(scores, q, k.transpose(1, 2), beta=0.0, alpha=scale, out=scores)
            else:
                bias = torch.zeros(b, 1, 1, t, dtype=qkv.dtype).masked_fill_(~mask[:, None, None, :], float("-inf"))
                scores = torch.baddbmm(
                    bias.expand(b, heads, t, t).reshape(b * heads, t, t), q, k.transpose(1, 2), alpha=scale
                )
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
        scale = dh**-0.5
        q, k, v = hm.unbind(0)
        g = grad.to(hm.dtype).reshape(b, t, heads, dh).transpose(1, 2).contiguous().view(bh, t, dh)
        dhm = torch.empty_like(hm)
        dq, dk, dv = dhm.unbind(0)
        torch.bmm(probs.transpose(1, 2), g, out=dv)
        dscores = torch._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), probs, -1, probs.dtype)
        torch.baddbmm(dq, dscores, k, beta=0.0, alpha=scale, out=dq)
        torch.baddbmm(dk, dscores.transpose(1, 2), q, beta=0.0, alpha=scale, out=dk)
        return dhm.view(3, b, heads, t, dh).permute(1, 3, 0, 2, 4).reshape(b, t, 3 * heads * dh), None, None
