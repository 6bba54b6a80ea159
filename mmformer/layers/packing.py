"""Padding-free text tokens: run the per-token layers of a padded batch on its real tokens only.

A text batch is padded to its longest caption: on the bundled emoji captions 38% of a batch of
256's (B, T) positions are real tokens. LayerNorm, the qkv / output projections and the FFN act
on each token alone, so they can run on the (N, D) real tokens instead of the (B, T, D) padded
batch; only attention needs the (B, T) layout, and there the pads are masked keys whose own
outputs are never read. :class:`TokenPacking` holds where the real tokens sit and moves
activations between the two layouts; :class:`~mmformer.layers.multiway.MultiwayBlock` takes one
and unpacks just around its attention kernel. The real tokens' states are the padded batch's
(the rows of a matmul do not depend on each other; different row counts may round differently
in the last float bit); pad positions come back as zeros, except the pad rows packed to round
the token count up (``multiple``), which are computed like any token and mean nothing.
"""

from __future__ import annotations

import torch


class TokenPacking:
    """The real tokens of a (B, T) padded batch: ``mask`` (B, T) bool, True = real token.

    ``pack``: (B, T, C) -> (N, C), the real tokens in row-major order; ``unpack``: (N, C) ->
    (B, T, C) with zeros at the positions not packed. Both are differentiable (index_select /
    index_copy_).

    ``multiple``: N is the number of real tokens rounded up to a multiple of it (at most B * T),
    the extra rows being the first pad positions: every new matmul shape costs oneDNN a kernel
    build (for bf16, more than the matmul itself at these sizes), and a batch's real-token count
    is new nearly every step, while its multiples of 64 repeat.

    ``real``: the mask's True count, if the caller has read it already (it must be that count).
    """

    def __init__(self, mask: torch.Tensor, multiple: int = 1, real: int | None = None) -> None:
        if mask.dtype != torch.bool or mask.ndim != 2:
            raise ValueError(f"expected a (B, T) bool mask, got {mask.dtype} {tuple(mask.shape)}")
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.mask = mask
        self.batch, self.length = mask.shape
        flat = mask.reshape(-1)
        # ``real``: the mask's True count when the caller has it already: reading it is the one
        # host sync here (on a GPU a stall); the positions below are found without another
        if real is None:
            real = int(flat.sum())
        extra = min(-real % multiple, flat.numel() - real)
        if extra:
            pad = ~flat
            flat = flat | (pad & (pad.cumsum(0) <= extra))  # the first ``extra`` pad positions
        self.tokens = real + extra
        self.index = torch.nonzero_static(flat, size=self.tokens).squeeze(1)  # (N,) b * T + t, ascending

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C)."""
        if x.shape[:2] != (self.batch, self.length):
            raise ValueError(f"expected ({self.batch}, {self.length}, C), got {tuple(x.shape)}")
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at the positions not packed."""
        if x.ndim != 2 or x.shape[0] != self.tokens:
            raise ValueError(f"expected ({self.tokens}, C) packed tokens, got {tuple(x.shape)}")
        out = x.new_zeros(self.batch * self.length, x.shape[-1])
        # in place on the fresh zeros: the out-of-place index_copy would copy them once more
        return out.index_copy_(0, self.index, x).view(self.batch, self.length, -1)
