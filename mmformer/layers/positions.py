"""Position encodings: sinusoidal 1-D, 2-D sin-cos for patch grids."""

from __future__ import annotations

import torch


def sinusoidal_1d(num_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The Transformer encoding, (num_positions, dim), computed in float64 then cast to float32.

    PE(pos, 2i) = sin(pos / base^(2i/dim)), PE(pos, 2i+1) = cos(pos / base^(2i/dim)).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)[None, :]  # (1, dim/2)
    angle = pos / base ** (two_i / dim)  # (P, dim/2)
    pe = torch.empty(num_positions, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.float()


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """2-D sin-cos encoding for a row-major patch grid, (grid_h * grid_w, dim).

    The first half of the channels encodes the row, the second half the column, each with
    :func:`sinusoidal_1d`.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need dim divisible by 4, got {dim}")
    rows = sinusoidal_1d(grid_h, dim // 2)  # (H, dim/2)
    cols = sinusoidal_1d(grid_w, dim // 2)  # (W, dim/2)
    pe = torch.cat(
        [rows[:, None, :].expand(grid_h, grid_w, -1), cols[None, :, :].expand(grid_h, grid_w, -1)],
        dim=-1,
    )  # (H, W, dim)
    return pe.reshape(grid_h * grid_w, dim)
