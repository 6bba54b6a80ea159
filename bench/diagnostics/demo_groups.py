"""Held-out text->image R@1 of a trained model, by emoji group: where does the demo model miss?

Embeds the held-out family (the demo's test split) and every concept name, and reports for each
emoji group (``group`` in ``data/emoji/concepts.jsonl``: flags, animals-nature, ...) and for the
concepts never seen in training (``split`` val) the fraction of names whose best-scoring image is
their own (ties broken by index, so the total can differ from ``mmformer demo``'s R@1 by a few
hundredths).

    python -m bench.diagnostics.demo_groups runs/demo/model

Nothing is asserted.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import REPO, machine_line, markdown_table
from mmformer.data.emoji import InMemoryImageText, read_concepts
from mmformer.model import MMFormer
from mmformer.retrieval import embed_images, embed_texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a save_pretrained directory (e.g. runs/demo/model)")
    p.add_argument("--data-dir", default=str(REPO / "data" / "emoji"))
    args = p.parse_args(argv)
    model = MMFormer.from_pretrained(args.model).eval()
    c = model.config
    ds = InMemoryImageText.eval_split("test", c.image_size, c.image_mean, c.image_std, root=args.data_dir)
    with torch.no_grad():
        img = embed_images(model, ds.stacked_images(), batch_size=256)
        txt = embed_texts(model, model.tokenizer, ds.captions, batch_size=512)
    hit = ((txt @ img.T).argmax(1) == ds.caption_to_image).float()
    concepts = {row["name"]: row for row in read_concepts(Path(args.data_dir) / "concepts.jsonl").values()}
    groups: dict[str, list[float]] = defaultdict(list)
    for i, name in enumerate(ds.captions):
        row = concepts.get(name, {})
        groups[row.get("group", "?")].append(hit[i].item())
        if row.get("split") == "val":
            groups["(concepts not seen in training)"].append(hit[i].item())
    rows = [
        {"group": g, "queries": len(v), "t2i R@1": 100 * sum(v) / len(v)}
        for g, v in sorted(groups.items(), key=lambda kv: -sum(kv[1]) / len(kv[1]))
    ]
    rows.append({"group": "all", "queries": len(hit), "t2i R@1": 100 * hit.mean().item()})
    print(machine_line())
    print(f"{args.model}: held-out family, {len(ds)} images / names\n")
    print(markdown_table(rows, [("group", "group", 0), ("queries", "queries", 0), ("t2i R@1", "t2i R@1", 1)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
