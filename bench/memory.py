"""Peak memory and samples/s of a training step, and per-rank FSDP parameter + optimizer memory.

Part 1: one process, one training step (both towers, CLIP loss, backward, AdamW) on a fixed
batch, fp32 vs bf16 autocast, with and without activation checkpointing (per block), for the
given presets. Each configuration runs in a fresh subprocess with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set and the kernel's peak RSS
(``VmHWM``, reset with ``/proc/self/clear_refs`` after a warm-up step) measures the step:

- ``state MiB``: parameters + gradients + AdamW moments (counted from the tensors);
- ``step peak MiB``: peak RSS during the timed steps minus RSS just before them (activations,
  gradients, temporaries);
- ``samples/s``: batch / the median timed step (the library's ``train_step``, timed by its ``time_steps``).

Part 2: FSDP2 (``mmformer.training.distributed.apply_fsdp``) on 1 and 2 gloo processes: bytes each rank
holds for its parameter shards and AdamW state after one step (counted from the local tensors).

    python -m bench.memory --presets small,base --batch-size 8 --steps 2
    python -m bench.memory --presets small --skip-fsdp          # part 1 only

bf16 on a CPU without native bf16 matmuls (AVX2 only: no AVX512-BF16 / AMX) is emulated and
~20x slower than fp32; the samples/s column shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MiB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_batch(config, batch_size: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, config.image_size, config.image_size, generator=g)
    t = config.context_length
    ids = torch.randint(4, min(config.vocab_size, 2000), (batch_size, t), generator=g)
    mask = torch.ones(batch_size, t, dtype=torch.bool)
    return images, ids, mask


def one_config(preset: str, precision: str, ckpt: bool, batch_size: int, steps: int, threads: int) -> dict:
    """Run in a subprocess: measure one configuration (see the module docstring)."""
    import torch

    from bench.common import PRECISIONS
    from mmformer.config import get_config
    from mmformer.losses import clip_loss
    from mmformer.model import MMFormer
    from mmformer.training.optim import parameter_groups
    from mmformer.training.precision import time_steps, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = get_config(preset, grad_checkpointing=ckpt, vocab_size=2000)
    model = MMFormer(config).train()
    decay, no_decay = parameter_groups(model)
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
    images, ids, mask = make_batch(config, batch_size)

    def loss_of() -> torch.Tensor:
        out = model(images, ids, mask)
        return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])

    step = train_step(loss_of, opt, PRECISIONS[precision])
    step()  # warm-up: allocates the AdamW moments
    state = sum(p.numel() * p.element_size() for p in model.parameters()) * 2  # params + grads
    state += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.ndim)
    before = rss_bytes()
    reset_peak_rss()
    step_s = time_steps(step, steps, warmup=0)
    return {
        "preset": preset,
        "precision": precision,
        "ckpt": "on" if ckpt else "off",
        "batch": batch_size,
        "params_m": model.num_parameters() / 1e6,
        "state_mib": state / MiB,
        "step_peak_mib": (peak_rss_bytes() - before) / MiB,
        "peak_rss_mib": peak_rss_bytes() / MiB,
        "samples_s": batch_size / step_s,
    }


def run_config_subprocess(preset: str, precision: str, ckpt: bool, batch_size: int, steps: int, threads: int) -> dict:
    from bench.common import module_command, subprocess_env

    cmd = module_command("bench.memory", "--_one", json.dumps([preset, precision, ckpt, batch_size, steps, threads]))
    proc = subprocess.run(cmd, env=subprocess_env(MALLOC_MMAP_THRESHOLD_="65536"), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{preset} {precision} ckpt={ckpt} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- part 2: FSDP per-rank state ----------------------------------------------------------------
def _fsdp_rank(rank: int, world: int, port: int, preset: str, batch_size: int, out) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mmformer.config import get_config
    from mmformer.losses import clip_loss
    from mmformer.model import MMFormer
    from mmformer.training.distributed import apply_fsdp, local_state_bytes
    from mmformer.training.precision import train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = get_config(preset, vocab_size=2000)
        model = MMFormer(config).train()
        full = local_state_bytes(model)["params"]
        apply_fsdp(model, init_device_mesh("cpu", (world,)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images, ids, mask = make_batch(config, batch_size, seed=rank)

        def loss_of() -> torch.Tensor:
            o = model(images, ids, mask)
            return clip_loss(o["image_embeds"], o["text_embeds"], o["logit_scale"])

        train_step(loss_of, opt, "32-true")()  # the AdamW state exists after one step
        mem = local_state_bytes(model, opt)
        out[rank] = {"full_params": full, **mem}
    finally:
        dist.destroy_process_group()


def fsdp_rows(presets: list[str], batch_size: int) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    rows = []
    for preset in presets:
        base = None
        for world in (1, 2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = mp.Manager().dict()
            mp.spawn(_fsdp_rank, args=(world, port, preset, batch_size, out), nprocs=world, join=True)
            per_rank = [out[r]["params"] + out[r]["optimizer"] for r in range(world)]
            worst = max(per_rank)
            base = base or worst
            rows.append(
                {
                    "preset": preset,
                    "world": world,
                    "params_m": out[0]["full_params"] / 4 / 1e6,
                    "param_mib": max(out[r]["params"] for r in range(world)) / MiB,
                    "opt_mib": max(out[r]["optimizer"] for r in range(world)) / MiB,
                    "total_mib": worst / MiB,
                    "ratio": worst / base,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small,base")
    p.add_argument("--precisions", default="fp32,bf16-mixed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after 1 warm-up)")
    p.add_argument("--bf16-steps", type=int, default=1, help="timed steps for bf16 (emulated on AVX2: slow)")
    p.add_argument("--ckpt", default="off,on", help="activation checkpointing settings to run: off,on | off | on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fsdp-batch-size", type=int, default=2)
    p.add_argument("--skip-fsdp", action="store_true")
    p.add_argument("--skip-single", action="store_true")
    p.add_argument(
        "--csv",
        default=None,
        metavar="PATH",
        help="also write both tables' rows as CSV here (a table column says which), each with the date, "
        "commit, CPU model and flags, load and torch version (written atomically)",
    )
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        print(json.dumps(one_config(*json.loads(args._one))))
        return 0
    import torch

    from bench.common import machine_line, markdown_table, write_csv

    presets = args.presets.split(",")
    csv_rows = []
    if not args.skip_single:
        rows = []
        for preset in presets:
            for precision in args.precisions.split(","):
                for ckpt in [c == "on" for c in args.ckpt.split(",")]:
                    steps = args.bf16_steps if precision.startswith("bf16") else args.steps
                    rows.append(run_config_subprocess(preset, precision, ckpt, args.batch_size, steps, args.threads))
                    print(
                        f"  {preset} {precision} ckpt={'on' if ckpt else 'off'}: {rows[-1]['samples_s']:.2f} samples/s",
                        file=sys.stderr,
                        flush=True,
                    )
        print("\n### One process: training-step memory and speed\n")
        print(
            markdown_table(
                rows,
                [
                    ("preset", "preset", 0),
                    ("params (M)", "params_m", 1),
                    ("precision", "precision", 0),
                    ("act. ckpt", "ckpt", 0),
                    ("batch", "batch", 0),
                    ("state MiB (p+g+adam)", "state_mib", 0),
                    ("step peak MiB", "step_peak_mib", 0),
                    ("peak RSS MiB", "peak_rss_mib", 0),
                    ("samples/s", "samples_s", 2),
                ],
            )
        )
        csv_rows += [{"table": "one process", **r} for r in rows]
    if not args.skip_fsdp:
        rows = fsdp_rows(presets, args.fsdp_batch_size)
        csv_rows += [{"table": "fsdp", **r} for r in rows]
        print("\n### FSDP2: per-rank parameter + optimizer memory\n")
        print(
            markdown_table(
                rows,
                [
                    ("preset", "preset", 0),
                    ("params (M)", "params_m", 1),
                    ("processes", "world", 0),
                    ("param shard MiB", "param_mib", 1),
                    ("AdamW state MiB", "opt_mib", 1),
                    ("total per rank MiB", "total_mib", 1),
                    ("vs 1 process", "ratio", 3),
                ],
            )
        )
    print(f"\n{machine_line()}; threads per process: {args.threads} (part 1), 1 (part 2); torch {torch.__version__}")
    if args.csv:
        print(f"wrote {write_csv(args.csv, csv_rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
