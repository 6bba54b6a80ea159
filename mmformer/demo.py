"""``mmformer demo``: the main job on the bundled data.

Trains the ``tiny`` preset (at the depth the shipped ``tiny-cpu`` recipe sets) on four emoji
drawing families for a fixed time budget on the CPU, saves it as a ``save_pretrained``
directory, evaluates text<->image retrieval on the held-out fifth family (never seen in
training) next to chance, and answers a few text queries with a PNG grid of the retrieved images.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from mmformer.training.datamodule import ImageTextDataModule, SkippedSamplesCallback
from mmformer.data.emoji import InMemoryImageText, default_data_dir
from mmformer.files import atomic_path, write_text_atomic
from mmformer.retrieval import embed_images, embed_texts, format_metrics, retrieval_metrics
from mmformer.runtime import flush_denormals, keep_freed_memory
from mmformer.training.module import MMFormerModule
from mmformer.training.precision import auto_precision
from mmformer.training.recipes import init_args, load_recipe
from mmformer.training.trainer import make_trainer

log = logging.getLogger(__name__)


def demo_recipe(name_or_path: str | Path | None = None) -> dict:
    """The model and data settings the demo trains with: those of a fit recipe (default: the
    shipped ``tiny-cpu``, ``train/tiny-cpu.yaml``; see README "Results" for what it reaches and how
    it was chosen), as ``{"preset", "model_config", "batch_size", "lr", "weight_decay",
    "warmup_steps", "caption_mode", "module_args", "data_args"}``: ``module_args`` are all the
    recipe's :class:`MMFormerModule` arguments (loss, ...), ``data_args`` all its data arguments.
    The recipe's trainer section (steps, precision) is not used: the demo trains for its budget."""
    recipe = load_recipe(name_or_path or DEMO_RECIPE_NAME)
    model, data = init_args(recipe.get("model")), init_args(recipe.get("data"))
    module_args = {k: v for k, v in model.items() if k != "time_budget_s"}
    data_args = {k: v for k, v in data.items() if k not in ("data_dir", *DATA_FROM_MODEL)}
    return {"preset": model.get("preset", "tiny"), "model_config": dict(model.get("model_config") or {}),
            "batch_size": data["batch_size"], "lr": model["lr"], "weight_decay": model["weight_decay"],
            "warmup_steps": model["warmup_steps"], "caption_mode": data.get("caption_mode", "name"),
            "module_args": module_args, "data_args": data_args}


#: Data arguments the demo takes from the built model, not from the recipe.
DATA_FROM_MODEL = ("image_size", "max_length", "image_mean", "image_std")
DEMO_RECIPE_NAME = "tiny-cpu"
DEMO_RECIPE = demo_recipe()
DEFAULT_QUERIES = ["red apple", "dog face", "rocket", "smiling face with heart-eyes", "flag: japan"]


def demo_process_settings(seed: int) -> None:
    """The process settings the demo trains under: the seed, matmul precision, and the CPU settings
    `mmformer fit` applies (denormals flushed, freed memory kept: :mod:`mmformer.runtime`)."""
    import lightning as L

    L.seed_everything(seed, verbose=False)
    torch.set_float32_matmul_precision("high")
    flush_denormals()
    keep_freed_memory()


def demo_training(recipe: dict, data_dir: str | Path,
                  time_budget_s: float | None = None) -> tuple[MMFormerModule, ImageTextDataModule]:
    """The module and data module of a :func:`demo_recipe` on the emoji data in ``data_dir``, the
    data's image size, text length and normalisation taken from the model; the data module is not
    set up yet. ``time_budget_s``: the module's learning-rate clock (None: by steps)."""
    module = MMFormerModule(**{**recipe["module_args"], "time_budget_s": time_budget_s})
    c = module.model.config
    dm = ImageTextDataModule(**{**recipe["data_args"], "batch_size": recipe["batch_size"]}, data_dir=str(data_dir),
                             image_size=c.image_size, max_length=c.context_length,
                             image_mean=c.image_mean, image_std=c.image_std)
    dm.set_tokenizer(module.tokenizer)
    return module, dm


def run_demo(args: argparse.Namespace) -> int:
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    data_dir = default_data_dir(getattr(args, "data_dir", None))  # --data-dir, $MMFORMER_DATA or the bundled copy
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo_process_settings(args.seed)
    recipe = demo_recipe(args.recipe) if getattr(args, "recipe", None) else dict(DEMO_RECIPE)
    if args.batch_size:
        recipe["batch_size"] = args.batch_size

    budget_s = None if args.steps else args.minutes * 60
    module, dm = demo_training(recipe, data_dir, budget_s)
    c = module.model.config
    print(f"model: the {recipe['preset']} preset, {c.width} wide x {c.depth} blocks, "
          f"{module.model.num_parameters() / 1e6:.2f} M parameters (recipe {args.recipe or DEMO_RECIPE_NAME})",
          flush=True)
    print(f"loading the bundled emoji data from {data_dir} ...", flush=True)
    dm.setup("fit")
    print(f"  train: {len(dm.train_dataset)} images of 4 families; val: {len(dm.val_dataset)} images "
          "(held-out concepts)", flush=True)
    precision = args.precision
    if precision == "auto":
        choice = auto_precision(module, dm)
        precision = choice.precision
        print(choice.reason(), flush=True)
    else:
        print(f"precision {precision} (as given)", flush=True)

    if args.steps:
        module.hparams.warmup_steps = min(recipe["warmup_steps"], max(1, args.steps // 10))
        print(f"training {args.steps} steps of batch {recipe['batch_size']}", flush=True)
    else:
        print(f"training for {args.minutes:g} min of batch {recipe['batch_size']} (the learning rate "
              "follows the clock: warmup, then cosine to zero at the end of the budget)", flush=True)

    trainer = make_trainer(
        max_steps=args.steps or -1, precision=precision, logger=CSVLogger(out, name="logs"),
        callbacks=[TQDMProgressBar(refresh_rate=5), SkippedSamplesCallback()], enable_progress_bar=True,
        check_val_every_n_epoch=5, num_sanity_val_steps=0, max_time={"seconds": budget_s} if budget_s else None,
    )
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    train_s = time.perf_counter() - t0
    model_dir = module.export(out / "model")
    print(f"trained in {train_s / 60:.1f} min; saved the model to {model_dir}", flush=True)

    results = evaluate_and_search(module.model.eval(), out, args.query or DEFAULT_QUERIES, data_dir)
    results.update({"train_seconds": train_s, "steps": trainer.global_step, "precision": precision,
                    "batch_size": recipe["batch_size"]})
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return 0


def evaluate_and_search(model, out: Path, queries: list[str], data_dir: Path | None = None) -> dict:
    """Held-out-family retrieval metrics (printed next to chance) and a PNG grid of text queries
    (``data_dir``: the emoji data; None = :func:`~mmformer.data.emoji.default_data_dir`)."""

    c = model.config
    ds = InMemoryImageText.eval_split("test", c.image_size, c.image_mean, c.image_std, root=data_dir)
    data = ds.data
    images = ds.stacked_images()
    image_emb = embed_images(model, images, batch_size=256)
    text_emb = embed_texts(model, model.tokenizer, ds.captions, batch_size=512)
    metrics = retrieval_metrics(image_emb, text_emb, ds.caption_to_image)
    print()
    print(format_metrics(metrics, f"the held-out '{data.families[0] if len(set(data.families)) == 1 else 'test'}' "
                                  f"family, never seen in training ({len(ds)} images, one name each)"))

    q_emb = embed_texts(model, model.tokenizer, queries)
    scores, idx = (q_emb @ image_emb.T).topk(5, dim=1)
    print("\ntext -> image search over the held-out family (top 5):")
    for q, row in zip(queries, idx.tolist()):
        print(f"  {q!r:<34} -> " + " | ".join(ds.captions[i] for i in row))
    grid = out / "search.png"
    write_grid(grid, queries, [[data.images[i] for i in row] for row in idx.tolist()],
               [[ds.captions[i] for i in row] for row in idx.tolist()])
    print(f"\nwrote the search results as a picture: {grid}")
    return {"test_metrics": metrics,
            "queries": {q: [ds.captions[i] for i in row] for q, row in zip(queries, idx.tolist())}}


def write_grid(path: Path, queries: list[str], images: list[list[torch.Tensor]], labels: list[list[str]],
               cell: int = 96) -> None:
    """One row per query: the query text, then its retrieved images with their names."""
    from PIL import Image, ImageDraw

    label_w, text_h = 220, 14
    W, H = label_w + cell * max(len(r) for r in images), (cell + text_h) * len(queries)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (q, row, names) in enumerate(zip(queries, images, labels)):
        y = r * (cell + text_h)
        draw.text((6, y + cell // 2 - 6), q[:34], fill="black")
        for c, (img, name) in enumerate(zip(row, names)):
            pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((cell - 16, cell - 16), Image.NEAREST)
            canvas.paste(pil, (label_w + c * cell + 8, y + 4))
            draw.text((label_w + c * cell + 4, y + cell - 8), name[:15], fill=(60, 60, 60))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
