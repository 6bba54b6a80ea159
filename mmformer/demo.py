"""``mmformer demo``: the main job on the bundled data.

Trains the ``tiny`` preset (at the depth the shipped ``tiny-cpu`` recipe sets) on four emoji
drawing families for a fixed time budget on the CPU, saves it as a ``save_pretrained``
directory, evaluates text<->image retrieval on the held-out fifth family (never seen in
training) next to chance, and answers a few text queries with a PNG grid of the retrieved images.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the functions import them: `mmformer demo --help` loads neither torch nor Lightning
    import torch

    from mmformer.training.recipes import RecipeCLI

DEMO_RECIPE_NAME = "tiny-cpu"
DEFAULT_QUERIES = ["red apple", "dog face", "rocket", "smiling face with heart-eyes", "flag: japan"]


def demo_recipe(name_or_path: str | Path | None = None) -> dict:
    """The model and data settings of a fit recipe (default: the shipped ``tiny-cpu``) as plain
    values, for scripts that train the demo's model outside the demo (bench/):
    ``{"preset", "model_config", "batch_size", "lr", "weight_decay", "warmup_steps",
    "caption_mode", "module_args", "data_args"}``. The demo itself builds its objects from the
    recipe with :func:`demo_cli`."""
    from mmformer.training.recipes import init_args, load_recipe

    recipe = load_recipe(name_or_path or DEMO_RECIPE_NAME)
    model, data = init_args(recipe.get("model")), init_args(recipe.get("data"))
    module_args = {k: v for k, v in model.items() if k != "time_budget_s"}
    data_args = {
        k: v for k, v in data.items() if k not in ("data_dir", "image_size", "max_length", "image_mean", "image_std")
    }
    return {
        "preset": model.get("preset", "tiny"),
        "model_config": dict(model.get("model_config") or {}),
        "batch_size": data["batch_size"],
        "lr": model["lr"],
        "weight_decay": model["weight_decay"],
        "warmup_steps": model["warmup_steps"],
        "caption_mode": data.get("caption_mode", "name"),
        "module_args": module_args,
        "data_args": data_args,
    }


def demo_process_settings(seed: int) -> None:
    """The process settings the demo trains under: the seed, matmul precision, and the CPU settings
    `mmformer fit` applies (denormals flushed, freed memory kept: :mod:`mmformer.runtime`)."""
    import lightning as L
    import torch

    from mmformer.runtime import flush_denormals, keep_freed_memory

    L.seed_everything(seed, verbose=False)
    torch.set_float32_matmul_precision("high")
    flush_denormals()
    keep_freed_memory()


def demo_cli(
    recipe: str | Path | None,
    data_dir: str | Path,
    out: str | Path,
    *,
    steps: int | None = None,
    time_budget_s: float | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    seed: int = 0,
    announce: Callable[[str], None] = print,
    extra: Sequence[str] = (),
) -> RecipeCLI:
    """The module, data module and Trainer of the fit recipe ``recipe`` (default ``tiny-cpu``),
    built by :class:`~mmformer.training.recipes.RecipeCLI` (``run=False``) as ``mmformer fit``
    builds them, on the emoji data in ``data_dir``, with the demo's run settings in place of the
    recipe's: ``steps`` optimizer steps, or a ``time_budget_s`` wall-clock budget that the learning
    rate follows; ``precision`` (``auto``: measured, the choice passed to ``announce``); a CSV
    logger and a progress bar under ``out``, no checkpoints; validation every 5 epochs."""
    from mmformer.training.recipes import RecipeCLI

    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "logs"}}
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 5}},
        {"class_path": "mmformer.training.datamodule.SkippedSamplesCallback"},
    ]
    argv = [
        "--config",
        str(recipe or DEMO_RECIPE_NAME),
        f"--seed_everything={seed}",
        f"--data.data_dir={data_dir}",
        f"--model.time_budget_s={json.dumps(time_budget_s)}",
        f"--trainer.precision={precision}",
        f"--trainer.max_steps={steps or -1}",
        f"--trainer.max_time={json.dumps({'seconds': time_budget_s} if time_budget_s else None)}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger={json.dumps(logger)}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=true",
        "--trainer.enable_model_summary=false",
        "--trainer.check_val_every_n_epoch=5",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.max_epochs=-1",
        *([f"--data.batch_size={batch_size}"] if batch_size else []),
        *extra,
    ]
    return RecipeCLI(argv, run=False, announce=announce)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mmformer demo``."""
    p.add_argument("--out", default="runs/demo", help="output folder (model, logs, grid PNG)")
    p.add_argument(
        "--minutes", type=float, default=8.0, help="training budget in minutes; the step count is calibrated to fit it"
    )
    p.add_argument("--steps", type=int, default=None, help="exact number of optimizer steps (overrides --minutes)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--recipe",
        default=None,
        help="fit recipe (file or shipped name) the demo trains with (default: tiny-cpu); the demo sets "
        "the steps or time, precision, logger and callbacks",
    )
    p.add_argument(
        "--precision",
        default="auto",
        help="auto (time a few steps of each on this CPU, keep the faster) | 32-true | bf16-mixed",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query", action="append", default=None, help="text query to search (repeatable)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="the bundled emoji data: its folder, or a folder holding emoji/ such as a checkout's data/ "
        "(default: $MMFORMER_DATA, else the checkout's copy, else the installed package's)",
    )


def demo_command(
    *,
    out: str = "runs/demo",
    minutes: float = 8.0,
    steps: int | None = None,
    batch_size: int | None = None,
    recipe: str | None = None,
    precision: str = "auto",
    seed: int = 0,
    query: list[str] | None = None,
    data_dir: str | None = None,
) -> int:
    """``mmformer demo``: train the recipe's model on the bundled emoji data for ``steps`` steps or
    ``minutes``, save it under ``out``, report held-out recall and answer ``query`` texts with a
    PNG grid."""
    from mmformer.data.bundled import BundledDataNotFound
    from mmformer.data.emoji import default_data_dir
    from mmformer.files import write_text_atomic

    for flag, value in (("--steps", steps), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    try:
        root = default_data_dir(data_dir)  # --data-dir, $MMFORMER_DATA or the bundled copy
    except BundledDataNotFound as e:
        raise SystemExit(f"mmformer demo: {e}") from e
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    demo_process_settings(seed)
    budget_s = None if steps else minutes * 60
    print(f"loading the bundled emoji data from {root} and the recipe {recipe or DEMO_RECIPE_NAME} ...", flush=True)
    chosen: list[str] = []
    cli = demo_cli(
        recipe,
        root,
        out_dir,
        steps=steps,
        time_budget_s=budget_s,
        batch_size=batch_size,
        precision=precision,
        seed=seed,
        announce=chosen.append,
    )
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    c = module.model.config
    print(
        f"model: the {getattr(module.hparams, 'preset', 'tiny')} preset, {c.width} wide x {c.depth} blocks, "
        f"{module.model.num_parameters() / 1e6:.2f} M parameters",
        flush=True,
    )
    dm.setup("fit")
    print(
        f"  train: {len(dm.train_dataset)} images of 4 families; val: {len(dm.val_dataset)} images (held-out concepts)",
        flush=True,
    )
    print(*chosen or [f"precision {precision} (as given)"], sep="\n", flush=True)
    batch = dm.hparams.batch_size
    if steps:
        module.hparams.warmup_steps = min(module.hparams.warmup_steps, max(1, steps // 10))
        print(f"training {steps} steps of batch {batch}", flush=True)
    else:
        print(
            f"training for {minutes:g} min of batch {batch} (the learning rate follows the clock: warmup, then "
            "cosine to zero at the end of the budget)",
            flush=True,
        )
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    train_s = time.perf_counter() - t0
    model_dir = module.export(out_dir / "model")
    print(f"trained in {train_s / 60:.1f} min; saved the model to {model_dir}", flush=True)

    results = evaluate_and_search(module.model.eval(), out_dir, query or DEFAULT_QUERIES, root)
    results.update(
        {
            "train_seconds": train_s,
            "steps": trainer.global_step,
            "precision": cli.precision_choice.precision if cli.precision_choice else precision,
            "batch_size": batch,
        }
    )
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    return 0


def evaluate_and_search(model, out: Path, queries: list[str], data_dir: Path | None = None) -> dict:
    """Held-out-family retrieval metrics (printed next to chance) and a PNG grid of text queries
    (``data_dir``: the emoji data; None = :func:`~mmformer.data.emoji.default_data_dir`)."""
    from mmformer.data.emoji import InMemoryImageText
    from mmformer.retrieval import embed_images, embed_texts, format_metrics, retrieval_metrics

    c = model.config
    ds = InMemoryImageText.eval_split("test", c.image_size, c.image_mean, c.image_std, root=data_dir)
    data = ds.data
    images = ds.stacked_images()
    image_emb = embed_images(model, images, batch_size=256)
    text_emb = embed_texts(model, model.tokenizer, ds.captions, batch_size=512)
    metrics = retrieval_metrics(image_emb, text_emb, ds.caption_to_image)
    print()
    print(
        format_metrics(
            metrics,
            f"the held-out '{data.families[0] if len(set(data.families)) == 1 else 'test'}' "
            f"family, never seen in training ({len(ds)} images, one name each)",
        )
    )

    q_emb = embed_texts(model, model.tokenizer, queries)
    scores, idx = (q_emb @ image_emb.T).topk(5, dim=1)
    print("\ntext -> image search over the held-out family (top 5):")
    for q, row in zip(queries, idx.tolist()):
        print(f"  {q!r:<34} -> " + " | ".join(ds.captions[i] for i in row))
    grid = out / "search.png"
    write_grid(
        grid,
        queries,
        [[data.images[i] for i in row] for row in idx.tolist()],
        [[ds.captions[i] for i in row] for row in idx.tolist()],
    )
    print(f"\nwrote the search results as a picture: {grid}")
    return {
        "test_metrics": metrics,
        "queries": {q: [ds.captions[i] for i in row] for q, row in zip(queries, idx.tolist())},
    }


def write_grid(
    path: Path, queries: list[str], images: list[list[torch.Tensor]], labels: list[list[str]], cell: int = 96
) -> None:
    """One row per query: the query text, then its retrieved images with their names."""
    from PIL import Image, ImageDraw

    from mmformer.files import atomic_path

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
