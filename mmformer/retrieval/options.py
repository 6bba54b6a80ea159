"""The flags of the retrieval verbs (``mmformer index build|info``, ``search``, ``eval``) and the
small checks they share: argparse and plain Python only, so a verb's ``--help`` loads no torch.
The verbs are :mod:`mmformer.retrieval.commands` and :mod:`mmformer.training.commands`."""

from __future__ import annotations

import argparse
from typing import Any

#: ``mmformer.retrieval.backends.BACKENDS`` and ``mmformer.retrieval.index.INDEX_DTYPES`` (a test
#: keeps them equal), named here so that declaring the flags imports neither torch nor FAISS.
BACKEND_CHOICES = ("auto", "exact", "flat", "hnsw", "ivfpq")
INDEX_DTYPE_CHOICES = ("float32", "float16")


def add_index_info_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mmformer index info``."""
    p.add_argument("index")
    p.add_argument("--verify", action="store_true", help="check every file's sha256")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mmformer search``."""
    p.add_argument("index", help="index directory")
    p.add_argument("query", nargs="*", help="text queries")
    p.add_argument("--image", action="append", default=[], help="image query (repeatable)")
    p.add_argument("--queries", default=None, help="file of text queries, one a line")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--model", default=None, help="model directory (default: the one the index records)")
    p.add_argument("--int8", action="store_true", help="embed the queries with the int8 model")
    p.add_argument(
        "--backend",
        default=None,
        choices=[b for b in BACKEND_CHOICES if b != "auto"],
        help="search with another backend than the stored one (exact always works)",
    )
    add_backend_params(p, build=False)
    p.add_argument("--json", dest="as_json", action="store_true", help="print results as JSON")


DATA_DIR_HELP = (
    "the bundled emoji data: its folder, or a folder holding emoji/ such as a checkout's data/ "
    "(default: $MMFORMER_DATA, else the checkout's copy, else the installed package's)"
)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mmformer eval``."""
    p.add_argument("--model", default=None, help="save_pretrained directory (required unless --index records it)")
    p.add_argument(
        "--index",
        default=None,
        help="evaluate through this image index (built from a manifest "
        "with captions); approximate backends are shown beside exact",
    )
    p.add_argument("--data", default=None, help="CSV/TSV/JSONL manifest (default: bundled held-out family)")
    p.add_argument("--data-dir", default=None, help="without --data: " + DATA_DIR_HELP)
    p.add_argument("--split", default=None, help="keep manifest rows whose 'split' column equals this")
    p.add_argument("--image-col", default="image")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable image (default: skip, list and count it)"
    )
    p.add_argument(
        "--root",
        default=None,
        help="refuse manifest image paths (absolute, ../, symlinks) that "
        "lead outside DIR (for manifests taken from elsewhere)",
    )
    p.add_argument("--json", dest="as_json", action="store_true", help="print the metrics as JSON")
    p.add_argument(
        "--documents",
        choices=["text", "file"],
        default=None,
        help="long documents: the caption column holds the document text ('text') or the path "
        "of a UTF-8 text file relative to the manifest ('file'); encoded with encode_document",
    )
    p.add_argument(
        "--doc-mode",
        default="auto",
        choices=["auto", "first", "mean", "max", "fusion"],
        help="document embedding: auto = fusion if the model has it, else mean of chunk embeddings",
    )
    p.add_argument("--doc-batch-size", type=int, default=4, help="documents per encoder call")
    p.add_argument("--max-chunks", type=int, default=None, help="chunk cap per document (default: the model's)")
    p.add_argument(
        "--chunk-overflow",
        choices=["error", "first"],
        default=None,
        help="over the cap: error (default) or keep the first chunks (logged)",
    )


def add_backend_params(p: argparse.ArgumentParser, build: bool = True) -> None:
    """The FAISS backends' parameters (``build``: with the build-time ones)."""
    if build:
        p.add_argument("--hnsw-m", type=int, default=None, help="HNSW graph degree (32)")
        p.add_argument("--ef-construction", type=int, default=None, help="HNSW build list size (80)")
        p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(N))")
        p.add_argument("--pq-m", type=int, default=None, help="PQ bytes per vector (default D/4)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search list size (128)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per query (32)")
    p.add_argument("--refine", type=int, default=None, help="IVF-PQ shortlist factor re-ranked exactly (16)")


def backend_params(**given: int | None) -> dict[str, Any]:
    """The backend parameters given (not None) among ``given``."""
    names = ("hnsw_m", "ef_construction", "nlist", "pq_m", "ef_search", "nprobe", "refine")
    return {n: given[n] for n in names if given.get(n) is not None}


def positive(name: str, value: int | None) -> None:
    """A one-line error, before any work, for a count flag below 1 (``--batch-size 0``)."""
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
