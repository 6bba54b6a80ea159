"""SigLIP vs CLIP InfoNCE on the bundled data: held-out retrieval after the same number of steps,
at several batch sizes.

For each batch size and loss it runs ``mmformer demo --steps N --batch-size B`` in a fresh process
with the demo's recipe (``tiny-cpu``) and ``loss`` set (a copy of the recipe is written under
``--out``), and reads the held-out family's metrics from the run's ``results.json``. Every run
takes the same steps, so a bigger batch sees more samples; compare the losses within a batch size.

    python -m bench.diagnostics.loss_study                                   # batch 32, 128, 512 x clip, siglip
    python -m bench.diagnostics.loss_study --batch-sizes 128 --steps 200 --seeds 0,1

Run time: a few minutes (steps x batch dominated by the batch-512 runs). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from bench.common import machine_line, markdown_table, run_demo
from mmformer.training.recipes import load_recipe


def recipe_with_loss(base: str, loss: str, out: Path) -> Path:
    recipe = load_recipe(base)
    model = recipe["model"]
    args = model.setdefault("init_args", {}) if "class_path" in model else model
    args["loss"] = loss
    path = out / f"{Path(base).stem}-{loss}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run(loss: str, batch: int, seed: int, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / f"{loss}-b{batch}-s{seed}"
    res = run_demo(
        [
            "--steps",
            str(args.steps),
            "--batch-size",
            str(batch),
            "--recipe",
            str(recipe_with_loss(args.recipe, loss, out)),
            "--precision",
            args.precision,
            "--seed",
            str(seed),
            "--query",
            "red apple",
        ],
        run_dir,
    )
    m = res["test_metrics"]
    row = {
        "batch": batch,
        "loss": loss,
        "seed": seed,
        "steps": res["steps"],
        "precision": res["precision"],
        "train s": res["train_seconds"],
        "t2i R@1": m["t2i_R@1"],
        "i2t R@1": m["i2t_R@1"],
        "t2i R@10": m["t2i_R@10"],
    }
    print(
        f"batch {batch} {loss} seed {seed}: {res['steps']} steps in {res['train_seconds']:.0f} s, "
        f"t2i R@1 {m['t2i_R@1']:.2f}, i2t R@1 {m['i2t_R@1']:.2f}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-sizes", default="32,128,512")
    p.add_argument("--losses", default="clip,siglip")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (default: 300)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--recipe", default="tiny-cpu", help="base fit recipe (default: the demo's, tiny-cpu)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default="runs/loss-study")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = [
        run(loss, int(b), int(s), args, out)
        for b in args.batch_sizes.split(",")
        for loss in args.losses.split(",")
        for s in args.seeds.split(",")
    ]
    summary = []
    for b in dict.fromkeys(r["batch"] for r in rows):
        for loss in dict.fromkeys(r["loss"] for r in rows):
            rs = [r for r in rows if r["batch"] == b and r["loss"] == loss]
            summary.append(
                {
                    "batch": b,
                    "loss": loss,
                    "seeds": len(rs),
                    "steps": rs[0]["steps"],
                    "t2i R@1": statistics.mean(r["t2i R@1"] for r in rs),
                    "i2t R@1": statistics.mean(r["i2t R@1"] for r in rs),
                    "t2i R@10": statistics.mean(r["t2i R@10"] for r in rs),
                    "train s": statistics.mean(r["train s"] for r in rs),
                }
            )
    print()
    print(
        markdown_table(
            summary,
            [
                ("batch", "batch", 0),
                ("loss", "loss", 0),
                ("seeds", "seeds", 0),
                ("steps", "steps", 0),
                ("t2i R@1", "t2i R@1", 2),
                ("i2t R@1", "i2t R@1", 2),
                ("t2i R@10", "t2i R@10", 2),
                ("train s", "train s", 0),
            ],
        )
    )
    print(f"\nrecipe {args.recipe} with loss set; held-out family of the bundled data; mean over seeds {args.seeds}")
    print(machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
