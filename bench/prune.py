"""Head pruning: held-out recall and encoder speed of a trained model after removing 10-50% of its
attention heads, by gradient or magnitude importance, with and without recovery fine-tuning.

    python -m bench.prune --model runs/demo/model                      # after `mmformer demo`
    python -m bench.prune --model runs/demo/model --recover 0,200 --fractions 0.1,0.3,0.5
    python -m bench.prune --model runs/distill/model --fractions 0,0.3 --normalize none,block --recover 0,500

Per row: the heads chosen from ``--batches`` batches of the bundled emoji training split
(:func:`mmformer.compress.prune.head_importance`, computed once per criterion on the unpruned
model; ranked raw or after dividing each block's scores by their L2 norm, ``--normalize``),
removed for real (:func:`~mmformer.compress.prune.prune_heads`), optionally recovered by ``N``
steps of CLIP loss + affinity distillation from the unpruned model on batches of the whole
training split, augmented, epoch after epoch, through the Lightning Trainer
(:func:`mmformer.training.prune.recover`, :func:`~mmformer.training.prune.pruning_datamodule`).
Fraction 0 is the control: the unpruned model given the same recovery steps, which tells what
the recovery training alone is worth to a model trained for a short budget. Recall: text->image and image->text R@1 on the bundled
held-out family (never seen in training), computed as ``mmformer eval`` and ``mmformer demo`` do
(:func:`mmformer.retrieval.evaluate_retrieval`). Speed: ``encode_image`` / ``encode_text`` of
batches of ``--speed-batch`` held-out images and captions, the fastest of at least ``--repeats``
timed passes after a warm-up, all rows in one process, so the ratios to the unpruned row compare
like with like.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench.common import add_csv_argument, best_rate, machine_line, markdown_table, write_csv
from mmformer.compress.prune import CRITERIA, head_importance, normalize_per_block, prune_heads, select_heads
from mmformer.data.emoji import InMemoryImageText, default_data_dir
from mmformer.model import MMFormer
from mmformer.retrieval import evaluate_retrieval
from mmformer.training.precision import auto_precision
from mmformer.training.prune import pruning_datamodule, recover, scoring_batches


def csv_of(text: str, kind):
    return [kind(v) for v in text.split(",") if v.strip()]


def measure(
    model: MMFormer,
    held_out: InMemoryImageText,
    images: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    repeats: int,
    min_seconds: float = 1.0,
) -> dict:
    """Held-out R@1 both ways and images/s, texts/s of one batch each."""
    model.eval()
    m = evaluate_retrieval(
        model, model.tokenizer, held_out.stacked_images(), held_out.captions, held_out.caption_to_image, batch_size=256
    )
    b = images.shape[0]
    return {
        "t2i": m["t2i_R@1"],
        "i2t": m["i2t_R@1"],
        "chance": m["t2i_chance_R@1"],
        "params": model.num_parameters() / 1e6,
        "img_s": best_rate(lambda: model.encode_image(images), b, repeats, min_seconds),
        "txt_s": best_rate(lambda: model.encode_text(ids, mask), b, repeats, min_seconds),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/model", help="trained save_pretrained directory")
    p.add_argument("--fractions", default="0.1,0.2,0.3,0.4,0.5", help="fractions of all heads to remove")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--recover", default="0,200", help="recovery steps per row (0 = no recovery)")
    p.add_argument("--normalize", default="none,block", help="score normalisations before the ranking: none, block")
    p.add_argument("--batches", type=int, default=8, help="training batches for the gradient importance")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per batch (importance and recovery)")
    p.add_argument(
        "--lr",
        type=float,
        default=8e-4,
        help="recovery learning rate (cosine decay to 0; default: the shipped recipes' training rate)",
    )
    p.add_argument(
        "--schedule", default="cosine", choices=["cosine", "constant"], help="recovery learning rate schedule"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "32-true", "bf16-mixed"],
        help="recovery precision (auto: timed on the unpruned model, as `mmformer prune` does)",
    )
    p.add_argument("--speed-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="keep timing a measurement (up to 200 calls) until this many seconds have passed (default: 1)",
    )
    p.add_argument("--data-dir", default=None)
    add_csv_argument(p)
    args = p.parse_args(argv)
    fractions, criteria, recoveries = (
        csv_of(args.fractions, float),
        csv_of(args.criteria, str),
        csv_of(args.recover, int),
    )
    normalizations = csv_of(args.normalize, str)
    bad = [c for c in criteria if c not in CRITERIA] + [n for n in normalizations if n not in ("none", "block")]
    if bad:
        raise SystemExit(f"unknown criteria or normalisations {bad}; choose from {CRITERIA} and none, block")

    t_start = time.time()
    torch.manual_seed(0)
    model = MMFormer.from_pretrained(args.model).eval()
    c = model.config
    data_dir = default_data_dir(args.data_dir)
    held_out = InMemoryImageText.eval_split("test", c.image_size, c.image_mean, c.image_std, root=data_dir)
    n = min(args.speed_batch, len(held_out))
    images = held_out.stacked_images()[:n]
    ids, mask = model.tokenizer(held_out.captions[:n], max_length=c.context_length)
    dm = pruning_datamodule(model, data_dir=str(data_dir), batch_size=args.batch_size)
    batches = scoring_batches(dm, args.batches)
    print(
        f"{args.model}: {c.depth} blocks x {c.heads} heads, {model.num_parameters() / 1e6:.2f} M parameters; "
        f"{len(batches)} training batches of {args.batch_size}; held-out family: {len(held_out)} images",
        flush=True,
    )

    precision, recovery_precision = args.precision, "fp32"
    if any(recoveries):
        choice = auto_precision(model, dm) if args.precision == "auto" else None
        precision = choice.precision if choice else args.precision
        recovery_precision = "fp32" if precision == "32-true" else "bf16 autocast"
        print(f"recovery in {recovery_precision}" + (f" ({choice.reason()})" if choice else ""), flush=True)
    base = measure(model, held_out, images, ids, mask, args.repeats, args.min_seconds)
    rows = [
        {
            "criterion": "(unpruned)",
            "norm": "-",
            "removed": "0%",
            "heads": str(c.heads_per_block),
            "steps": 0,
            **base,
            "img_x": 1.0,
            "txt_x": 1.0,
        }
    ]
    print(
        f"unpruned: t2i R@1 {base['t2i']:.2f}, i2t R@1 {base['i2t']:.2f}, {base['img_s']:.0f} images/s, "
        f"{base['txt_s']:.0f} texts/s",
        flush=True,
    )
    plans = []  # (criterion, normalisation, fraction, heads to remove); fraction 0 once, as the control
    if 0 in fractions:
        plans.append(("(none)", "-", 0.0, [[] for _ in c.heads_per_block]))
    for criterion in criteria:
        raw = head_importance(model, batches, criterion)
        for norm in normalizations:
            importance = normalize_per_block(raw) if norm == "block" else raw
            plans += [(criterion, norm, f, select_heads(importance, f, c.heads_per_block)) for f in fractions if f]
    for criterion, norm, fraction, remove in plans:
        pruned = prune_heads(model, remove)
        for steps in recoveries:
            if fraction == 0 and steps == 0:
                continue  # the unpruned row
            student = pruned if steps == 0 else copy.deepcopy(pruned)
            if steps:
                torch.manual_seed(0)  # every row's Trainer starts at epoch 0 of the seeded order: the same batches
                recover(
                    student,
                    model,
                    dm,
                    steps,
                    lr=args.lr,
                    precision=precision,
                    min_lr_ratio=1.0 if args.schedule == "constant" else 0.0,
                )
            r = measure(student, held_out, images, ids, mask, args.repeats, args.min_seconds)
            r.update(img_x=r["img_s"] / base["img_s"], txt_x=r["txt_s"] / base["txt_s"])
            rows.append(
                {
                    "criterion": criterion,
                    "norm": norm,
                    "removed": f"{fraction:.0%}",
                    "heads": str(student.config.heads_per_block),
                    "steps": steps,
                    **r,
                }
            )
            print(
                f"{criterion} ({norm}) {fraction:.0%} {student.config.heads_per_block} +{steps} steps: "
                f"t2i R@1 {r['t2i']:.2f}, i2t R@1 {r['i2t']:.2f}, {r['img_x']:.2f}x images/s, "
                f"{r['txt_x']:.2f}x texts/s",
                flush=True,
            )

    print()
    print(
        f"Head pruning of {args.model} (held-out family, {len(held_out)} images; chance R@1 {base['chance']:.2f}; "
        f"speed at batch {n}; importance on {len(batches)} batches of {args.batch_size}; "
        + (
            f"recovery lr {args.lr:g} ({args.schedule}, {recovery_precision}) on batches of {args.batch_size} "
            "from the whole training split)"
            if any(recoveries)
            else "no recovery)"
        )
    )
    print()
    print(
        markdown_table(
            rows,
            [
                ("criterion", "criterion", 0),
                ("scores", "norm", 0),
                ("removed", "removed", 0),
                ("heads per block", "heads", 0),
                ("recovery steps", "steps", 0),
                ("params (M)", "params", 3),
                ("t2i R@1", "t2i", 2),
                ("i2t R@1", "i2t", 2),
                ("images/s", "img_s", 0),
                ("texts/s", "txt_s", 0),
                ("images/s vs unpruned", "img_x", 2),
                ("texts/s vs unpruned", "txt_x", 2),
            ],
        )
    )
    print()
    print(machine_line() + f"; total {time.time() - t_start:.0f} s")
    if args.csv:
        rows = [{**r, "model": args.model, "recovery": recovery_precision} for r in rows]
        print(f"wrote {write_csv(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
