"""Compression from teacher to deployed model, in one table: teacher -> distilled student ->
pruned student -> int8 (PyTorch) -> ONNX fp32 / int8 (onnxruntime).

    python -m bench.compress_table --teacher runs/teacher/model --student runs/distill/model \\
        --pruned runs/pruned/model --plain runs/plain/model --out runs/compress-table --json table.json

Rows, all measured in one process on one CPU:

1. the teacher (fp32 PyTorch);
2. ``--plain``, if given: the same student trained without distillation (a reference row);
3. ``--student``: the distilled student (fp32 PyTorch);
4. ``--pruned``, if given: the pruned student (fp32 PyTorch);
5. the last PyTorch student (pruned if given, else distilled) as int8 through
   :func:`mmformer.compress.quantize_int8` (backend "auto"; the table says which one served);
6. that float model exported with :func:`mmformer.compress.onnx.export_onnx` to ``--out/onnx``
   and run by onnxruntime (fp32 graphs);
7. the same export's onnxruntime dynamic int8 graphs.

Columns: parameters (int8 and ONNX rows: those of the float model they are made from); size on
disk (the files the row runs: ``model.safetensors``; for int8 PyTorch, ``torch.save`` of its state
dict written to ``--out``; for ONNX, image + text graph, each of which holds the shared trunk);
images/s and texts/s of ``encode_image`` / ``encode_text`` (ONNX: the graphs through
onnxruntime) at each ``--batch-sizes`` on held-out images and captions spread evenly over the
split, the fastest of at least ``--repeats`` timed calls after a warm-up (``best_rate``: more
calls, until a second has passed); held-out text->image and image->text R@1 on the bundled
held-out family (``mmformer.retrieval.evaluate_retrieval``, as ``mmformer demo`` reports it; the
ONNX rows embed the same images and captions through onnxruntime into the same function); and
the row's t2i R@1 as a percentage of the teacher's.

Torch keeps its default thread count (``--threads N`` sets it); onnxruntime gets the same number of
intra-op threads. It prints the table, the machine and the load average at the start and the end
(on a busy machine, torch's batch-1 calls wait for descheduled worker threads: compare the load
with the thread count); it asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    OnnxModel,
    add_csv_argument,
    best_rate,
    held_out_recall,
    held_out_split,
    machine_line,
    markdown_table,
    write_csv,
)
from mmformer.compress import quantize_int8
from mmformer.compress.int8 import count_int8_linears
from mmformer.compress.onnx import export_onnx
from mmformer.data.emoji import default_data_dir
from mmformer.files import atomic_path, write_text_atomic
from mmformer.model import WEIGHTS_NAME, MMFormer
from mmformer.training.output import configure_output


class HeldOut:
    """The held-out split per image setting (size, mean, std), loaded once each."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir, self.splits = data_dir, {}

    def __call__(self, config):
        key = (config.image_size, tuple(config.image_mean), tuple(config.image_std))
        if key not in self.splits:
            self.splits[key] = held_out_split(config, self.data_dir)
        return self.splits[key]


def load(folder: str, flag: str) -> MMFormer:
    if not (Path(folder) / WEIGHTS_NAME).is_file():
        raise SystemExit(f"{flag} {folder}: no {WEIGHTS_NAME} there (expected a save_pretrained model folder)")
    return MMFormer.from_pretrained(folder).eval()


def speed(model, split, batch_sizes: list[int], repeats: int, min_seconds: float = 1.0) -> dict[str, float]:
    """images/s and texts/s of ``model`` at each batch size, on held-out inputs spread over the split."""
    c = model.config
    images = split.stacked_images()
    out = {}
    for b in batch_sizes:
        pick = torch.linspace(0, len(split) - 1, b).round().long().tolist()
        x = images[pick]
        ids, mask = model.tokenizer([split.captions[i] for i in pick], max_length=c.context_length)
        out[f"img_{b}"] = best_rate(lambda x=x: model.encode_image(x), b, repeats, min_seconds)
        out[f"txt_{b}"] = best_rate(lambda ids=ids, mask=mask: model.encode_text(ids, mask), b, repeats, min_seconds)
    return out


def measure(
    name: str, form: str, model, params: int, files: list[Path], held_out: HeldOut, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: size, speed and held-out recall of ``model`` (an MMFormer, int8 copy or OnnxModel)."""
    split = held_out(model.config)
    row: dict[str, Any] = {
        "row": name,
        "form": form,
        "params_m": params / 1e6,
        "disk_mb": sum(f.stat().st_size for f in files) / 2**20,
        "files": [str(f) for f in files],
    }
    row.update(speed(model, split, args.batch_sizes, args.repeats, args.min_seconds))
    m = held_out_recall(model, split=split)
    row.update(t2i=m["t2i_R@1"], i2t=m["i2t_R@1"], chance=m["t2i_chance_R@1"], n_images=m["n_images"])
    b = args.batch_sizes[-1]
    print(
        f"{name} ({form}): {row['disk_mb']:.2f} MB, {row[f'img_{b}']:.0f} images/s and {row[f'txt_{b}']:.0f} "
        f"texts/s at batch {b}, held-out t2i R@1 {row['t2i']:.2f}, i2t R@1 {row['i2t']:.2f}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's save_pretrained folder")
    p.add_argument("--student", required=True, help="the distilled student's save_pretrained folder")
    p.add_argument("--pruned", default=None, help="the pruned student's folder (rows 5-7 are then made from it)")
    p.add_argument("--plain", default=None, help="the same student trained without distillation (reference row)")
    p.add_argument("--out", required=True, help="folder for the ONNX export and the int8 state dict")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, at least")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch and onnxruntime threads (default 0: torch's own default, and as many for onnxruntime)",
    )
    p.add_argument("--data-dir", default=None, help="the emoji data (default: the bundled copy)")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="keep timing a measurement (up to 200 calls) until this many seconds have passed (default: 1)",
    )
    p.add_argument("--json", default=None, help="also write the rows and the machine here")
    add_csv_argument(p)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.repeats < 1 or args.threads < 0:
        raise SystemExit("--batch-sizes must be positive integers, --repeats at least 1, --threads at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_output()
    load_start = os.getloadavg()
    t_start = time.time()
    torch.manual_seed(0)
    held_out = HeldOut(default_data_dir(args.data_dir))
    folders = [
        ("teacher", args.teacher, "--teacher"),
        ("plain student", args.plain, "--plain"),
        ("distilled student", args.student, "--student"),
        ("pruned student", args.pruned, "--pruned"),
    ]
    models = {name: (load(folder, flag), folder) for name, folder, flag in folders if folder}
    n_held_out = min(len(held_out(m.config)) for m, _ in models.values())
    if max(args.batch_sizes) > n_held_out:
        raise SystemExit(f"--batch-sizes: at most {n_held_out} (the held-out images)")
    notes = []
    if "pruned student" in models:
        pruned, student = models["pruned student"][0].config, models["distilled student"][0].config
        if dataclasses.replace(pruned, block_heads=None) != dataclasses.replace(student, block_heads=None):
            notes.append(
                f"note: {args.pruned} differs from {args.student} in more than its heads per block: "
                "it is not a pruning of that student"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = [
        measure(name, "fp32 PyTorch", model, model.num_parameters(), [Path(folder) / WEIGHTS_NAME], held_out, args)
        for name, (model, folder) in models.items()
    ]
    last_name = "pruned student" if "pruned student" in models else "distilled student"
    last, last_dir = models[last_name]
    params = last.num_parameters()

    q = quantize_int8(last)
    backend, n_int8 = q.int8_backend, count_int8_linears(q)
    int8_file = out / f"int8-{backend}.state_dict.pt"
    with atomic_path(int8_file) as tmp:
        torch.save(q.state_dict(), tmp)
    rows.append(measure(last_name, f"int8 PyTorch ({backend})", q, params, [int8_file], held_out, args))
    del q

    onnx_dir = out / "onnx"
    parity = export_onnx(last, onnx_dir).get("parity", {})
    threads = torch.get_num_threads()
    for int8 in (False, True):
        onnx_model = OnnxModel(onnx_dir, int8=int8, threads=threads)
        rows.append(
            measure(
                last_name,
                f"ONNX {'int8' if int8 else 'fp32'} (onnxruntime)",
                onnx_model,
                params,
                onnx_model.files,
                held_out,
                args,
            )
        )
        del onnx_model

    teacher_t2i = rows[0]["t2i"]
    for r in rows:
        r["of_teacher"] = 100 * r["t2i"] / teacher_t2i if teacher_t2i else float("nan")
    cols = [("row", "row", 0), ("form", "form", 0), ("params (M)", "params_m", 3), ("on disk (MB)", "disk_mb", 2)]
    for b in args.batch_sizes:
        cols += [(f"images/s b{b}", f"img_{b}", 0), (f"texts/s b{b}", f"txt_{b}", 0)]
    cols += [("t2i R@1", "t2i", 2), ("i2t R@1", "i2t", 2), ("% of teacher t2i R@1", "of_teacher", 1)]
    nan = float("nan")
    load_end = os.getloadavg()
    print()
    print(markdown_table(rows, cols))
    print()
    print(
        f"last 3 rows: the {last_name} ({last_dir}). int8 PyTorch: quantize_int8(backend='auto') -> {backend}, "
        f"{n_int8} Linear layers int8; on disk = torch.save of its state dict ({int8_file}). ONNX ({onnx_dir}): "
        f"image + text graph, each holding the shared trunk; parity at export: fp32 max |diff| image "
        f"{parity.get('image_fp32_max_abs_diff', nan):.1e}, text {parity.get('text_fp32_max_abs_diff', nan):.1e}, "
        f"int8 lowest cosine image {parity.get('image_int8_min_cosine', nan):.4f}, "
        f"text {parity.get('text_int8_min_cosine', nan):.4f}"
    )
    print(
        f"params of the last 3 rows: those of the float model they are made from. speed: the fastest of at least "
        f"{args.repeats} calls after a warm-up, on held-out images and captions spread over the split; "
        f"{threads} torch threads ({'--threads' if args.threads else 'its default'}), "
        f"{threads} onnxruntime intra-op threads"
    )
    print(
        f"recall: the bundled held-out family ({rows[0]['n_images']} images, one name each; chance R@1 "
        f"{rows[0]['chance']:.2f}); total {time.time() - t_start:.0f} s"
    )
    for note in notes:
        print(note)
    print(machine_line())
    print(
        "load average (1, 5, 15 min): at start "
        + ", ".join(f"{v:.2f}" for v in load_start)
        + "; at end "
        + ", ".join(f"{v:.2f}" for v in load_end)
    )
    if args.json:
        write_text_atomic(
            Path(args.json),
            json.dumps(
                {
                    "rows": rows,
                    "machine": machine_line(),
                    "torch_threads": threads,
                    "onnxruntime_threads": threads,
                    "int8_backend": backend,
                    "load_average_start": load_start,
                    "load_average_end": load_end,
                    "onnx_parity": parity,
                    "args": vars(args),
                },
                indent=2,
            )
            + "\n",
        )
    if args.csv:
        print(f"wrote {write_csv(args.csv, [{**r, 'int8_backend': backend} for r in rows])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
