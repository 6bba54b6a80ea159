"""The matmuls of one transformer block's Linear layers in a training step, each timed alone.

For a preset and batch, each block runs its four Linears (``qkv``, ``proj``, ``fc1``, ``fc2``) on
the image tokens (batch x (patches + 1)) and on the packed text tokens (the real tokens of the
throughput bench's random captions, rounded up as ``MMFormer`` rounds them); a training step
computes three matmuls per Linear, laid out as autograd lays them out:

- forward ``addmm(b, x, W.T)``: (N, K) x (K, M) with the bias broadcast into the output;
- input gradient ``dy @ W``: (N, M) x (M, K);
- weight gradient ``dy.T @ x``: (M, N) x (N, K), the token dimension N summed over (``W.T``'s
  gradient computed as ``(x.T @ dy).T`` is timed beside it).

Each is timed alone on warm operands in ``--precision`` (median of ``--reps`` after a warm-up) and
printed with its TFLOP/s and its share of this run's measured matmul peak
(``bench/train_throughput.py``'s: the best of square and Linear-shaped matmuls), then their sum
per block and for the whole stack (x depth), against what the same FLOPs would take at the peak.
It says how far the Linear matmuls alone are from the peak; the rest of a step (attention,
GELU, LayerNorm, casts, the optimizer) is what ``bench/diagnostics/profile_step.py`` breaks down. Nothing is
asserted.

    python -m bench.diagnostics.linear_matmuls --model small --batch-size 256
    python -m bench.diagnostics.linear_matmuls --model tiny --batch-size 64 --precision fp32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import add_cpu_settings_argument, apply_cpu_settings, machine_line, markdown_table
from bench.train_throughput import (
    DTYPES,
    add_preset_arguments,
    describe_peak,
    measure_matmul_peak,
    preset_config,
    random_batch,
)
from mmformer.model import MMFormer


def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def block_linears(cfg) -> dict[str, tuple[int, int]]:
    """Name -> (in, out) features of one multiway block's Linears."""
    d, h = cfg.width, cfg.mlp_hidden
    return {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, h), "fc2": (h, d)}


#: the key of :func:`time_linear`'s alternative layout, timed beside the three a step computes
TRANSPOSED_WEIGHT_GRAD = "weight grad as (x.T @ dy).T"


def time_linear(n: int, k: int, m: int, dtype: torch.dtype, reps: int, seed: int = 0) -> dict[str, float]:
    """Seconds of the forward, input-gradient and weight-gradient matmuls of a Linear k -> m on n
    tokens (and of the transposed weight-gradient layout)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).to(dtype)
    w = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(m, generator=g).to(dtype)
    dy = torch.randn(n, m, generator=g).to(dtype)
    return {
        "forward": median_seconds(lambda: torch.addmm(b, x, w.t()), reps),
        "input grad": median_seconds(lambda: dy @ w, reps),
        "weight grad": median_seconds(lambda: dy.t() @ x, reps),
        TRANSPOSED_WEIGHT_GRAD: median_seconds(lambda: (x.t() @ dy).t(), reps),
    }


def block_bench_setup(doc: str, argv: list[str] | None, reps: int, reps_help: str):
    """The arguments both block benches take (this one and ``bench/diagnostics/block_costs.py``), parsed, the
    CPU settings applied: (args, settings line, config, batch size, the batch's (B, T) text mask,
    its packing or None as ``MMFormer`` packs it, the token count per modality: image
    ``batch x (patches + 1)``, text the packed count or every position)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preset_arguments(p)
    p.add_argument("--reps", type=int, default=reps, help=f"{reps_help} (default: {reps})")
    p.add_argument("--seed", type=int, default=0)
    add_cpu_settings_argument(p)
    args = p.parse_args(argv)
    settings_line = apply_cpu_settings(args.cpu_settings)
    tok, cfg, batch = preset_config(args)
    _, _, mask = random_batch(cfg, batch, tok.vocab_size, args.seed)
    packing = MMFormer(cfg)._packing(mask)
    tokens = {
        "image": batch * (cfg.num_patches + 1),
        "text": mask.numel() if packing is None else packing.index.numel(),
    }
    return args, settings_line, cfg, batch, mask, packing, tokens


def main(argv: list[str] | None = None) -> int:
    args, settings_line, cfg, batch, mask, _, tokens = block_bench_setup(__doc__, argv, 15, "timed calls per matmul")
    dtype = DTYPES[args.precision]

    peak = measure_matmul_peak(dtype, 2048, reps=5, max_seconds=5.0)
    rows, total_s, total_flops = [], 0.0, 0.0
    for modality, n in tokens.items():
        for name, (k, m) in block_linears(cfg).items():
            flops = 2.0 * n * k * m
            for kind, s in time_linear(n, k, m, dtype, args.reps, args.seed).items():
                if kind != TRANSPOSED_WEIGHT_GRAD:
                    total_s += s
                    total_flops += flops
                rows.append(
                    {
                        "tokens": f"{modality} {n}",
                        "linear": f"{name} {k}->{m}",
                        "matmul": kind,
                        "ms": 1e3 * s,
                        "tflops": flops / s / 1e12,
                        "pct": 100 * flops / s / peak["peak_flops"],
                    }
                )
    print(machine_line())
    print(settings_line)
    print(
        f"{args.model} ({cfg.width} wide, {cfg.depth} layers), {args.precision}, batch {batch}: "
        f"{tokens['image']} image tokens, {tokens['text']} text tokens (packed, of {mask.numel()} positions)"
    )
    print(f"measured matmul peak {args.precision}: " + describe_peak(peak) + "\n")
    print(
        markdown_table(
            rows,
            [
                ("tokens", "tokens", 0),
                ("linear", "linear", 0),
                ("matmul", "matmul", 0),
                ("ms", "ms", 2),
                ("TFLOP/s", "tflops", 3),
                ("% of peak", "pct", 1),
            ],
        )
    )
    at_peak = total_flops / peak["peak_flops"]
    print(
        f"\none block, both modalities (forward, input grad, weight grad): {1e3 * total_s:.1f} ms, "
        f"{total_flops / total_s / 1e12:.3f} TFLOP/s = {100 * at_peak / total_s:.1f}% of the peak "
        f"({1e3 * at_peak:.1f} ms at the peak)"
    )
    print(
        f"the stack ({cfg.depth} blocks): {1e3 * cfg.depth * total_s:.0f} ms of Linear matmuls per step "
        f"({1e3 * cfg.depth * at_peak:.0f} ms at the peak)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
