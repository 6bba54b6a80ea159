"""Causal self-attention: each token attends to itself and the real tokens before it (CLIP's text tower).

Same signature as :func:`mmformer.layers.attention.attend` (fused projections (B, T, 3D) ->
(B, T, D) before the output projection) and the same padding convention: ``key_padding_mask``
(B, T) bool, True = real token. Padding after the last real token changes nothing at the real
positions (they never see later keys); outputs at padding positions are finite and of no meaning.
"""

from __future__ import annotations

import torch

from mmformer.layers.attention import check_padding_mask, merge_heads, scaled_dot_product, split_fused


def causal_mask(t: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) bool, True where query i may attend to key j: j <= i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def causal_attend(qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head) + causal and padding mask) V per head, (B, T, 3D) -> (B, T, D)."""
    if qkv.shape[-1] % (3 * heads):
        raise ValueError(f"fused qkv width {qkv.shape[-1]} is not 3 x heads ({heads}) x d_head")
    b, t, _ = qkv.shape
    q, k, v = split_fused(qkv, 3, heads)  # each (B, H, T, Dh)
    mask = causal_mask(t, qkv.device)[None, None]  # (1, 1, T, T)
    padding = check_padding_mask(key_padding_mask, b, t)
    if padding is not None:
        # a padding query keeps its own key, so that no row of the mask is empty
        mask = mask & (padding[:, None, None, :] | torch.eye(t, dtype=torch.bool, device=qkv.device))
    return merge_heads(scaled_dot_product(q, k, v, mask))
