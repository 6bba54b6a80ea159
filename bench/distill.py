"""Distillation: does the teacher make the small student better in the same wall time?

Given a teacher (``runs/teacher/model`` from ``mmformer fit --config train/teacher.yaml``), trains
the student of ``train/distill.yaml`` for the same wall-clock budget in several ways, one after
the other, and evaluates each on the bundled held-out drawing family (never seen in training):

- ``distill``: the recipe as shipped (DistillModule: CLIP + its distillation terms, inheritance,
  its data settings);
- ``plain``: the same student with the CLIP loss alone, a fresh init and the demo's data
  (augmented, ``train/tiny-cpu.yaml``): what training the small model without a teacher gives;
- with ``--ablations``, the recipe with one thing changed: ``no-affinity``, ``no-feature``,
  ``interactive`` (interactive term on, weight 1), ``no-inherit`` (fresh student),
  ``inherit-only`` (every distillation weight 0: inheritance alone), ``augment`` (augmented
  images: the teacher embeds every batch, no image cache) and ``plain-noaug`` (``plain`` on the
  distill recipe's un-augmented data).

Every run gets the recipe's learning-rate schedule over the same budget (warmup, cosine over the
wall clock, the Trainer stopping at the budget), precision, batch size and seed; no validation
during training. The table gives for the teacher and each student: parameters, inference
images/s (``encode_image`` at batch 64, fp32, median of timed batches), optimizer steps, the
held-out text->image and image->text R@1 (``mmformer.retrieval.evaluate_retrieval`` on the test
split, as ``mmformer demo`` reports it), and the fraction of the teacher's t2i R@1.

    python -m bench.distill --teacher runs/teacher/model          # distill + plain, 16 min each (the recipe)
    python -m bench.distill --teacher runs/teacher/model --ablations --json distill.json
    python -m bench.distill --teacher runs/teacher/model --runs distill --minutes 0.2   # smoke

It prints a table and the machine; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from bench.common import add_csv_argument, held_out_recall, machine_line, markdown_table, write_csv
from mmformer.data.emoji import default_data_dir
from mmformer.model import TOKENIZER_NAME, MMFormer
from mmformer.training.datamodule import ImageTextDataModule
from mmformer.training.distill import DISTILL_TERMS, DistillModule
from mmformer.training.module import MMFormerModule
from mmformer.training.output import configure_output
from mmformer.training.precision import auto_precision, time_steps
from mmformer.training.recipes import init_args, load_recipe
from mmformer.training.trainer import make_trainer

#: What each run changes in the distill recipe: module arguments, plus "distill" (False = a plain
#: MMFormerModule) and "augment" (the data module's).
RUNS: dict[str, dict[str, Any]] = {
    "distill": {},
    "plain": {"distill": False, "augment": True},
    "no-affinity": {"affinity_weight": 0.0},
    "no-feature": {"feature_weight": 0.0},
    "interactive": {"interactive_weight": 1.0},
    "no-inherit": {"inherit": False},
    "inherit-only": {"affinity_weight": 0.0, "feature_weight": 0.0, "interactive_weight": 0.0},
    "augment": {"augment": True},
    "plain-noaug": {"distill": False, "augment": False},
}
DEFAULT_RUNS = ["distill", "plain"]
#: DistillModule's own arguments (a plain run drops them).
DISTILL_ARGS = (
    "teacher",
    "clip_weight",
    "teacher_precision",
    "cache_teacher",
    "inherit",
    *(f"{name}_weight" for name in DISTILL_TERMS),
)


def images_per_s(model: MMFormer, batch_size: int = 64, reps: int = 20, warmup: int = 3) -> float:
    """Inference images/s of ``model.encode_image`` on random (B, 3, S, S) batches, fp32: batch /
    the median of ``reps`` calls after ``warmup`` (:func:`mmformer.training.precision.time_steps`)."""
    c = model.config
    x = torch.randn(batch_size, c.in_chans, c.image_size, c.image_size)
    model = model.eval()
    with torch.inference_mode():
        return batch_size / time_steps(lambda: model.encode_image(x), reps, warmup)


def build(
    run: str, model_args: dict[str, Any], data_args: dict[str, Any], teacher: str, budget_s: float, data_dir: Path
) -> tuple[MMFormerModule, ImageTextDataModule, dict[str, Any]]:
    """The module and data module of one run, and what it changed."""
    change = dict(RUNS[run])
    distill = change.pop("distill", True)
    augment = change.pop("augment", data_args.get("augment", True))
    kw = {**model_args, **change, "time_budget_s": budget_s, "teacher": teacher}
    if kw.get("tokenizer") is None and (Path(teacher) / TOKENIZER_NAME).is_file():
        kw["tokenizer"] = str(Path(teacher) / TOKENIZER_NAME)  # plain runs too: the same token ids
    if distill:
        module: MMFormerModule = DistillModule(**kw)
    else:
        module = MMFormerModule(**{k: v for k, v in kw.items() if k not in DISTILL_ARGS})
    c = module.model.config
    dm = ImageTextDataModule(
        data_dir=str(data_dir),
        image_size=c.image_size,
        max_length=c.context_length,
        image_mean=c.image_mean,
        image_std=c.image_std,
        batch_size=data_args["batch_size"],
        caption_mode=data_args.get("caption_mode", "name"),
        augment=augment,
    )
    return module, dm, {"distill": distill, "augment": augment, "changed": change}


def describe(setting: dict[str, Any]) -> str:
    """The table's words for what a run changed in the recipe."""
    if not setting["distill"]:
        return "CLIP only, fresh init"
    return ", ".join(f"{k}={v}" for k, v in setting["changed"].items()) or "the recipe"


def train_run(
    run: str,
    args: argparse.Namespace,
    model_args: dict[str, Any],
    data_args: dict[str, Any],
    precision: str,
    data_dir: Path,
) -> dict[str, Any]:
    budget_s = args.minutes * 60
    L.seed_everything(args.seed, verbose=False)
    module, dm, setting = build(run, model_args, data_args, args.teacher, budget_s, data_dir)
    if precision == "auto":  # the recipe's "auto": measured on this model and batch (cached per CPU)
        choice = auto_precision(module, dm)
        print(f"{run}: {choice.reason()}", flush=True)
        precision = choice.precision
    trainer = make_trainer(
        max_steps=-1, max_time={"seconds": budget_s}, precision=precision, limit_val_batches=0, num_sanity_val_steps=0
    )
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    train_s = time.perf_counter() - t0
    model = module.model.eval()
    metrics = held_out_recall(model, data_dir)
    row = {
        "run": run,
        "precision": precision,
        "params": model.num_parameters(),
        "images_s": images_per_s(model, args.batch_size),
        "steps": trainer.global_step,
        "train_min": train_s / 60,
        "t2i": metrics["t2i_R@1"],
        "i2t": metrics["i2t_R@1"],
        "t2i10": metrics["t2i_R@10"],
        "augment": setting["augment"],
        "setting": describe(setting),
        "metrics": metrics,
    }
    if isinstance(module, DistillModule) and module.uses_teacher:
        row["teacher_precision"] = "bf16" if module.teacher_dtype() is not None else "fp32"
    teacher = f", teacher in {row['teacher_precision']}" if "teacher_precision" in row else ""
    print(
        f"{run}: {row['steps']} steps in {row['train_min']:.1f} min{teacher}, held-out t2i R@1 {row['t2i']:.2f}, "
        f"i2t R@1 {row['i2t']:.2f}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's save_pretrained folder (runs/teacher/model)")
    p.add_argument("--recipe", default="distill", help="the distill recipe (a shipped name or a YAML file)")
    p.add_argument(
        "--minutes", type=float, default=None, help="training budget of every run (default: the recipe's time_budget_s)"
    )
    p.add_argument("--runs", nargs="+", default=None, choices=sorted(RUNS), help=f"default: {' '.join(DEFAULT_RUNS)}")
    p.add_argument("--ablations", action="store_true", help="every run of RUNS (see the docstring)")
    p.add_argument("--precision", default=None, help="Trainer precision of the students (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=64, help="batch of the images/s measurement")
    p.add_argument("--train-batch-size", type=int, default=None, help="training batch (default: the recipe's)")
    p.add_argument("--data-dir", default=None, help="the emoji data (default: the bundled copy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    add_csv_argument(p)
    args = p.parse_args(argv)
    configure_output()  # mmformer's warnings once, no third-party tips

    recipe = load_recipe(args.recipe)
    model_args, data_args = init_args(recipe.get("model")), init_args(recipe.get("data"))
    model_args.pop("teacher", None)
    if args.train_batch_size:
        data_args["batch_size"] = args.train_batch_size
    if args.minutes is None:
        args.minutes = float(model_args.get("time_budget_s") or 480) / 60
    precision = args.precision or str((recipe.get("trainer") or {}).get("precision", "32-true"))
    runs = sorted(RUNS, key=list(RUNS).index) if args.ablations else (args.runs or DEFAULT_RUNS)
    data_dir = default_data_dir(args.data_dir)
    torch.set_float32_matmul_precision("high")

    teacher = MMFormer.from_pretrained(args.teacher).eval()
    t_metrics = held_out_recall(teacher, data_dir)
    rows = [
        {
            "run": "teacher",
            "params": teacher.num_parameters(),
            "images_s": images_per_s(teacher, args.batch_size),
            "t2i": t_metrics["t2i_R@1"],
            "i2t": t_metrics["i2t_R@1"],
            "t2i10": t_metrics["t2i_R@10"],
            "metrics": t_metrics,
        }
    ]
    print(
        f"teacher {args.teacher}: held-out t2i R@1 {rows[0]['t2i']:.2f}; training {len(runs)} students for "
        f"{args.minutes:g} min each ({precision})",
        flush=True,
    )
    for run in runs:
        rows.append(train_run(run, args, model_args, data_args, precision, data_dir))
    for row in rows:
        row["of_teacher"] = 100 * row["t2i"] / rows[0]["t2i"] if rows[0]["t2i"] else float("nan")
        row["speedup"] = row["images_s"] / rows[0]["images_s"]
        row["param_ratio"] = 100 * row["params"] / rows[0]["params"]
    print()
    print(
        markdown_table(
            rows,
            [
                ("run", "run", 0),
                ("setting", "setting", 0),
                ("augment", "augment", 0),
                ("params", "params", 0),
                ("% of teacher params", "param_ratio", 1),
                (f"images/s (b{args.batch_size}, fp32)", "images_s", 0),
                ("x teacher", "speedup", 2),
                ("precision", "precision", 0),
                ("steps", "steps", 0),
                ("train min", "train_min", 1),
                ("t2i R@1", "t2i", 2),
                ("i2t R@1", "i2t", 2),
                ("t2i R@10", "t2i10", 2),
                ("% of teacher t2i R@1", "of_teacher", 1),
            ],
        )
    )
    print(
        f"\nheld-out family: the bundled test split; recipe {args.recipe}, {args.minutes:g} min per student, "
        f"seed {args.seed}"
    )
    print(machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n", encoding="utf-8")
    if args.csv:
        table = [{k: v for k, v in r.items() if k != "metrics"} for r in rows]
        print(f"wrote {write_csv(args.csv, [{**r, 'recipe': args.recipe, 'minutes': args.minutes} for r in table])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
