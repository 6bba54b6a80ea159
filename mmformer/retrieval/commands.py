"""``mmformer index info``, ``mmformer search`` and ``mmformer eval``: the retrieval verbs (the
Lightning ``index build`` is :mod:`mmformer.training.commands`). Each verb is a typed function
(``*_command``); its flags are declared in :mod:`mmformer.retrieval.options`.

    mmformer index build --model runs/demo/model --images data/emoji/manifest.jsonl --out runs/emoji-index
    mmformer search runs/emoji-index "red apple" -k 5
    mmformer search runs/emoji-index --image some.png --json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmformer.data.errors import CorruptSample
from mmformer.data.manifest import ImageTextManifest
from mmformer.data.transforms import build_transforms, load_and_transform
from mmformer.files import read_utf8_lines
from mmformer.model import MMFormer
from mmformer.retrieval.embed import embed_images, embed_texts, truncation_note
from mmformer.retrieval.index import Index
from mmformer.retrieval.metrics import retrieval_metrics
from mmformer.retrieval.options import backend_params, positive
from mmformer.retrieval.retriever import Retriever, evaluate_index

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_CONTROL.update({c: f"\\u{c:04x}" for c in range(0x80, 0xA0)})  # C1 controls (CSI...)


def printable(text: Any) -> str:
    """``text`` with control characters (terminal escape sequences, newlines) shown as escapes,
    for human-readable output: a caption cannot clear the screen or fake result lines."""
    return str(text).translate(_CONTROL)


def index_info_command(*, index: str, verify: bool = False) -> int:
    """``mmformer index info INDEX``: the index's manifest, with its files checked (sizes, or
    every sha256 with ``verify``)."""
    m = dict(Index.open(index, verify=True if verify else "auto").manifest)
    m.pop("files")
    print(json.dumps(m, indent=1))
    print(f"files: ok ({'sha256 checked' if verify else 'sizes checked'})")
    return 0


def search_command(
    *,
    index: str,
    query: Sequence[str] = (),
    image: Sequence[str] = (),
    queries: str | None = None,
    k: int = 10,
    model: str | None = None,
    int8: bool = False,
    backend: str | None = None,
    ef_search: int | None = None,
    nprobe: int | None = None,
    refine: int | None = None,
    as_json: bool = False,
) -> int:
    """``mmformer search INDEX "text" ...``: the top ``k`` hits of each text query (positional or
    one a line in the file ``queries``) and each ``image`` query, as lines or JSON."""
    texts = list(query)
    if queries:
        texts += [t.strip() for t in read_utf8_lines(queries) if t.strip()]
    if not texts and not image:
        raise SystemExit("give text queries, --queries FILE or --image PATH")
    if k < 1:
        raise SystemExit(f"-k must be >= 1, got {k}")
    r = Retriever.from_pretrained(
        model,
        index,
        int8=int8,
        backend=backend,
        search_params=backend_params(ef_search=ef_search, nprobe=nprobe, refine=refine),
    )
    results, dropped = [], []
    if texts:
        results += [(t, hits) for t, hits in zip(texts, r.search_text(texts, k))]
        dropped = r.pieces_dropped(texts)
    if image:
        results += [(p, hits) for p, hits in zip(image, r.search_image(list(image), k))]
    if as_json:  # text queries carry pieces_dropped, as the service's answers do
        json.dump(
            [
                {
                    "query": q,
                    "hits": [vars(h) for h in hits],
                    **({"pieces_dropped": dropped[i]} if i < len(dropped) else {}),
                }
                for i, (q, hits) in enumerate(results)
            ],
            sys.stdout,
            indent=1,
        )
        print()
        return 0
    note = truncation_note(sum(d > 0 for d in dropped), len(texts), r.model.config.context_length, "text queries")
    if note:
        print(note)
    for q, hits in results:
        print(f"query: {printable(q)}")
        for rank, h in enumerate(hits, 1):
            label = h.metadata.get("caption") or h.metadata.get("text") or ""
            print(f"  {rank:>3}  {h.score:7.4f}  {printable(h.id)}" + (f"  ({printable(label)})" if label else ""))
    return 0


def eval_command(
    *,
    model: str | None = None,
    index: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    split: str | None = None,
    image_col: str = "image",
    caption_col: str = "caption",
    batch_size: int = 256,
    strict: bool = False,
    root: str | None = None,
    as_json: bool = False,
    documents: str | None = None,
    doc_mode: str = "auto",
    doc_batch_size: int = 4,
    max_chunks: int | None = None,
    chunk_overflow: str | None = None,
) -> int:
    """``mmformer eval``: recall@K of the model ``model`` on the manifest ``data`` (unreadable
    images skipped and listed, or an error with ``strict``), on the bundled held-out family
    (``data_dir``), or through the image index ``index``; ``documents`` reads each caption as a
    long document ("text", or "file": a path relative to the manifest)."""
    from mmformer.data.bundled import BundledDataNotFound
    from mmformer.retrieval import evaluate_retrieval, format_metrics

    if index:
        return eval_index(model, index, as_json)
    if model is None:
        raise SystemExit("mmformer eval: --model DIR is required (or --index INDEX_DIR)")
    if data is not None and data_dir is not None:
        raise SystemExit("mmformer eval: --data MANIFEST replaces the bundled data that --data-dir locates; pass one")
    positive("--batch-size", batch_size)
    positive("--doc-batch-size", doc_batch_size)
    net = MMFormer.from_pretrained(model)
    if net.tokenizer is None:
        raise SystemExit(f"{model} has no tokenizer.model")
    if data is not None and not documents:
        metrics, source = eval_manifest(
            net,
            data,
            image_col=image_col,
            caption_col=caption_col,
            split=split,
            root=root,
            strict=strict,
            batch_size=batch_size,
            warn=lambda m: print(m, file=sys.stderr),
        )
        print(json.dumps(metrics, indent=2) if as_json else format_metrics(metrics, source))
        return 0
    try:
        images, captions, caption_to_image, source = load_eval_set(
            net, data, data_dir, image_col, caption_col, split, batch_size
        )
    except BundledDataNotFound as e:
        raise SystemExit(f"mmformer eval: {e}") from e
    if documents:
        if data is None:
            raise SystemExit("mmformer eval: --documents needs --data MANIFEST")
        if documents == "file":
            try:
                rows = [f"{data}: caption {i + 1} ({caption_col})" for i in range(len(captions))]
                captions = read_document_files(captions, Path(data).parent, rows)
            except ValueError as e:
                raise SystemExit(f"mmformer eval: {e}") from e
        metrics = eval_documents(
            net,
            images,
            captions,
            caption_to_image,
            data,
            caption_col=caption_col,
            batch_size=batch_size,
            doc_batch_size=doc_batch_size,
            doc_mode=doc_mode,
            max_chunks=max_chunks,
            chunk_overflow=chunk_overflow,
        )
        source += f", documents encoded with mode {doc_mode}"
    else:
        metrics = evaluate_retrieval(
            net, net.tokenizer, images, captions, caption_to_image, batch_size=batch_size, progress=True
        )
    print(json.dumps(metrics, indent=2) if as_json else format_metrics(metrics, source))
    return 0


def eval_documents(
    model,
    images,
    documents: list[str],
    caption_to_image: list[int],
    data: str,
    *,
    caption_col: str,
    batch_size: int,
    doc_batch_size: int,
    doc_mode: str,
    max_chunks: int | None,
    chunk_overflow: str | None,
) -> dict:
    """Recall@K with each caption of the manifest ``data`` read as a long document."""
    import dataclasses

    from mmformer.documents import TooManyChunks
    from mmformer.retrieval.embed import embed_documents

    overrides = {k: v for k, v in (("max_chunks", max_chunks), ("chunk_overflow", chunk_overflow)) if v is not None}
    model.config = dataclasses.replace(model.config, **overrides)
    image_emb = embed_images(model, images, batch_size, progress=True)
    try:
        doc_emb = embed_documents(
            model,
            documents,
            doc_batch_size,
            doc_mode,
            progress=True,
            names=[f"caption {i + 1} ({caption_col})" for i in range(len(documents))],
        )
    except TooManyChunks as e:
        raise SystemExit(f"mmformer eval: {data}: {e}") from e
    return retrieval_metrics(image_emb, doc_emb, caption_to_image)


def read_document_files(paths: Sequence[str], base: Path, what: Sequence[str]) -> list[str]:
    """The UTF-8 text of each path (relative to ``base`` unless absolute); ``what[i]`` names the row
    in errors. All missing/unreadable files are listed in one error."""
    texts, bad = [], []
    for p, w in zip(paths, what):
        path = Path(p) if Path(p).is_absolute() else base / p
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            bad.append(f"{w}: {path}: {e.__class__.__name__}: {e}")
            texts.append("")
    if bad:
        raise ValueError(
            "document files could not be read (expected UTF-8 text files):\n  "
            + "\n  ".join(bad[:20])
            + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        )
    return texts


def load_eval_set(
    model, data: str | None, data_dir: str | None, image_col: str, caption_col: str, split: str | None, batch_size: int
):
    """(images (N,3,S,S) tensor or loader, captions, caption_to_image, description): the manifest
    ``data``, else the bundled emoji test split."""
    from mmformer.data.emoji import InMemoryImageText, default_data_dir

    c = model.config
    if data is None:
        ds = InMemoryImageText.eval_split(
            "test", c.image_size, c.image_mean, c.image_std, root=default_data_dir(data_dir)
        )
        return (
            ds.stacked_images(),
            ds.captions,
            ds.caption_to_image.tolist(),
            f"bundled emoji test split ({len(ds)} images)",
        )
    tf = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
    man = ImageTextManifest(data, image_col=image_col, caption_col=caption_col, transform=tf, split=split)
    images = torch.utils.data.DataLoader(
        _EvalImages(man, strict=True, size=c.image_size), batch_size=batch_size, num_workers=0
    )
    return (
        images,
        list(man.captions),
        [int(i) for i in man.caption_to_image],
        f"{data} ({len(man.image_paths)} images, {len(man.captions)} captions)",
    )


def eval_index(model: str | None, index: str, as_json: bool) -> int:
    """``mmformer eval --index DIR``: recall through the index (and exact search beside it)."""
    r = Retriever.from_pretrained(model, index)
    metrics = evaluate_index(r)
    if as_json:
        print(json.dumps(metrics, indent=2))
        return 0
    ks = [k for k in next(iter(metrics.values())) if k.startswith("R@")]
    print(f"text->image retrieval through {index} ({next(iter(metrics.values()))['n_queries']} caption queries)")
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


def eval_manifest(
    model,
    data: str,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    split: str | None = None,
    root: str | None = None,
    strict: bool = False,
    batch_size: int = 256,
    warn=print,
) -> tuple[dict[str, Any], str]:
    """``mmformer eval --model DIR --data MANIFEST``: recall@K over the images that can be read.

    Unreadable images are skipped (their captions too), listed through ``warn`` and counted in the
    metrics (``skipped_images``); ``strict`` makes the first one an error. Empty captions
    are dropped and duplicate (image, caption) rows counted once, each with a warning (a
    duplicated row counts its pair twice and inflates recall).
    """
    c = model.config
    tf = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
    man = ImageTextManifest(data, image_col=image_col, caption_col=caption_col, transform=tf, split=split, confine=root)
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
        warn(f"warning: {data}: {len(empty)} empty caption(s) left out (rows {_rows(empty)})")
    if dups:
        warn(f"warning: {data}: {len(dups)} duplicate (image, caption) row(s) counted once (rows {_rows(dups)})")
    images = _EvalImages(man, strict=strict, size=c.image_size)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=0)
    image_emb = embed_images(model, loader, progress=True)
    bad = images.failed
    if bad:
        listed = sorted(bad.items())
        warn(f"warning: {data}: skipped {len(bad)} unreadable image(s) and their captions (--strict to stop instead):")
        for i, reason in listed[:20]:
            warn(f"  {printable(man.image_paths[i])}: {printable(reason)}")
        if len(listed) > 20:
            warn(f"  ... and {len(listed) - 20} more")
    keep_img = [i for i in range(len(man.image_paths)) if i not in bad]
    if not keep_img:
        raise ValueError(f"{data}: no image could be read ({len(bad)} unreadable)")
    new_index = {old: new for new, old in enumerate(keep_img)}
    rows = [j for j in rows if c2i[j] in new_index]
    if not rows:
        raise ValueError(f"{data}: no caption left to evaluate")
    text_emb = embed_texts(model, model.tokenizer, [man.captions[j].strip() for j in rows], batch_size, progress=True)
    metrics = retrieval_metrics(image_emb[keep_img], text_emb, [new_index[c2i[j]] for j in rows])
    if bad or empty or dups:
        metrics.update(skipped_images=len(bad), empty_captions=len(empty), duplicate_rows=len(dups))
    source = (
        f"{data} ({len(keep_img)} images, {len(rows)} captions"
        + (f"; {len(bad)} unreadable images skipped" if bad else "")
        + ")"
    )
    return metrics, source


def _rows(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:10])) + (f", ... {len(numbers) - 10} more" if len(numbers) > 10 else "")
