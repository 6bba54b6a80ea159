"""``mmformer index build|info`` and ``mmformer search``: the retrieval command line.

    mmformer index build --model runs/demo/model --images data/emoji/manifest.jsonl --out runs/emoji-index
    mmformer search runs/emoji-index "red apple" -k 5
    mmformer search runs/emoji-index --image some.png --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mmformer.compress import quantize_int8
from mmformer.data.errors import CorruptSample
from mmformer.data.manifest import ImageTextManifest
from mmformer.data.transforms import build_transforms, load_and_transform
from mmformer.files import read_utf8_lines
from mmformer.model import MMFormer
from mmformer.retrieval.backends import BACKENDS
from mmformer.retrieval.embed import embed_images, embed_texts
from mmformer.retrieval.index import INDEX_DTYPES, Index
from mmformer.retrieval.metrics import retrieval_metrics
from mmformer.retrieval.retriever import Retriever, evaluate_index


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``index`` and ``search`` on the ``mmformer`` parser."""
    ix = sub.add_parser("index", help="build or inspect a retrieval index")
    isub = ix.add_subparsers(metavar="ACTION")
    b = isub.add_parser("build", help="embed images (or texts) with a model and write an index",
                        description="Embed with Lightning trainer.predict; resumable after a kill; "
                                    "unreadable inputs are skipped and listed in skipped.jsonl.")
    b.add_argument("--model", required=True, help="save_pretrained directory")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images, CSV/TSV/JSONL manifest, or WebDataset shards "
                                      "(.tar path or brace pattern)")
    src.add_argument("--texts", help=".txt file (one text a line) or a manifest (its captions)")
    b.add_argument("--out", required=True, help="index directory")
    b.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: exact up to 100k rows, else hnsw")
    b.add_argument("--dtype", default="float32", choices=INDEX_DTYPES,
                   help="storage of embeddings.npy")
    b.add_argument("--split", default=None, help="manifest rows whose 'split' column equals this")
    b.add_argument("--image-col", default="image")
    b.add_argument("--caption-col", default="caption")
    b.add_argument("--root", default=None, help="manifest sources: refuse image paths (absolute, ../, symlinks) "
                                                "that lead outside DIR (for manifests taken from elsewhere)")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--part-size", type=int, default=1024, help="inputs per resumable part")
    b.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    b.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 32-true, bf16-mixed")
    b.add_argument("--int8", action="store_true", help="embed with the int8-quantized model (CPU)")
    b.add_argument("--accelerator", default="cpu")
    b.add_argument("--devices", default="1")
    b.add_argument("--strategy", default="auto", help="e.g. ddp to embed on several devices")
    b.add_argument("--num-nodes", type=int, default=1)
    _add_backend_params(b)
    b.add_argument("--overwrite", action="store_true", help="replace an index or parts of another build")
    b.set_defaults(func=cmd_index_build)
    info = isub.add_parser("info", help="print an index's manifest (and check its files)")
    info.add_argument("index")
    info.add_argument("--verify", action="store_true", help="check every file's sha256")
    info.set_defaults(func=cmd_index_info)
    ix.set_defaults(func=lambda args: ix.print_help() or 2)

    s = sub.add_parser("search", help="search an index by text or by image")
    s.add_argument("index", help="index directory")
    s.add_argument("query", nargs="*", help="text queries")
    s.add_argument("--image", action="append", default=[], help="image query (repeatable)")
    s.add_argument("--queries", default=None, help="file of text queries, one a line")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--model", default=None, help="model directory (default: the one the index records)")
    s.add_argument("--int8", action="store_true", help="embed the queries with the int8 model")
    s.add_argument("--backend", default=None, choices=[b for b in BACKENDS if b != "auto"],
                   help="search with another backend than the stored one (exact always works)")
    _add_backend_params(s, build=False)
    s.add_argument("--json", action="store_true", help="print results as JSON")
    s.set_defaults(func=cmd_search)


def _add_backend_params(p: argparse.ArgumentParser, build: bool = True) -> None:
    if build:
        p.add_argument("--hnsw-m", type=int, default=None, help="HNSW graph degree (32)")
        p.add_argument("--ef-construction", type=int, default=None, help="HNSW build list size (80)")
        p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(N))")
        p.add_argument("--pq-m", type=int, default=None, help="PQ bytes per vector (default D/4)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search list size (128)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per query (32)")
    p.add_argument("--refine", type=int, default=None, help="IVF-PQ shortlist factor re-ranked exactly (16)")


def _backend_params(args: argparse.Namespace) -> dict[str, Any]:
    names = ("hnsw_m", "ef_construction", "nlist", "pq_m", "ef_search", "nprobe", "refine")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def positive(name: str, value: int | None) -> None:
    """A one-line error, before any work, for a count flag below 1 (``--batch-size 0``)."""
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0, 32), 127]}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_CONTROL.update({c: f"\\u{c:04x}" for c in range(0x80, 0xA0)})  # C1 controls (CSI...)


def printable(text: Any) -> str:
    """``text`` with control characters (terminal escape sequences, newlines) shown as escapes,
    for human-readable output: a caption cannot clear the screen or fake result lines."""
    return str(text).translate(_CONTROL)


def cmd_index_build(args: argparse.Namespace) -> int:
    positive("--batch-size", args.batch_size)
    positive("--part-size", args.part_size)
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    from mmformer.training.index_build import build_index  # the application side: Lightning

    model = MMFormer.from_pretrained(args.model)
    if args.int8:
        model = quantize_int8(model)
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    index = build_index(
        model, args.images or args.texts, args.out, kind="image" if args.images else "text",
        backend=args.backend, backend_params=_backend_params(args), dtype=args.dtype,
        batch_size=args.batch_size, part_size=args.part_size, num_workers=args.workers,
        precision=args.precision, accelerator=args.accelerator, devices=devices, strategy=args.strategy,
        num_nodes=args.num_nodes, model_path=str(Path(args.model).resolve()), image_col=args.image_col,
        caption_col=args.caption_col, split=args.split, overwrite=args.overwrite, root=args.root)
    if index is None:  # a non-zero rank of a multi-device build
        return 0
    m = index.manifest
    print(f"wrote {args.out}: {m['count']} {m['kind']} rows x {m['dim']} ({m['dtype']}), backend {m['backend']}, "
          f"{m['skipped']} skipped; embedding {m['embed_seconds']:.1f} s, index {m['index_seconds']:.1f} s")
    if m["skipped"]:
        print(f"unreadable inputs are listed in {Path(args.out) / 'skipped.jsonl'}")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:

    index = Index.open(args.index, verify=True if args.verify else "auto")
    m = dict(index.manifest)
    m.pop("files")
    print(json.dumps(m, indent=1))
    print(f"files: ok ({'sha256 checked' if args.verify else 'sizes checked'})")
    return 0


def cmd_search(args: argparse.Namespace) -> int:

    texts = list(args.query)
    if args.queries:
        texts += [t.strip() for t in read_utf8_lines(args.queries) if t.strip()]
    if not texts and not args.image:
        raise SystemExit("give text queries, --queries FILE or --image PATH")
    if args.k < 1:
        raise SystemExit(f"-k must be >= 1, got {args.k}")
    r = Retriever.from_pretrained(args.model, args.index, int8=args.int8, backend=args.backend,
                                  search_params=_backend_params(args))
    results = []
    if texts:
        results += [(t, hits) for t, hits in zip(texts, r.search_text(texts, args.k))]
    if args.image:
        results += [(p, hits) for p, hits in zip(args.image, r.search_image(args.image, args.k))]
    if args.json:
        json.dump([{"query": q, "hits": [vars(h) for h in hits]} for q, hits in results], sys.stdout, indent=1)
        print()
        return 0
    for q, hits in results:
        print(f"query: {printable(q)}")
        for rank, h in enumerate(hits, 1):
            label = h.metadata.get("caption") or h.metadata.get("text") or ""
            print(f"  {rank:>3}  {h.score:7.4f}  {printable(h.id)}" + (f"  ({printable(label)})" if label else ""))
    return 0


def cmd_eval_index(args: argparse.Namespace) -> int:
    """``mmformer eval --index DIR``: recall through the index (and exact search beside it)."""

    r = Retriever.from_pretrained(args.model, args.index)
    metrics = evaluate_index(r)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    ks = [k for k in next(iter(metrics.values())) if k.startswith("R@")]
    print(f"text->image retrieval through {args.index} ({next(iter(metrics.values()))['n_queries']} caption queries)")
    print(f"{'backend':<10}" + "".join(f"{k:>8}" for k in ks) + f"{'overlap with exact':>20}")
    for name, m in metrics.items():
        overlap = next((f"{v:.1f}% @{k.split('@')[1]}" for k, v in m.items() if k.startswith("overlap")), "")
        print(f"{name:<10}" + "".join(f"{m[k]:>8.2f}" for k in ks) + f"{overlap:>20}")
    return 0


# ---- eval on a manifest: bad rows skipped, listed and counted ------------------------------------
class _EvalImages(torch.utils.data.Dataset):
    """The unique images of a manifest as (3, S, S) tensors; an image that cannot be read or
    transformed gives zeros and is recorded in ``failed`` (index -> reason); run in-process."""

    def __init__(self, manifest, strict: bool, size: int) -> None:
        self.m, self.strict = manifest, strict
        self.failed: dict[int, str] = {}
        self.size = (3, size, size)

    def __len__(self) -> int:
        return len(self.m.image_paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            x = load_and_transform(self.m.image_paths[i], self.m.transform, max_pixels=self.m.max_pixels)
        except CorruptSample as e:
            if self.strict:
                raise
            self.failed[i] = e.reason
            return torch.zeros(self.size)
        return x


def eval_manifest(model, args: argparse.Namespace, warn=print) -> tuple[dict[str, Any], str]:
    """``mmformer eval --model DIR --data MANIFEST``: recall@K over the images that can be read.

    Unreadable images are skipped (their captions too), listed through ``warn`` and counted in the
    metrics (``skipped_images``); ``args.strict`` makes the first one an error. Empty captions
    are dropped and duplicate (image, caption) rows counted once, each with a warning (a
    duplicated row counts its pair twice and inflates recall).
    """
    c = model.config
    tf = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
    man = ImageTextManifest(args.data, image_col=args.image_col, caption_col=args.caption_col,
                            transform=tf, split=args.split, confine=getattr(args, "root", None))
    c2i = [int(i) for i in man.caption_to_image]
    rows, seen, empty, dups = [], set(), [], []
    for j, (cap, img) in enumerate(zip(man.captions, c2i)):
        if not cap.strip():
            empty.append(man.row_numbers[j])
        elif (img, cap.strip()) in seen:
            dups.append(man.row_numbers[j])
        else:
            seen.add((img, cap.strip()))
            rows.append(j)
    if empty:
        warn(f"warning: {args.data}: {len(empty)} empty caption(s) left out (rows {_rows(empty)})")
    if dups:
        warn(f"warning: {args.data}: {len(dups)} duplicate (image, caption) row(s) counted once (rows {_rows(dups)})")
    images = _EvalImages(man, strict=getattr(args, "strict", False), size=c.image_size)
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=0)
    image_emb = embed_images(model, loader, progress=True)
    bad = images.failed
    if bad:
        listed = sorted(bad.items())
        warn(f"warning: {args.data}: skipped {len(bad)} unreadable image(s) and their captions "
             "(--strict to stop instead):")
        for i, reason in listed[:20]:
            warn(f"  {printable(man.image_paths[i])}: {printable(reason)}")
        if len(listed) > 20:
            warn(f"  ... and {len(listed) - 20} more")
    keep_img = [i for i in range(len(man.image_paths)) if i not in bad]
    if not keep_img:
        raise ValueError(f"{args.data}: no image could be read ({len(bad)} unreadable)")
    new_index = {old: new for new, old in enumerate(keep_img)}
    rows = [j for j in rows if c2i[j] in new_index]
    if not rows:
        raise ValueError(f"{args.data}: no caption left to evaluate")
    text_emb = embed_texts(model, model.tokenizer, [man.captions[j].strip() for j in rows], args.batch_size,
                           progress=True)
    metrics = retrieval_metrics(image_emb[keep_img], text_emb, [new_index[c2i[j]] for j in rows])
    if bad or empty or dups:
        metrics.update(skipped_images=len(bad), empty_captions=len(empty), duplicate_rows=len(dups))
    source = (f"{args.data} ({len(keep_img)} images, {len(rows)} captions"
              + (f"; {len(bad)} unreadable images skipped" if bad else "") + ")")
    return metrics, source


def _rows(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:10])) + (f", ... {len(numbers) - 10} more" if len(numbers) > 10 else "")
