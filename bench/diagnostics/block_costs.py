"""What one transformer block's training pass spends its time on, by taking parts out.

One ``MultiwayBlock`` of a preset (block 0 of a fresh ``MMFormer``) runs forward + backward on
the image tokens of a batch (B, patches + 1, D) and on its packed text tokens (the throughput
bench's random captions, packed as ``MMFormer`` packs them), fp32 master weights, in fp32 or
under bf16 autocast, as in a training step. It is timed whole and with one part replaced at a
time, each replacement keeping every shape and every Linear layer:

- GELU -> identity;
- both LayerNorms -> identity;
- the attention core (head split, QK^T, mask, softmax, x V, head merge) -> the first third of
  ``qkv`` (the ``v`` slot's width), made contiguous;
- all three at once: what is left is the four Linears, the residual adds, autocast's casts and
  (text) packing.

The difference from the whole block is what the part costs in place (its kernels, their memory
passes and their backward), without a profiler's per-operator overhead (``bench/diagnostics/profile_step.py``
inflates short elementwise kernels). Beside it, the sum of the block's Linear matmuls timed alone
(``bench/diagnostics/linear_matmuls.py``). Median of ``--reps`` passes after warm-up. Nothing is asserted.

    python -m bench.diagnostics.block_costs --model small --batch-size 256
    python -m bench.diagnostics.block_costs --model tiny --batch-size 64 --precision fp32
"""

from __future__ import annotations

import torch
from torch import nn

from bench.common import machine_line, markdown_table
from bench.diagnostics.linear_matmuls import (
    TRANSPOSED_WEIGHT_GRAD,
    block_bench_setup,
    block_linears,
    median_seconds,
    time_linear,
)
from bench.train_throughput import DTYPES
from mmformer.layers.multiway import MultiwayBlock, route
from mmformer.model import MMFormer

VARIANTS = (
    "whole block",
    "GELU -> identity",
    "LayerNorms -> identity",
    "attention core -> identity",
    "all three -> identity",
)


def v_slot(qkv: torch.Tensor, heads: int, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Stand-in for :func:`~mmformer.layers.attention.attend`: (B, T, 3D) -> (B, T, D), no attention."""
    return qkv[..., : qkv.shape[-1] // 3].contiguous()


def variant_block(block: MultiwayBlock, modality: str, variant: str) -> MultiwayBlock:
    """A copy-free edit of ``block`` (its modules are replaced in place; build a fresh block per
    variant)."""
    if variant in ("GELU -> identity", "all three -> identity"):
        route(block.mlp, modality).act = nn.Identity()
    if variant in ("LayerNorms -> identity", "all three -> identity"):
        block.norm1[modality] = nn.Identity()
        block.norm2[modality] = nn.Identity()
    if variant in ("attention core -> identity", "all three -> identity"):
        block.attn.forward = _forward_without_attention(block.attn)
    return block


def _forward_without_attention(attn):
    def forward(x, modality, key_padding_mask=None, packing=None):
        qkv = route(attn.qkv, modality)(x)
        h = v_slot(qkv if packing is None else packing.unpack(qkv), attn.heads)
        return route(attn.proj, modality)(h if packing is None else packing.pack(h))

    return forward


def time_block(block: MultiwayBlock, modality: str, x: torch.Tensor, mask, packing, precision: str, reps: int) -> float:
    """Median seconds of one forward + backward of ``block`` on ``x``."""
    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(x)

    def once() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = block(x, modality, mask, packing)
        y.backward(grad.to(y.dtype))
        block.zero_grad(set_to_none=True)
        x.grad = None

    return median_seconds(once, reps, warmup=3)


def main(argv: list[str] | None = None) -> int:
    args, settings_line, cfg, batch, mask, packing, tokens = block_bench_setup(
        __doc__, argv, 10, "timed passes per variant"
    )
    g = torch.Generator().manual_seed(args.seed)
    act_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    inputs = {  # the blocks' input dtype: bf16 under autocast (the embeddings' output), else fp32
        "image": (torch.randn(batch, cfg.num_patches + 1, cfg.width, generator=g).to(act_dtype), None, None),
        "text": (
            (
                torch.randn(tokens["text"], cfg.width, generator=g)
                if packing is not None
                else torch.randn(batch, mask.shape[1], cfg.width, generator=g)
            ).to(act_dtype),
            mask,
            packing,
        ),
    }
    rows = []
    for modality, (x, m, pk) in inputs.items():
        whole = None
        for variant in VARIANTS:
            torch.manual_seed(args.seed)
            block = variant_block(MMFormer(cfg).blocks[0].train(), modality, variant)
            s = time_block(block, modality, x, m, pk, args.precision, args.reps)
            whole = s if whole is None else whole
            rows.append(
                {
                    "tokens": f"{modality} {tokens[modality]}",
                    "variant": variant,
                    "ms": 1e3 * s,
                    "part": "" if variant == "whole block" else f"{1e3 * (whole - s):.1f}",
                    "share": "" if variant == "whole block" else f"{100 * (whole - s) / whole:.0f}",
                }
            )
        lin = sum(
            sum(
                v
                for k, v in time_linear(tokens[modality], i, o, DTYPES[args.precision], 15, args.seed).items()
                if k != TRANSPOSED_WEIGHT_GRAD
            )
            for i, o in block_linears(cfg).values()
        )
        rows.append(
            {
                "tokens": rows[-1]["tokens"],
                "variant": "its Linear matmuls alone (linear_matmuls.py)",
                "ms": 1e3 * lin,
                "part": "",
                "share": f"{100 * lin / whole:.0f}",
            }
        )
    print(machine_line())
    print(settings_line)
    print(
        f"{args.model} ({cfg.width} wide, {cfg.depth} layers, FFN {cfg.mlp_hidden}), {args.precision}, "
        f"batch {batch}: one block's forward + backward, median of {args.reps}\n"
    )
    print(
        markdown_table(
            rows,
            [
                ("tokens", "tokens", 0),
                ("variant", "variant", 0),
                ("ms", "ms", 2),
                ("part's cost, ms (whole - variant)", "part", 0),
                ("% of the whole block", "share", 0),
            ],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
