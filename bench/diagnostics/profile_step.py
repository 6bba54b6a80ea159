"""Where a CPU training step's time goes: torch.profiler over a few steps of one preset.

The step is the one ``bench/train_throughput.py`` times (forward of both towers on a fixed random
batch, ``clip_loss``, backward, fused AdamW), in fp32 or under bf16 autocast. The profiler's
self CPU time of every operator is summed into categories (matmuls, attention, casts and copies,
LayerNorm, GELU, softmax, the optimizer, the rest) and printed as a table with each category's
share of the profiled time, then the top operators.

    python -m bench.diagnostics.profile_step --model small --precision bf16 --batch-size 128
    python -m bench.diagnostics.profile_step --model tiny --precision fp32 --top 25

Profiling adds overhead per operator call, so the shares, not the absolute times, are the result;
``bench/train_throughput.py`` measures the speed. Nothing is asserted.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from bench.common import add_cpu_settings_argument, apply_cpu_settings, machine_line, markdown_table
from bench.train_throughput import add_preset_arguments, build, make_train_step, preset_config, random_batch

#: operator-name substrings -> category, first match wins (names are aten ops and autograd nodes)
CATEGORIES = [
    ("optimizer", ("adamw", "_fused_adam", "optimizer")),
    ("attention", ("scaled_dot_product", "flash_attention", "_softmax", "softmax")),
    ("matmul", ("addmm", "aten::mm", "aten::bmm", "matmul", "aten::linear", "mkldnn")),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("casts and copies", ("aten::copy_", "aten::to", "_to_copy", "clone", "contiguous", "aten::cat")),
    (
        "elementwise",
        (
            "aten::add",
            "aten::mul",
            "aten::div",
            "aten::sub",
            "aten::sum",
            "aten::fill_",
            "aten::zero_",
            "aten::masked_fill",
        ),
    ),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_preset_arguments(p)
    p.add_argument("--steps", type=int, default=3, help="profiled steps after 2 warm-up steps")
    p.add_argument("--top", type=int, default=15, help="operators listed by self time")
    add_cpu_settings_argument(p)
    args = p.parse_args(argv)
    settings_line = apply_cpu_settings(args.cpu_settings)

    tok, cfg, batch_size = preset_config(args)
    pair = build("mmformer", cfg, tok.vocab_size, seed=0)
    step = make_train_step(pair, random_batch(cfg, batch_size, tok.vocab_size, seed=0), args.precision)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_cat: dict[str, float] = defaultdict(float)
    for e in events:
        by_cat[category(e.key)] += e.self_cpu_time_total
    print(machine_line())
    print(settings_line)
    print(
        f"{args.model} ({cfg.width} wide, {cfg.depth} layers), {args.precision}, batch {batch_size}: "
        f"{total / 1e3 / args.steps:.1f} ms of operator self time per profiled step\n"
    )
    rows = [
        {"category": c, "ms per step": t / 1e3 / args.steps, "share %": 100 * t / total}
        for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])
    ]
    print(
        markdown_table(
            rows, [("category", "category", 0), ("ms per step", "ms per step", 1), ("share %", "share %", 1)]
        )
    )
    print()
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    rows = [
        {
            "operator": e.key,
            "category": category(e.key),
            "calls per step": e.count / args.steps,
            "ms per step": e.self_cpu_time_total / 1e3 / args.steps,
            "share %": 100 * e.self_cpu_time_total / total,
        }
        for e in top
    ]
    print(
        markdown_table(
            rows,
            [
                ("operator", "operator", 0),
                ("category", "category", 0),
                ("calls per step", "calls per step", 0),
                ("ms per step", "ms per step", 1),
                ("share %", "share %", 1),
            ],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
