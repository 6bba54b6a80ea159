"""Optimizer parameter groups and learning-rate schedules (``LambdaLR`` factors)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


def parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): weight matrices decay; parameters of fewer than two dims (norms, biases,
    scalars) and those the model names in ``model.no_weight_decay()`` (timm's convention; for
    :class:`~mmformer.model.MMFormer` its embeddings, class token and logit scale) do not."""
    named_exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or name in named_exempt
        (no_decay if exempt else decay).append(p)
    return decay, no_decay


def fused_supported(groups: list[dict[str, Any]]) -> bool:
    """True when every parameter is a plain (not sharded ``DTensor``) floating-point tensor on the
    CPU or a CUDA device: the cases ``torch.optim.AdamW(fused=True)`` takes."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(
        type(p) in (nn.Parameter, torch.Tensor) and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )


def make_adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused (one kernel for every parameter's update) where
    :func:`fused_supported`, else PyTorch's default implementation. On the CPU the fused
    update makes a bf16 training step faster than the per-parameter loop (see the benchmarks
    pages); the arithmetic is the same."""
    fused = fused_supported(groups)
    log.debug("AdamW: %s implementation", "fused" if fused else "default")
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0, progress: float | None = None) -> float:
    """LR multiplier: linear from 1/warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``.

    ``progress`` in [0, 1] overrides the step-based position on the cosine (time budgets).
    """
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(total - warmup, 1)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepCosine:
    """Picklable ``LambdaLR`` factor: warmup, then cosine over ``total`` steps."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup, self.total, self.min_ratio)


class TimeCosine:
    """Picklable ``LambdaLR`` factor: warmup in steps, then cosine over a wall-clock budget.

    The clock starts at the first call (the scheduler's construction); :meth:`restart` starts it
    again (:class:`mmformer.training.callbacks.ScheduleClock` does when training starts).
    """

    def __init__(self, warmup: int, budget_s: float, min_ratio: float = 0.0) -> None:
        self.warmup, self.budget_s, self.min_ratio = warmup, budget_s, min_ratio
        self.start: float | None = None

    def __call__(self, step: int) -> float:
        now = time.monotonic()
        if self.start is None:
            self.start = now
        return warmup_cosine(step, self.warmup, 0, self.min_ratio, progress=(now - self.start) / self.budget_s)

    def restart(self) -> None:
        """Start the clock now: the whole budget lies ahead."""
        self.start = time.monotonic()


class ClockLambdaLR(LambdaLR):
    """``LambdaLR`` whose factors may follow a wall clock (:class:`TimeCosine`):
    :meth:`restart_clock` restarts every such factor's clock."""

    def restart_clock(self) -> None:
        for factor in self.lr_lambdas:
            if isinstance(factor, TimeCosine):
                factor.restart()
