"""Same-time baseline: held-out-family retrieval of open_clip vs mmformer's demo recipe.

Given the same wall-clock training budget on this CPU, what text->image R@1 on the held-out
``twitter`` emoji family (never seen in training) does a plain open_clip CLIP of the same size
reach, next to mmformer trained with ``mmformer.demo.demo_recipe()``?

    python -m bench.baseline_recall --impl open_clip --minutes 10 --json oc.json
    python -m bench.baseline_recall --impl mmformer  --minutes 10 --json mm.json

Both impls share everything but the model (and its recipe): the train split of the bundled emoji
data through ``InMemoryImageText(train=True)`` (its light random-resized-crop augmentation, the
same normalisation), captions = concept names (the recipe's ``caption_mode``), the bundled
tokenizer (ids padded to the context length), ``mmformer.losses.clip_loss``, AdamW, linear warmup
then cosine to 0 over a step count calibrated to the budget (3 timed warm steps, data loading
included; steps = 0.95 * budget / step time), and the same evaluation (fp32, test split, one
concept name per image, ``retrieval_metrics``).

- ``--impl open_clip``: ``open_clip.model.CLIP`` built from config dicts (random init, nothing
  downloaded): the ``tiny`` trunk (width 256, 6 layers, 4 heads), patch 8 on 64 px, text context
  16, EOS pooling (see ``bench/common.py``); batch 256, lr 5e-4, wd 0.1, warmup 50 (defaults).
  Weight decay follows open_clip's training rule (all matrices, incl. embeddings, decay).
- ``--impl mmformer``: ``MMFormer`` on the ``tiny`` preset with ``demo_recipe()`` read at run time
  (its model overrides, batch, lr, weight decay, warmup, caption mode) and the AdamW
  betas/eps/min-lr defaults of ``MMFormerModule``; the warmup is capped at steps // 10 as the
  demo does. Flags given explicitly override the recipe and say so in the table's config column.

Prints one markdown table row (and the full metrics); asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.common import (
    PRECISIONS,
    Pair,
    add_csv_argument,
    build_open_clip,
    load_tokenizer,
    machine_line,
    markdown_table,
    num_params,
    write_csv,
)
from mmformer.config import get_config
from mmformer.data.emoji import EmojiData, InMemoryImageText, default_data_dir
from mmformer.losses import clip_loss
from mmformer.model import MMFormer
from mmformer.retrieval.metrics import retrieval_metrics
from mmformer.training.module import MMFormerModule
from mmformer.training.optim import warmup_cosine
from mmformer.training.precision import time_steps, train_step

# The reference baseline: an open_clip CLIP of width 256, 6 layers, patch 8 on 64 px, context 16.
OPEN_CLIP_DEFAULTS = {
    "preset": "tiny",
    "model_config": {"width": 256, "depth": 6, "heads": 4, "patch_size": 8, "embed_dim": 256},
    "batch_size": 256,
    "lr": 5e-4,
    "weight_decay": 0.1,
    "warmup_steps": 50,
    "caption_mode": "name",
    "betas": (0.9, 0.98),
    "eps": 1e-6,
    "min_lr_ratio": 0.0,
}


# ---- recipe ------------------------------------------------------------------------------------
def mmformer_recipe() -> dict[str, Any]:
    """``demo_recipe()`` as the demo trains it: preset ``tiny`` (hard-wired in the demo), the
    optimizer defaults of ``MMFormerModule`` for what the recipe does not set."""
    from mmformer.demo import demo_recipe

    defaults = {
        k: v.default
        for k, v in inspect.signature(MMFormerModule.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    recipe = {
        "preset": "tiny",
        "betas": tuple(defaults["betas"]),
        "eps": defaults["eps"],
        "min_lr_ratio": defaults["min_lr_ratio"],
        "weight_decay": defaults["weight_decay"],
        "warmup_steps": defaults["warmup_steps"],
        "lr": defaults["lr"],
        "caption_mode": "name",
    }
    recipe.update(demo_recipe())
    recipe["model_config"] = dict(recipe.get("model_config") or {})
    return recipe


def resolve_recipe(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """(recipe, names of the recipe fields the command line overrode)."""
    recipe = mmformer_recipe() if args.impl == "mmformer" else copy.deepcopy(OPEN_CLIP_DEFAULTS)
    overridden = []
    for flag, key in (
        ("batch_size", "batch_size"),
        ("lr", "lr"),
        ("weight_decay", "weight_decay"),
        ("warmup", "warmup_steps"),
    ):
        value = getattr(args, flag)
        if value is not None and value != recipe[key]:
            recipe[key] = value
            overridden.append(key)
    if args.model_config:
        recipe["model_config"].update(json.loads(args.model_config))
        overridden.append("model_config")
    if args.patch_size is not None and args.patch_size != recipe["model_config"].get("patch_size"):
        recipe["model_config"]["patch_size"] = args.patch_size
        overridden.append("patch_size")
    return recipe, overridden


def describe(cfg, recipe: dict[str, Any], overridden: list[str], impl: str) -> str:
    s = (
        f"w{cfg.width} d{cfg.depth} h{cfg.heads} p{cfg.patch_size}@{cfg.image_size}px T{cfg.context_length} "
        f"lr {recipe['lr']:g} wd {recipe['weight_decay']:g}"
    )
    if impl == "mmformer":
        s += f" share={cfg.share} (demo_recipe()" + (f", overridden: {','.join(overridden)})" if overridden else ")")
    elif overridden:
        s += f" (overridden: {','.join(overridden)})"
    return s


# ---- data --------------------------------------------------------------------------------------
class Collate:
    """Samples of ``InMemoryImageText`` -> (images (B, 3, S, S), ids (B, T), mask (B, T), concepts (B,)).
    Ids are padded to T = the context length, so every step has the same shapes for both impls."""

    def __init__(self, tokenizer, context_length: int, batch_transform=None) -> None:
        self.tokenizer, self.t, self.batch_transform = tokenizer, context_length, batch_transform

    def __call__(self, samples: list[dict[str, Any]]):
        ids, mask = self.tokenizer([s["caption"] for s in samples], max_length=self.t, pad_to_max=True)
        images = torch.stack([s["image"] for s in samples])
        if self.batch_transform is not None:  # the demo's batched augmentation of uint8 images
            images = self.batch_transform(images)
        return (images, ids, mask, torch.tensor([s["concept"] for s in samples], dtype=torch.long))


def train_loader(cfg, recipe: dict[str, Any], tokenizer, seed: int, data_dir=None) -> DataLoader:
    data = EmojiData.load(default_data_dir(data_dir), "train", cfg.image_size)
    ds = InMemoryImageText(
        data, train=True, caption_mode=recipe["caption_mode"], mean=cfg.image_mean, std=cfg.image_std
    )
    if len(ds) < recipe["batch_size"]:
        raise ValueError(f"batch size {recipe['batch_size']} exceeds the {len(ds)} training images")
    # num_workers=0: on a 2-core machine worker processes would compete with the step's threads.
    return DataLoader(
        ds,
        batch_size=recipe["batch_size"],
        shuffle=True,
        drop_last=True,
        num_workers=0,
        collate_fn=Collate(tokenizer, cfg.context_length, ds.batch_transform),
        generator=torch.Generator().manual_seed(seed),
    )


def forever(loader: DataLoader):
    while True:
        yield from loader


# ---- training ----------------------------------------------------------------------------------
def make_step(pair: Pair, opt: torch.optim.Optimizer, precision: str, positives: bool) -> Callable[[Any], torch.Tensor]:
    """The library's training step (:func:`mmformer.training.precision.train_step`) of ``pair``:
    ``step(batch)`` runs forward, ``clip_loss`` (``positives``: same-concept pairs are not
    negatives), backward and ``opt``'s step, and returns the loss."""

    def loss_of(batch) -> torch.Tensor:
        images, ids, mask, concepts = batch
        img, txt, scale = pair(images, ids, mask)
        return clip_loss(img, txt, scale, positives=concepts if positives else None)

    return train_step(loss_of, opt, PRECISIONS[precision])


def make_optimizer(pair: Pair, recipe: dict[str, Any], lr: float) -> torch.optim.AdamW:
    decay, no_decay = pair.parameter_groups()
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=tuple(recipe["betas"]),
        eps=recipe["eps"],
    )


def calibrate(
    pair: Pair,
    recipe: dict[str, Any],
    batches,
    budget_s: float,
    precision: str,
    positives: bool,
    fraction: float = 0.95,
) -> tuple[int, float]:
    """(steps, seconds per step): one untimed + 3 timed steps on a copy (lr ~ 0), each including
    fetching its batch; step time = their median (:func:`mmformer.training.precision.time_steps`)."""
    twin = Pair(pair.impl, copy.deepcopy(pair.model).train(), pair.max_scale)
    step = make_step(twin, make_optimizer(twin, recipe, lr=1e-12), precision, positives)
    step_s = time_steps(lambda: step(next(batches)), steps=3, warmup=1)
    return max(1, int(fraction * budget_s / step_s)), step_s


# ---- evaluation --------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(pair: Pair, cfg, tokenizer, data_dir=None) -> tuple[dict[str, float], int]:
    """Retrieval metrics on the test split (held-out family), fp32, one concept name per image."""
    pair.model.eval()
    data = EmojiData.load(default_data_dir(data_dir), "test", cfg.image_size)
    ds = InMemoryImageText(data, train=False, mean=cfg.image_mean, std=cfg.image_std)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])  # (N, 3, S, S)
    image_emb = torch.cat([pair.encode_image(images[i : i + 256]).float() for i in range(0, len(ds), 256)])
    captions = ds.captions
    text_emb = []
    for i in range(0, len(captions), 512):
        ids, mask = tokenizer(captions[i : i + 512], max_length=cfg.context_length, pad_to_max=True)
        text_emb.append(pair.encode_text(ids, mask).float())
    return retrieval_metrics(image_emb, torch.cat(text_emb), ds.caption_to_image), len(ds)


# ---- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--impl", choices=("open_clip", "mmformer"), required=True)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget (default: 10)")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (skips calibration)")
    p.add_argument("--batch-size", type=int, default=None, help="default: open_clip 256, mmformer demo_recipe()'s")
    p.add_argument("--lr", type=float, default=None, help="default: open_clip 5e-4, mmformer demo_recipe()'s")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 0.1 / demo_recipe()'s")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warmup steps (default: 50 / demo_recipe()'s, capped at steps // 10 like the demo)",
    )
    p.add_argument("--patch-size", type=int, default=None, help="default: open_clip 8, mmformer demo_recipe()'s")
    p.add_argument(
        "--model-config", default=None, help='JSON overrides of the model config, e.g. \'{"width": 192, "depth": 4}\''
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = CPU autocast")
    p.add_argument(
        "--concept-positives",
        choices=("auto", "on", "off"),
        default="auto",
        help="don't use same-concept pairs in a batch as negatives; auto = on for mmformer "
        "(the demo's module does it), off for open_clip (its plain recipe)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the bundled one)")
    p.add_argument("--data-dir", default=None, help="the emoji data (default: the bundled copy)")
    p.add_argument("--json", default=None, help="also write the row, metrics and recipe as JSON here")
    add_csv_argument(p)
    args = p.parse_args(argv)
    args.concept_positives = args.concept_positives == "on" or (
        args.concept_positives == "auto" and args.impl == "mmformer"
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # as the demo does (no effect on fp32 CPU matmuls)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    tok, tok_source = load_tokenizer(args.tokenizer)
    recipe, overridden = resolve_recipe(args)
    cfg = get_config(recipe["preset"], vocab_size=tok.vocab_size, **recipe["model_config"])
    model = MMFormer(cfg, tok) if args.impl == "mmformer" else build_open_clip(cfg, tok.vocab_size)
    pair = Pair(args.impl, model.train())
    config = describe(cfg, recipe, overridden, args.impl) + (" +concept positives" if args.concept_positives else "")
    print(
        f"{args.impl}: {config}; {num_params(model) / 1e6:.2f} M params; tokenizer {tok.vocab_size} "
        f"pieces ({tok_source})",
        flush=True,
    )

    print("loading the train split ...", flush=True)
    loader = train_loader(cfg, recipe, tok, args.seed, args.data_dir)
    batches = forever(loader)
    budget_s = args.minutes * 60
    if args.steps:
        steps, step_s = args.steps, float("nan")
    else:
        steps, step_s = calibrate(pair, recipe, batches, budget_s, args.precision, args.concept_positives)
    warmup = args.warmup if args.warmup is not None else min(recipe["warmup_steps"], max(1, steps // 10))
    warmup = max(1, min(warmup, steps))
    print(
        f"training {steps} steps of batch {recipe['batch_size']} ({len(loader.dataset)} images, "
        f"{args.precision}, warmup {warmup}"
        + (f", ~{step_s:.2f} s/step calibrated for {args.minutes:g} min" if not math.isnan(step_s) else "")
        + ")",
        flush=True,
    )

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    opt = make_optimizer(pair, recipe, lr=recipe["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, steps, recipe["min_lr_ratio"]))
    losses: list[float] = []
    hard_stop = budget_s * 1.25 + 30 if not args.steps else float("inf")  # a contended machine
    report_every = max(1, steps // 10)
    t0 = time.perf_counter()
    train = make_step(pair, opt, args.precision, args.concept_positives)
    for step in range(steps):
        losses.append(float(train(next(batches))))
        sched.step()
        elapsed = time.perf_counter() - t0
        if (step + 1) % report_every == 0 or step + 1 == steps:
            print(
                f"  step {step + 1}/{steps}  loss {statistics.fmean(losses[-report_every:]):.3f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {elapsed:.0f} s",
                flush=True,
            )
        if elapsed > hard_stop:
            print(f"  stopping early at step {step + 1}: {elapsed:.0f} s is past 1.25x the budget", flush=True)
            break
    train_s = time.perf_counter() - t0
    done = len(losses)
    if not all(map(math.isfinite, losses)):
        print("  warning: non-finite training loss", flush=True)

    print("evaluating on the held-out test family ...", flush=True)
    t_eval = time.perf_counter()
    metrics, n_test = evaluate(pair, cfg, tok, args.data_dir)
    eval_s = time.perf_counter() - t_eval

    k = min(10, done)
    row = {
        "impl": args.impl,
        "config": config,
        "steps": done,
        "batch": recipe["batch_size"],
        "samples_seen": done * recipe["batch_size"],
        "train_minutes": train_s / 60,
        "samples_per_s": done * recipe["batch_size"] / train_s,
        "t2i_R@1": metrics["t2i_R@1"],
        "t2i_R@5": metrics["t2i_R@5"],
        "t2i_R@10": metrics["t2i_R@10"],
        "i2t_R@1": metrics["i2t_R@1"],
        "chance_R@1": metrics["t2i_chance_R@1"],
        "loss": f"{statistics.fmean(losses[:k]):.2f}->{statistics.fmean(losses[-k:]):.2f}",
    }
    print()
    print(
        markdown_table(
            [row],
            [
                ("impl", "impl", 0),
                ("config", "config", 0),
                ("steps", "steps", 0),
                ("batch", "batch", 0),
                ("samples seen", "samples_seen", 0),
                ("train min", "train_minutes", 2),
                ("samples/s", "samples_per_s", 1),
                ("t2i R@1", "t2i_R@1", 2),
                ("t2i R@5", "t2i_R@5", 2),
                ("t2i R@10", "t2i_R@10", 2),
                ("i2t R@1", "i2t_R@1", 2),
                ("chance R@1", "chance_R@1", 3),
                ("loss first->last 10", "loss", 0),
            ],
        )
    )
    print()
    print(
        f"test = held-out family ({n_test} images, one concept name each; evaluated in fp32 in "
        f"{eval_s:.0f} s); {args.precision} training, seed {args.seed}, budget {args.minutes:g} min"
    )
    print(machine_line())
    if args.json:
        out = {
            "row": row,
            "metrics": metrics,
            "recipe": {**recipe, "warmup_steps_used": warmup},
            "overridden": overridden,
            "model_config": cfg.to_dict(),
            "params": num_params(model),
            "precision": args.precision,
            "seed": args.seed,
            "budget_minutes": args.minutes,
            "calibrated_step_s": None if math.isnan(step_s) else step_s,
            "planned_steps": steps,
            "eval_seconds": eval_s,
            "losses": losses,
            "tokenizer": tok_source,
            "machine": machine_line(),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    if args.csv:
        print(f"wrote {write_csv(args.csv, [{**row, 'precision': args.precision, 'seed': args.seed}])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
