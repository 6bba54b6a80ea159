"""Training throughput on the CPU: mmformer presets next to an open_clip CLIP of the same size.

One training step = forward of both towers on a fixed random batch, ``clip_loss``, backward,
AdamW step (the library's ``mmformer.training.precision.train_step``, timed by its ``time_steps``:
samples/s = batch / the median step). For each preset (``tiny``, ``small``), implementation (mmformer ``share=qkv``,
open_clip ``CLIP``) and precision (fp32, bf16 autocast) it prints samples/s, the model FLOPs of
one training sample (``FlopCounterMode`` on one forward+backward, divided by the batch), the
achieved TFLOP/s and its fraction of this machine's matmul peak, measured in the same run for
fp32 and bf16: the best of 2048^2 squares and of Linear-layer shapes (many tokens x K -> N;
on AMX CPUs the latter run up to 1.7x faster in bf16), with the share of the best square beside
it.

    python -m bench.train_throughput                           # tiny + small, fp32 + bf16
    python -m bench.train_throughput --models tiny --precisions fp32 --steps 3 --json out.json

Both models see the same batches: images (B, 3, S, S) ~ N(0, 1) and ids ``[bos] pieces [eos]
pad...`` of random lengths 3..T (T = the preset's context length), pieces drawn uniformly from
the tokenizer's vocabulary. The open_clip model pools its text at the EOS token (see
``bench/common.py:open_clip_config`` for why not its default ``argmax``). mmformer runs its text
path's per-token layers on the real tokens only (``mmformer.layers.packing``; on average (T + 3) / 2
of the T positions here), open_clip on every position; ``--impls mmformer+padded`` times mmformer on the
padded batch too. FLOPs are counted per implementation, as each computes them. It prints a table; it
asserts nothing about timings.

Run time: on CPUs without native bf16 (AVX2 only) bf16 autocast emulates its matmuls and a bf16
step is one to two orders of magnitude slower than fp32 (seconds per sample), so the defaults
(tiny + small, 2 warm-up + 3 timed steps, both impls, both precisions) take tens of minutes there;
``--precisions fp32`` or a smaller ``--batch-size`` for the bf16 rows keeps it short.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import (
    PRECISIONS,
    Pair,
    add_cpu_settings_argument,
    add_csv_argument,
    apply_cpu_settings,
    build_open_clip,
    count_train_flops,
    load_tokenizer,
    machine_line,
    markdown_table,
    num_params,
    write_csv,
)
from mmformer.config import get_config
from mmformer.losses import clip_loss
from mmformer.model import MMFormer
from mmformer.tokenizer import BOS_ID, EOS_ID, PAD_ID
from mmformer.training.precision import time_steps, train_step

DEFAULT_BATCH = {"tiny": 64, "small": 32, "base": 16}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


LAYOUTS = {"a@b": lambda a, b: torch.mm(a, b), "a@b.T": lambda a, b: torch.mm(a, b.t())}

#: (M, K, N) of ``x (M, K) @ W.T (K, N)``: the shapes of a transformer's Linear layers (many tokens,
#: K and N a few hundred to a few thousand). On the AMX Xeon bf16 matmuls with K = 384 run ~1.7x
#: faster than square 2048^2 ones (4.4 against 2.6 TFLOP/s), so a square-only figure is not the
#: machine's peak; the peak is the best of these and the squares.
LINEAR_SHAPES = (
    (16384, 384, 1152),
    (16384, 384, 1536),
    (16384, 1536, 384),
    (16384, 512, 2048),
    (16384, 768, 3072),
    (16384, 1024, 1024),
)


MIN_SECONDS = 0.3


def _time_mm(
    dtype: torch.dtype, shape: tuple[int, int, int], layout: str, reps: int, max_seconds: float
) -> list[float]:
    """Seconds of each of ``reps`` or more (M, K) x (K, N) matmuls after one warm-up (at least 1
    timed rep, at least 2 unless one already took over ``max_seconds``); ``layout`` "a@b.T" keeps
    the second operand as an (N, K) weight, as ``F.linear`` does."""
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(*((n, k) if layout == "a@b.T" else (k, n)), generator=g).to(dtype)
    mm = LAYOUTS[layout]
    mm(a, b)
    times: list[float] = []
    start = time.perf_counter()
    # ``reps`` reps within ``max_seconds``; short matmuls repeat for at least MIN_SECONDS (up to 50)
    # so that a noisy VM's best rep is a fair sample
    while (len(times) < reps or (time.perf_counter() - start < MIN_SECONDS and len(times) < 50)) and (
        len(times) < 2 or time.perf_counter() - start < max_seconds
    ):
        t0 = time.perf_counter()
        mm(a, b)
        times.append(time.perf_counter() - t0)
        if times[0] > max_seconds:
            break
    return times


def _shrunk(
    shape: tuple[int, int, int], dtype: torch.dtype, layout: str, max_seconds: float, grow: str
) -> tuple[int, int, int]:
    """``shape``, or a smaller one where one matmul of it is predicted to take over ``max_seconds /
    4``: from 256 rows, ``grow="all"`` doubles every dimension (a square), ``grow="rows"`` only M."""
    grows = (True, True, True) if grow == "all" else (True, False, False)
    factor = 2 ** sum(grows)  # how much longer the next doubling takes
    cur = tuple(min(256, s) if g else s for s, g in zip(shape, grows))
    while cur != shape:
        t = min(_time_mm(dtype, cur, layout, reps=1, max_seconds=max_seconds))
        if factor * t > max_seconds / 4:
            break
        cur = tuple(min(2 * c, s) if g else c for c, s, g in zip(cur, shape, grows))
    return cur


def measure_matmul_peak(dtype: torch.dtype, n: int, reps: int, max_seconds: float) -> dict:
    """FLOP/s of matmuls in ``dtype``: (n, n) squares as ``a @ b`` and ``a @ b.T`` (both operands
    contiguous; on CPUs without native bf16 the two layouts take very different kernels, one can
    be ~50x slower), and the Linear-layer shapes of :data:`LINEAR_SHAPES` as ``x @ W.T``. The
    peak is the best rep of any of them; ``square_flops`` the best of the squares alone (the
    figure earlier runs of this bench called the peak).

    A shape whose matmul would take too long is measured smaller: squares double from 256, the
    Linear shapes' rows from 256, while one matmul is predicted to take under ``max_seconds / 4``.
    """
    out: dict = {"dtype": str(dtype).removeprefix("torch."), "shapes": {}}
    panel = [(f"{layout} {n}^2", (n, n, n), layout, "all") for layout in LAYOUTS]
    panel += [(f"x@W.T {m}x{k}x{nn}", (m, k, nn), "a@b.T", "rows") for m, k, nn in LINEAR_SHAPES]
    for name, shape, layout, grow in panel:
        size = _shrunk(shape, dtype, layout, max_seconds, grow)
        times = _time_mm(dtype, size, layout, reps, max_seconds)
        flops = 2.0 * size[0] * size[1] * size[2]
        out["shapes"][name] = {
            "mkn": list(size),
            "asked": list(shape),
            "square": grow == "all",
            "reps": len(times),
            "best_flops": flops / min(times),
            "median_flops": flops / statistics.median(times),
        }
    best = max(out["shapes"], key=lambda k: out["shapes"][k]["best_flops"])
    out["peak_flops"], out["peak_shape"] = out["shapes"][best]["best_flops"], best
    squares = {k: v for k, v in out["shapes"].items() if v["square"]}
    best_sq = max(squares, key=lambda k: squares[k]["best_flops"])
    out["square_flops"], out["square_shape"] = squares[best_sq]["best_flops"], best_sq
    return out


def describe_peak(peak: dict) -> str:
    parts = [
        f"{k}{'' if v['mkn'] == v['asked'] else ' (at ' + 'x'.join(map(str, v['mkn'])) + ')'} "
        f"{v['best_flops'] / 1e9:.1f}"
        for k, v in peak["shapes"].items()
    ]
    return (
        "best rep, GFLOP/s: " + "; ".join(parts) + f" -> peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s "
        f"({peak['peak_shape']}); best square {peak['square_flops'] / 1e9:.1f} ({peak['square_shape']})"
    )


def add_preset_arguments(parser) -> None:
    """``--model``, ``--batch-size`` and ``--precision``: what the one-preset benches built on this
    one's step take (``bench/diagnostics/profile_step.py``, ``bench/diagnostics/linear_matmuls.py``,
    ``bench/diagnostics/block_costs.py``)."""
    parser.add_argument("--model", default="small", help="preset (default: small)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the throughput bench's per preset")
    parser.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    parser.add_argument(
        "--attention-kernel",
        default="fused_cpu",
        choices=["default", "fused_cpu"],
        help="ModelConfig.attention_kernel (default: fused_cpu, what the CPU recipes train with)",
    )


def preset_config(args):
    """(tokenizer, the preset's config at the bundled vocabulary, batch size) for
    :func:`add_preset_arguments`' parsed ``args``."""
    tok, _ = load_tokenizer()
    cfg = get_config(args.model, vocab_size=tok.vocab_size, attention_kernel=args.attention_kernel)
    return tok, cfg, args.batch_size or DEFAULT_BATCH.get(args.model, 32)


def random_batch(cfg, batch_size: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (B, 3, S, S), ids (B, T), mask (B, T)) with T = cfg.context_length."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)
    t = cfg.context_length
    ids = torch.full((batch_size, t), PAD_ID, dtype=torch.long)
    lengths = torch.randint(3, t + 1, (batch_size,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = BOS_ID
        ids[i, 1 : n - 1] = torch.randint(EOS_ID + 1, vocab_size, (n - 2,), generator=g)
        ids[i, n - 1] = EOS_ID
    return images, ids, ids != PAD_ID


IMPLS = ("mmformer", "mmformer+padded", "open_clip", "open_clip+math")


def build(impl: str, cfg, vocab_size: int, seed: int, padded: bool = False) -> Pair:
    """A fresh model; ``padded``: an MMFormer whose text path runs on the padded batch (token
    packing off, ``ModelConfig.pack_text_below = 0``), as open_clip's does."""
    torch.manual_seed(seed)
    if impl == "mmformer" and padded:
        cfg = dataclasses.replace(cfg, pack_text_below=0.0)
    model = MMFormer(cfg) if impl == "mmformer" else build_open_clip(cfg, vocab_size)
    return Pair(impl, model.train())


OPTIMIZERS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def make_train_step(
    pair: Pair, batch, precision: str, optimizer: str = "fused", math_attention: bool = False
) -> Callable[[], torch.Tensor]:
    """The library's training step (:func:`mmformer.training.precision.train_step`) of ``pair`` on
    the fixed ``batch`` in ``precision`` (fp32, bf16): forward of both towers, ``clip_loss``,
    backward, AdamW (``optimizer``: the same implementation for every model). ``math_attention``
    runs the forward with SDPA restricted to its math backend (how open_clip can be given matmul
    attention)."""
    images, ids, mask = batch
    opt = torch.optim.AdamW(
        pair.model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, **OPTIMIZERS[optimizer]
    )

    def loss_of() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]) if math_attention else contextlib.nullcontext():
            return clip_loss(*pair(images, ids, mask))

    return train_step(loss_of, opt, PRECISIONS[precision])


def time_training(
    pair: Pair, batch, precision: str, warmup: int, steps: int, optimizer: str = "fused", math_attention: bool = False
) -> float:
    """Median seconds of ``steps`` timed training steps (:func:`make_train_step`) after ``warmup``
    untimed ones (:func:`mmformer.training.precision.time_steps`)."""
    step = make_train_step(pair, batch, precision, optimizer, math_attention)
    losses: list[torch.Tensor] = []
    seconds = time_steps(lambda: losses.append(step()), steps, warmup)
    if not torch.isfinite(losses[-1]):
        print(f"  warning: non-finite loss {losses[-1].item()} ({pair.impl}, {precision})", file=sys.stderr)
    return seconds


def parse_batch_sizes(text: str | None) -> dict[str, int]:
    """``"64"`` -> every model 64 (key ``*``); ``"tiny=128,small=64"`` -> per preset; None -> {}."""
    if not text:
        return {}
    if text.isdigit():
        return {"*": int(text)}
    out = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if not eq or not value.isdigit():
            raise ValueError(f"--batch-size {text!r}: expected N or PRESET=N,PRESET=N")
        out[name] = int(value)
    return out


def ratio_lines(rows: list[dict]) -> list[str]:
    """Per model: mmformer's best samples/s over each other implementation's best (each in its own
    fastest precision)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        best = {}
        for r in rows:
            if r["model"] == model and r["samples_per_s"] > best.get(r["impl"], {}).get("samples_per_s", 0):
                best[r["impl"]] = r
        ours = next((r for impl, r in best.items() if impl.startswith("mmformer")), None)
        if ours is None:
            continue
        for impl, r in best.items():
            if r is not ours:
                lines.append(
                    f"{model}: mmformer ({ours['precision']}) {ours['samples_per_s']:.1f} samples/s = "
                    f"{ours['samples_per_s'] / r['samples_per_s']:.2f}x {impl} ({r['precision']}) "
                    f"{r['samples_per_s']:.1f}"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny,small", help="comma-separated presets (default: tiny,small)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    p.add_argument(
        "--impls",
        default="mmformer,open_clip",
        help="comma-separated: mmformer, mmformer+padded (the text path on the padded batch, "
        "without token packing), open_clip (as shipped: SDPA picks its kernel), "
        "open_clip+math (SDPA restricted to its math backend)",
    )
    p.add_argument(
        "--optimizer",
        default="fused",
        choices=sorted(OPTIMIZERS),
        help="AdamW implementation, the same for every model (default: fused)",
    )
    p.add_argument(
        "--batch-size",
        default=None,
        help="batch size for every model (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_BATCH.items()) + ")",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps after 2 warm-up steps (default: 3)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before them (default: 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n peak matmul (default: 2048)")
    p.add_argument("--peak-reps", type=int, default=5, help="timed peak matmuls per dtype and layout (default: 5)")
    p.add_argument(
        "--peak-seconds",
        type=float,
        default=5.0,
        help="time bound per dtype and layout of the peak measurement (default: 5)",
    )
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the bundled one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--attention-kernel",
        default="fused_cpu",
        choices=["default", "fused_cpu"],
        help="mmformer's ModelConfig.attention_kernel (default: fused_cpu, what the CPU recipes train with)",
    )
    p.add_argument("--json", default=None, help="also write the rows (and the peaks) as JSON here")
    add_csv_argument(p)
    add_cpu_settings_argument(p)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    settings_line = apply_cpu_settings(args.cpu_settings)
    print(settings_line, flush=True)
    models = [m for m in args.models.split(",") if m]
    precisions = [x for x in args.precisions.split(",") if x]
    impls = [x for x in args.impls.split(",") if x]
    for x in precisions:
        if x not in DTYPES:
            p.error(f"unknown precision {x!r}; choose from {sorted(DTYPES)}")
    for x in impls:
        if x not in IMPLS:
            p.error(f"unknown impl {x!r}; choose from {', '.join(IMPLS)}")
    try:
        batch_sizes = parse_batch_sizes(args.batch_size)
    except ValueError as e:
        p.error(str(e))

    tok, tok_source = load_tokenizer(args.tokenizer)
    print(f"tokenizer: {tok.vocab_size} pieces ({tok_source})", flush=True)

    peaks = {}
    for name, dtype in DTYPES.items():  # both peaks, always, in this run
        peaks[name] = measure_matmul_peak(dtype, args.peak_size, args.peak_reps, args.peak_seconds)
        print(f"matmul peak {name}: " + describe_peak(peaks[name]), flush=True)

    rows = []
    for preset in models:
        cfg = get_config(preset, vocab_size=tok.vocab_size, attention_kernel=args.attention_kernel)
        bs = batch_sizes.get(preset, batch_sizes.get("*", DEFAULT_BATCH.get(preset, 32)))
        batch = random_batch(cfg, bs, tok.vocab_size, args.seed)
        for impl_name in impls:
            impl, math_attention = impl_name.split("+")[0], impl_name.endswith("+math")
            padded = impl_name.endswith("+padded")
            pair = build(impl, cfg, tok.vocab_size, args.seed, padded)
            images, ids, mask = batch
            flops = count_train_flops(lambda: clip_loss(*pair(images, ids, mask)))  # noqa: B023
            pair.model.zero_grad(set_to_none=True)
            label = (f"mmformer share={cfg.share}" + (" padded" if padded else "")) if impl == "mmformer" else impl_name
            for precision in precisions:
                pair = build(impl, cfg, tok.vocab_size, args.seed, padded)  # fresh weights per run
                print(
                    f"timing {preset} {label} {precision} batch {bs}: {args.warmup_steps} warm-up + "
                    f"{args.steps} steps ...",
                    flush=True,
                )
                step_s = time_training(
                    pair, batch, precision, args.warmup_steps, args.steps, args.optimizer, math_attention
                )
                sps = bs / step_s
                achieved = flops / bs * sps
                rows.append(
                    {
                        "model": preset,
                        "impl": label,
                        "precision": precision,
                        "params_M": num_params(pair.model) / 1e6,
                        "batch": bs,
                        "samples_per_s": sps,
                        "gflop_per_sample": flops / bs / 1e9,
                        "achieved_tflops": achieved / 1e12,
                        "pct_of_peak": 100 * achieved / peaks[precision]["peak_flops"],
                        "pct_of_square_peak": 100 * achieved / peaks[precision]["square_flops"],
                        "step_s_median": step_s,
                        "steps": args.steps,
                        "optimizer": args.optimizer,
                        "image_size": cfg.image_size,
                        "patch_size": cfg.patch_size,
                        "context_length": cfg.context_length,
                        "width": cfg.width,
                        "depth": cfg.depth,
                    }
                )
                print(f"  {sps:.1f} samples/s (median step {step_s:.3f} s)", flush=True)

    print()
    print(
        markdown_table(
            rows,
            [
                ("model", "model", 0),
                ("impl", "impl", 0),
                ("precision", "precision", 0),
                ("params (M)", "params_M", 2),
                ("batch", "batch", 0),
                ("samples/s", "samples_per_s", 1),
                ("GFLOP/sample", "gflop_per_sample", 2),
                ("achieved TFLOP/s", "achieved_tflops", 4),
                ("% of measured peak", "pct_of_peak", 1),
                (f"% of best {args.peak_size}^2", "pct_of_square_peak", 1),
            ],
        )
    )
    print()
    for line in ratio_lines(rows):
        print(line)
    print(
        f"optimizer: AdamW ({args.optimizer}) for every model; {args.warmup_steps} warm-up + {args.steps} timed "
        "steps; samples/s = batch / the median step"
    )
    for name in DTYPES:
        print(f"measured matmul peak {name}: " + describe_peak(peaks[name]))
    print(
        f"peak bf16/fp32 = {peaks['bf16']['peak_flops'] / peaks['fp32']['peak_flops']:.2f}; "
        "fp32 rows are compared with the fp32 peak, bf16 rows with the bf16 peak (the best of the "
        f"squares and the Linear shapes; the last column with the best {args.peak_size}^2 square alone)"
    )
    print(
        "FLOPs: FlopCounterMode on one forward+backward (matmuls, convs, attention incl. the CPU "
        "flash kernels), / batch; the optimizer step is not counted"
    )
    print(settings_line)
    print(machine_line())

    if args.json:
        out = {
            "rows": rows,
            "peaks": peaks,
            "machine": machine_line(),
            "cpu_settings": args.cpu_settings,
            "tokenizer": tok_source,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.csv:
        print(f"wrote {write_csv(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
