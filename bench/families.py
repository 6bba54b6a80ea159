"""Leave-one-family-out: does a demo recipe generalise to every unseen drawing style, or only to twitter?

The bundled emoji data holds the same concepts drawn by five families (google, twitter, openmoji,
emojione, noto). The demo trains on four and tests on twitter. This bench holds out each family in
turn: for family F it writes a re-split manifest (F's images = test; the other four families'
images of the validation concepts = val; the rest = train; the image files are linked, not
copied), runs ``mmformer demo`` on it in a fresh process for a short budget, and reads the
held-out metrics from its ``results.json``. It prints one row per family and the mean and
standard deviation over the five, so that a recipe change is judged on all five styles, not tuned
on twitter alone.

    python -m bench.families --minutes 1.5                        # the shipped demo recipe
    python -m bench.families --minutes 1.5 --recipe my-recipe.yaml --json out.json

Run time: five times (budget + ~30 s of data loading and evaluation). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.common import REPO, add_csv_argument, machine_line, markdown_table, run_demo, write_csv

FAMILIES = ("google", "twitter", "openmoji", "emojione", "noto")


def resplit(src: Path, dst: Path, held_out: str) -> dict[str, int]:
    """Write ``dst/manifest.jsonl`` holding out family ``held_out`` (see the module docstring), with
    ``dst/images`` a link to ``src/images`` and ``concepts.jsonl`` copied. Returns split sizes."""
    rows = [
        json.loads(line) for line in (src / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    families = {r["family"] for r in rows}
    if held_out not in families:
        raise ValueError(f"{src / 'manifest.jsonl'}: no family {held_out!r}; it has {sorted(families)}")
    val_concepts = {r["hexcode"] for r in rows if r["split"] == "val"}
    dst.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0, "test": 0}
    lines = []
    for r in rows:
        split = "test" if r["family"] == held_out else "val" if r["hexcode"] in val_concepts else "train"
        counts[split] += 1
        lines.append(json.dumps({**r, "split": split}))
    tmp = dst / "manifest.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, dst / "manifest.jsonl")
    if not (dst / "images").exists():
        (dst / "images").symlink_to((src / "images").resolve(), target_is_directory=True)
    if (src / "concepts.jsonl").is_file():
        (dst / "concepts.jsonl").write_bytes((src / "concepts.jsonl").read_bytes())
    return counts


def run_family(family: str, args: argparse.Namespace, out: Path) -> dict:
    data = out / "data" / family
    counts = resplit(Path(args.data_dir), data, family)
    run_dir = out / family
    demo = [
        "--minutes",
        str(args.minutes),
        "--data-dir",
        str(data),
        "--precision",
        args.precision,
        "--seed",
        str(args.seed),
        "--query",
        "red apple",
    ] + (["--recipe", args.recipe] if args.recipe else [])
    demo += ["--steps", str(args.steps)] if args.steps else []
    demo += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    print(
        f"{family}: train {counts['train']} / val {counts['val']} / test {counts['test']} images; "
        f"mmformer demo {' '.join(demo)}",
        flush=True,
    )
    t0 = time.perf_counter()
    res = run_demo(demo, run_dir)
    m = res["test_metrics"]
    row = {
        "held-out": family,
        "test images": counts["test"],
        "steps": res["steps"],
        "precision": res["precision"],
        "t2i R@1": m["t2i_R@1"],
        "i2t R@1": m["i2t_R@1"],
        "t2i R@10": m["t2i_R@10"],
        "wall s": time.perf_counter() - t0,
    }
    print(
        f"  {family}: {res['steps']} steps ({res['precision']}), t2i R@1 {m['t2i_R@1']:.2f}, "
        f"i2t R@1 {m['i2t_R@1']:.2f}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=1.5, help="training budget per family (default: 1.5)")
    p.add_argument("--steps", type=int, default=None, help="exact optimizer steps per family (overrides --minutes)")
    p.add_argument("--batch-size", type=int, default=None, help="demo --batch-size (default: the recipe's)")
    p.add_argument("--recipe", default=None, help="fit recipe the demo trains with (default: the demo's, tiny-cpu)")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families to hold out in turn")
    p.add_argument("--precision", default="auto", help="demo --precision (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(REPO / "data" / "emoji"), help="the emoji data (manifest.jsonl, images/)")
    p.add_argument("--out", default="runs/families", help="re-split manifests and demo runs go here")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    add_csv_argument(p)
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    rows = [run_family(f, args, out) for f in args.families.split(",")]
    for key in ("t2i R@1", "i2t R@1"):
        values = [r[key] for r in rows]
        print(
            f"{key}: mean {statistics.mean(values):.2f}, std {statistics.stdev(values) if len(values) > 1 else 0:.2f}, "
            f"min {min(values):.2f}, max {max(values):.2f} over {len(values)} held-out families"
        )
    print()
    print(
        markdown_table(
            rows,
            [
                ("held-out family", "held-out", 0),
                ("test images", "test images", 0),
                ("steps", "steps", 0),
                ("precision", "precision", 0),
                ("t2i R@1", "t2i R@1", 2),
                ("i2t R@1", "i2t R@1", 2),
                ("t2i R@10", "t2i R@10", 2),
                ("wall s", "wall s", 0),
            ],
        )
    )
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    print(f"\nrecipe: {args.recipe or 'tiny-cpu (the demo default)'}; {budget} of training per family")
    print(machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1) + "\n", encoding="utf-8")
    if args.csv:
        recipe = args.recipe or "tiny-cpu"
        print(f"wrote {write_csv(args.csv, [{**r, 'recipe': recipe, 'budget': budget} for r in rows])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
