"""Weight initialisation shared by the model and the fusion module."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn


def init_linears_and_norms(
    modules: Iterable[tuple[str, nn.Module]], linear_std: Callable[[str, nn.Linear], float]
) -> None:
    """In the given (module-tree) order: each Linear's weight ~ N(0, ``linear_std(name, m)``)
    and its bias 0; each LayerNorm's weight 1 and bias 0. The order fixes which random draws
    each weight gets."""
    for name, m in modules:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=linear_std(name, m))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
