"""Attention kernels on the CPU: SDPA (flash / math backends) against two plain matmuls.

For each dtype (fp32, bf16) and attention shape (B, H, T, Dh) it times forward+backward (the
training case) and forward alone under ``no_grad`` (inference) of

- ``flash``: ``F.scaled_dot_product_attention`` as PyTorch dispatches it on the CPU (its flash kernel);
- ``sdpa-math``: the same restricted to SDPA's math backend;
- ``matmul``: ``softmax(Q K^T / sqrt(Dh)) V`` with two matmuls, what
  :func:`mmformer.layers.attention.scaled_dot_product` does where
  :func:`~mmformer.layers.attention.use_matmul_path` says so,

and prints the median milliseconds per call and which path mmformer takes. This is the measurement
behind ``use_matmul_path`` (bf16/fp16, gradients, sequences up to ``MATMUL_PATH_MAX_LEN``).

A second table times the training case of :func:`mmformer.layers.attention.attend` as the blocks
call it, from fused projections (B, T, 3 H Dh), forward+backward per dtype, without and with a key
padding mask (random key lengths): ``composite`` (views of ``qkv`` into ``scaled_dot_product``:
the matmul path above with autograd's backward, or SDPA's flash kernel where that path is not
taken) against ``fused-qkv`` (:class:`~mmformer.layers.cpu_attention.FusedQKVAttention`), and which
one ``attend_fused_cpu`` (``ModelConfig.attention_kernel = "fused_cpu"``) takes (:func:`~mmformer.layers.cpu_attention.use_fused_qkv_path`).

    python -m bench.diagnostics.attention_kernels
    python -m bench.diagnostics.attention_kernels --shapes 32x6x65x64,16x6x256x64 --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import add_cpu_settings_argument, apply_cpu_settings, machine_line, markdown_table
from mmformer.layers.attention import MATMUL_PATH_MAX_LEN, attend, split_fused, use_matmul_path
from mmformer.layers.cpu_attention import FusedQKVAttention, use_fused_qkv_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SHAPES = "32x6x65x64,32x6x32x64,64x4x17x32,128x4x16x32,16x6x256x64,4x6x1024x64"


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "flash": F.scaled_dot_product_attention,
    "sdpa-math": sdpa_math,
    "matmul": matmul_attention,
}


def time_ms(
    fn: Callable[..., torch.Tensor], qkv: list[torch.Tensor], backward: bool, reps: int, warmup: int = 2
) -> float:
    """Median milliseconds of ``reps`` calls (forward+backward, or forward under no_grad)."""
    times = []
    for i in range(warmup + reps):
        leaves = [x.detach().requires_grad_(backward) for x in qkv]
        t0 = time.perf_counter()
        if backward:
            fn(*leaves).float().sum().backward()
        else:
            with torch.no_grad():
                fn(*leaves)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


FUSED_KERNELS: dict[str, Callable[..., torch.Tensor]] = {"composite": attend, "fused-qkv": FusedQKVAttention.apply}


def fused_qkv_rows(
    dtypes: list[str], shapes: list[tuple[int, int, int, int]], reps: int, g: torch.Generator
) -> list[dict]:
    """Forward+backward of both ``attend`` paths from a (B, T, 3 H Dh) qkv, per dtype, shape and mask."""
    rows = []
    for dname in dtypes:
        for b, h, t, d in shapes:
            qkv = torch.randn(b, t, 3 * h * d, generator=g).to(DTYPES[dname])
            lengths = torch.randint(1, t + 1, (b,), generator=g)
            probe = qkv.detach().requires_grad_()
            q, k, _ = split_fused(probe, 3, h)
            row0 = {
                "dtype": dname,
                "shape": f"{b}x{h}x{t}x{d}",
                "composite is": "matmul" if use_matmul_path(q, k) else "flash",
                "attend_fused_cpu takes": "fused-qkv" if use_fused_qkv_path(probe) else "composite",
            }
            for mask in (None, torch.arange(t)[None, :] < lengths[:, None]):
                row = {**row0, "mask": "none" if mask is None else "padding"}
                for name, fn in FUSED_KERNELS.items():
                    row[name] = time_ms(lambda x, fn=fn, mask=mask, h=h: fn(x, h, mask), [qkv], True, reps)
                row["ratio"] = row["fused-qkv"] / row["composite"]
                rows.append(row)
                print(
                    f"{dname} {row['shape']} qkv mask={row['mask']}: "
                    + ", ".join(f"{k} {row[k]:.2f} ms" for k in FUSED_KERNELS),
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxHxTxDh (default: %(default)s)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--reps", type=int, default=10)
    add_cpu_settings_argument(p)
    args = p.parse_args(argv)
    settings_line = apply_cpu_settings(args.cpu_settings)
    g = torch.Generator().manual_seed(0)
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for b, h, t, d in shapes:
            shape = f"{b}x{h}x{t}x{d}"
            qkv = [torch.randn(b, h, t, d, generator=g).to(dtype) for _ in range(3)]
            for backward in (True, False):
                row = {"dtype": dname, "shape": shape, "pass": "fwd+bwd" if backward else "fwd (no_grad)"}
                for name, fn in KERNELS.items():
                    row[name] = time_ms(fn, qkv, backward, args.reps)
                probe = qkv[0].detach().requires_grad_(backward)
                with torch.set_grad_enabled(backward):
                    row["mmformer takes"] = "matmul" if use_matmul_path(probe, qkv[1]) else "flash"
                rows.append(row)
                print(
                    f"{dname} {shape} {row['pass']}: " + ", ".join(f"{k} {row[k]:.2f} ms" for k in KERNELS), flush=True
                )
    print()
    print(
        markdown_table(
            rows,
            [
                ("dtype", "dtype", 0),
                ("B x H x T x Dh", "shape", 0),
                ("pass", "pass", 0),
                ("flash ms", "flash", 2),
                ("sdpa-math ms", "sdpa-math", 2),
                ("matmul ms", "matmul", 2),
                ("mmformer takes", "mmformer takes", 0),
            ],
        )
    )
    fused = fused_qkv_rows(args.dtypes.split(","), [s for s in shapes if s[2] <= MATMUL_PATH_MAX_LEN], args.reps, g)
    print()
    print(
        markdown_table(
            fused,
            [
                ("dtype", "dtype", 0),
                ("fwd+bwd, B x H x T x Dh", "shape", 0),
                ("mask", "mask", 0),
                ("composite is", "composite is", 0),
                ("composite ms", "composite", 2),
                ("fused-qkv ms", "fused-qkv", 2),
                ("fused / composite", "ratio", 2),
                ("attend_fused_cpu takes", "attend_fused_cpu takes", 0),
            ],
        )
    )
    print(
        f"\nmedian of {args.reps} calls after 2 warm-up; matmul path for bf16/fp16 with gradients and "
        f"T <= {MATMUL_PATH_MAX_LEN}; attend_fused_cpu (attention_kernel 'fused_cpu') takes fused-qkv for training there"
    )
    print(settings_line)
    print(machine_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
