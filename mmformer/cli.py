"""``mmformer`` command line.

- ``mmformer fit|validate|test --config train/tiny-cpu.yaml [--trainer.* --model.* --data.* ...]``: every
  training recipe, long documents included (LightningCLI; see :mod:`mmformer.training.recipes`).
- ``mmformer demo``: train the tiny preset on the bundled emoji data, report held-out recall,
  search by text and write a PNG grid.
- ``mmformer eval --model DIR [--data MANIFEST | --data-dir DIR]``: retrieval recall@K of a saved model.
- ``mmformer index build --model DIR --images SRC --out INDEX``, ``mmformer search INDEX "text"``:
  retrieval indexes (see :mod:`mmformer.retrieval.commands`).
- ``mmformer export --ckpt FILE|DIR --out DIR``: Lightning checkpoint (a file, or the folder of a
  sharded FSDP checkpoint) -> ``save_pretrained`` directory. ``mmformer export --model DIR --onnx
  DIR`` (or ``--ckpt X --onnx DIR``): the image and text encoders as ONNX graphs (+ int8 copies).
- ``mmformer import --open-clip ARCH --weights FILE --out DIR`` (or ``--hf-clip DIR``): CLIP weights
  -> ``save_pretrained`` directory; ``mmformer export --model DIR --open-clip FILE``: back to open_clip
  (see :mod:`mmformer.clip_io`).
- ``mmformer prune --model DIR --heads FRACTION --out DIR [--data MANIFEST | --shards PATTERN]``: remove
  attention heads (see :mod:`mmformer.training.prune`), optionally recovering by distillation (``--recover STEPS``).
- ``mmformer tokenizer --input FILE --out FILE``: train a SentencePiece tokenizer.
- ``mmformer serve --model DIR --index NAME=DIR``: the retrieval service (gRPC + HTTP, see
  :mod:`mmformer.serve`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
DATA_DIR_HELP = ("the bundled emoji data: its folder, or a folder holding emoji/ such as a checkout's data/ "
                 "(default: $MMFORMER_DATA, else the checkout's copy, else the installed package's)")


def run(argv: list[str] | None = None) -> int:
    """The ``mmformer`` console command: :func:`main`, with errors of the package's own kinds (bad
    files, bad values: ``ValueError`` and its subclasses such as ``CheckpointError``,
    ``ManifestError``, ``InvalidIndexError``, ``CorruptSample``; ``OSError``) printed as one line,
    ``mmformer <verb>: <message>``, and exit status 1; ``--debug`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    words = [a for a in argv[:2] if not a.startswith("-")]
    verb = " ".join(words[:2]) if words[:1] == ["index"] else (words[0] if words else "")
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            check_ckpt_path_arg(argv)
        return main(argv)
    except (ValueError, OSError) as e:
        if debug:
            raise
        print(one_line_error(verb, e), file=sys.stderr)
        return 1
    except SystemExit as e:
        if isinstance(e.code, str) and not debug:
            print(one_line_error(verb, ValueError(e.code)), file=sys.stderr)
            return 1
        raise


def one_line_error(verb: str, e: BaseException) -> str:
    """``mmformer <verb>: <message>`` (the message's lines joined; a prefix already there kept)."""
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    prefix = f"mmformer {verb}:" if verb else "mmformer:"
    return msg if msg.startswith(prefix) else f"{prefix} {msg}"


def check_ckpt_path_arg(argv: list[str]) -> None:
    """``fit --ckpt_path X``: check X (named in the error, loaded with weights_only=True) before
    LightningCLI reads it."""
    from mmformer.training.checkpoint import check_checkpoint

    for i, a in enumerate(argv):
        value = argv[i + 1] if a == "--ckpt_path" and i + 1 < len(argv) else \
            a.split("=", 1)[1] if a.startswith("--ckpt_path=") else None
        if value and value not in ("null", "None", "last", "best", "hpc", "registry"):
            check_checkpoint(value)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_output()
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from mmformer.training.recipes import run_recipe

        run_recipe(argv)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


# Third-party lines that say nothing about the user's run.
_TIP_PREFIX = "\N{ELECTRIC LIGHT BULB} Tip:"
_QUIET_WARNINGS = (  # (message regex, module regex of the code the warning names)
    (r".*isinstance\(treespec, LeafSpec\)", r"lightning\."),  # torch pytree deprecation inside Lightning
    (r"LightningCLI's args parameter is intended", r"lightning\."),  # we pass the command line on purpose
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed", r"lightning\."),
    (r".*does not have many workers which may be a bottleneck", r"lightning\."),  # recipes set num_workers
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated", r"lightning\."),  # Lightning's all_gather
    # retrieval metrics are computed on every rank over the gathered set: nothing to sync
    (r"It is recommended to use `self\.log\('(val|test)/", r"lightning\."),
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(_TIP_PREFIX)


def configure_output() -> None:
    """Each log line once, no third-party tips or known third-party warnings.

    mmformer's warnings go through the root handler (``LEVEL name: message``); Lightning's lines
    (INFO and up) through one handler of their own, printed as they are, without propagating to
    the root (which would print them twice)."""
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        handler = logging.StreamHandler()
        handler.addFilter(_NoTips())
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    for message, module in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmformer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(metavar="COMMAND")

    d = sub.add_parser("demo", help="train the tiny preset on the bundled emoji data and search it")
    d.add_argument("--out", default="runs/demo", help="output folder (model, logs, grid PNG)")
    d.add_argument("--minutes", type=float, default=8.0,
                   help="training budget in minutes; the step count is calibrated to fit it")
    d.add_argument("--steps", type=int, default=None, help="exact number of optimizer steps (overrides --minutes)")
    d.add_argument("--batch-size", type=int, default=None)
    d.add_argument("--recipe", default=None,
                   help="fit recipe (file or shipped name) whose model and data settings the demo trains with "
                        "(default: tiny-cpu); its trainer section is not used")
    d.add_argument("--precision", default="auto", help="auto (time a few steps of each on this CPU, keep the faster) | 32-true | bf16-mixed")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--query", action="append", default=None, help="text query to search (repeatable)")
    d.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="retrieval recall@K of a saved model on a manifest or the bundled test split")
    e.add_argument("--model", default=None, help="save_pretrained directory (required unless --index "
                                                  "records it)")
    e.add_argument("--index", default=None, help="evaluate through this image index (built from a manifest "
                                                 "with captions); approximate backends are shown beside exact")
    e.add_argument("--data", default=None, help="CSV/TSV/JSONL manifest (default: bundled held-out family)")
    e.add_argument("--data-dir", default=None, help="without --data: " + DATA_DIR_HELP)
    e.add_argument("--split", default=None, help="keep manifest rows whose 'split' column equals this")
    e.add_argument("--image-col", default="image")
    e.add_argument("--caption-col", default="caption")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--strict", action="store_true", help="stop at the first unreadable image (default: skip, "
                                                         "list and count it)")
    e.add_argument("--root", default=None, help="refuse manifest image paths (absolute, ../, symlinks) that "
                                                "lead outside DIR (for manifests taken from elsewhere)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--documents", choices=["text", "file"], default=None,
                   help="long documents: the caption column holds the document text ('text') or the path "
                        "of a UTF-8 text file relative to the manifest ('file'); encoded with encode_document")
    e.add_argument("--doc-mode", default="auto", choices=["auto", "first", "mean", "max", "fusion"],
                   help="document embedding: auto = fusion if the model has it, else mean of chunk embeddings")
    e.add_argument("--doc-batch-size", type=int, default=4, help="documents per encoder call")
    e.add_argument("--max-chunks", type=int, default=None, help="chunk cap per document (default: the model's)")
    e.add_argument("--chunk-overflow", choices=["error", "first"], default=None,
                   help="over the cap: error (default) or keep the first chunks (logged)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="Lightning checkpoint -> save_pretrained directory; any model -> ONNX graphs")
    x.add_argument("--ckpt", default=None, help="Lightning .ckpt file or sharded checkpoint folder (FSDP)")
    x.add_argument("--out", default=None, help="save_pretrained directory to write (with --ckpt)")
    x.add_argument("--model", default=None, help="save_pretrained directory to export to ONNX (with --onnx)")
    x.add_argument("--onnx", default=None, metavar="DIR",
                   help="write image.onnx, text.onnx (+ onnxruntime int8 copies), config and tokenizer to DIR")
    x.add_argument("--no-int8", action="store_true", help="with --onnx: skip the int8 graphs")
    x.add_argument("--open-clip", default=None, metavar="FILE",
                   help="with --model: write its weights as an open_clip CLIP state dict (.pt or .safetensors)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an existing model folder at --out (swapped in only once complete)")
    x.set_defaults(func=cmd_export)

    pr = sub.add_parser("prune", allow_abbrev=False,
                        help="remove attention heads (gradient or magnitude importance), optionally "
                             "recover by distillation, save the smaller model")
    pr.add_argument("--model", required=True, help="save_pretrained directory to prune")
    pr.add_argument("--heads", type=float, required=True, metavar="FRACTION",
                    help="fraction of all heads to remove, in [0, 1); the lowest-scored over all blocks, "
                         "at least one head left in every block")
    pr.add_argument("--out", required=True, help="save_pretrained directory to write the pruned model to")
    pr.add_argument("--criterion", choices=["gradient", "magnitude"], default="gradient",
                    help="head importance: mean |dL/d gate| of the CLIP loss on training batches (default), "
                         "or the norm of the head's weights (no data)")
    pr.add_argument("--normalize", choices=["block", "none"], default="block",
                    help="divide each block's scores by their L2 norm before the global ranking (block, "
                         "default: Michel et al. 2019), or rank the raw scores (none)")
    pr.add_argument("--batches", type=int, default=8, help="training batches for the gradient criterion")
    pr.add_argument("--batch-size", type=int, default=256,
                    help="pairs per batch, for the scores and the recovery (default 256, the demo's training "
                         "batch; README \"Compression\" shows what the earlier 64 with a constant rate cost)")
    pr.add_argument("--recover", type=int, default=0, metavar="STEPS",
                    help="fine-tune the pruned model this many steps (CLIP loss + distillation from the "
                         "unpruned model, through the Lightning Trainer) on the training data, augmented, epoch "
                         "after epoch; 0 = none")
    pr.add_argument("--lr", type=float, default=8e-4,
                    help="recovery learning rate (AdamW), decayed to 0 on a cosine (default 8e-4, the shipped "
                         "recipes' training rate: README \"Compression\" compares 1e-4 and 4e-4)")
    pr.add_argument("--precision", choices=["auto", "32-true", "bf16-mixed"], default="auto",
                    help="recovery precision: auto (time a few training steps of each on one recovery batch, "
                         "keep the faster, as `mmformer demo` does), 32-true, or bf16-mixed (bf16 autocast, "
                         "fp32 weights)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the training batches' order and augmentation")
    pr.add_argument("--data", default=None, metavar="MANIFEST",
                    help="CSV/TSV/JSONL manifest of image-caption pairs to score and recover on (default: the "
                         "bundled emoji training split)")
    pr.add_argument("--shards", default=None, metavar="PATTERN",
                    help="WebDataset shard pattern to score and recover on, instead of a manifest")
    pr.add_argument("--image-col", default="image", help="with --data: the manifest's image column")
    pr.add_argument("--caption-col", default="caption", help="with --data: the manifest's caption column")
    pr.add_argument("--data-dir", default=None, help="without --data/--shards: " + DATA_DIR_HELP)
    pr.add_argument("--overwrite", action="store_true",
                    help="replace an existing model folder at --out (swapped in only once complete)")
    pr.set_defaults(func=cmd_prune)

    from mmformer.retrieval.commands import add_commands

    add_commands(sub)  # index build|info, search

    # serve: arguments from a light module; the service (grpc, FastAPI) is imported only when run
    from mmformer.serve.options import add_arguments as add_serve_arguments

    sv = sub.add_parser("serve", help="serve a model and its indexes over gRPC and HTTP (dynamic batching, "
                                      "search page, metrics)")
    add_serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    im = sub.add_parser("import", help="open_clip or Hugging Face CLIP weights -> save_pretrained directory")
    im.add_argument("--open-clip", metavar="ARCH", help="open_clip architecture name (e.g. ViT-B-32), with --weights")
    im.add_argument("--weights", help="open_clip state dict or training checkpoint file")
    im.add_argument("--quick-gelu", action="store_true", default=None, help="QuickGELU (OpenAI's own weights)")
    im.add_argument("--hf-clip", metavar="DIR", help="Hugging Face CLIPModel directory (config.json + weights)")
    im.add_argument("--out", required=True, help="save_pretrained directory to write")
    im.set_defaults(func=cmd_import)

    t = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    t.add_argument("--input", required=True, nargs="+",
                   help=".txt (one text a line) or .jsonl/.csv/.tsv files (see --fields)")
    t.add_argument("--fields", default="caption",
                   help="comma-separated columns to read from jsonl/csv (list values are flattened)")
    t.add_argument("--split", default=None, help="keep jsonl/csv rows whose 'split' equals this")
    t.add_argument("--vocab-size", type=int, default=2000)
    t.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer)
    return p


# ---- eval ------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from mmformer.data.bundled import BundledDataNotFound
    from mmformer.model import MMFormer
    from mmformer.retrieval import evaluate_retrieval, format_metrics

    if args.index:
        from mmformer.retrieval.commands import cmd_eval_index

        return cmd_eval_index(args)
    if args.model is None:
        raise SystemExit("mmformer eval: --model DIR is required (or --index INDEX_DIR)")
    if args.data is not None and getattr(args, "data_dir", None) is not None:
        raise SystemExit("mmformer eval: --data MANIFEST replaces the bundled data that --data-dir locates; pass one")
    for flag, value in (("--batch-size", args.batch_size), ("--doc-batch-size", args.doc_batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    model = MMFormer.from_pretrained(args.model)
    if model.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer.model")
    if args.data is not None and not getattr(args, "documents", None):
        from mmformer.retrieval.commands import eval_manifest

        metrics, source = eval_manifest(model, args, warn=lambda m: print(m, file=sys.stderr))
        print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics, source))
        return 0
    try:
        images, captions, caption_to_image, source = load_eval_set(model, args)
    except BundledDataNotFound as e:
        raise SystemExit(f"mmformer eval: {e}") from e
    if getattr(args, "documents", None):
        metrics = eval_documents(model, images, captions, caption_to_image, args)
        source += f", documents encoded with mode {args.doc_mode}"
    else:
        metrics = evaluate_retrieval(model, model.tokenizer, images, captions, caption_to_image,
                                     batch_size=args.batch_size, progress=True)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_metrics(metrics, source))
    return 0


def eval_documents(model, images, documents: list[str], caption_to_image: list[int],
                   args: argparse.Namespace) -> dict:
    """Recall@K with each caption cell read as a long document (text, or a file path)."""
    import dataclasses

    from mmformer.documents import TooManyChunks
    from mmformer.retrieval import embed_images, retrieval_metrics
    from mmformer.retrieval.embed import embed_documents

    if args.data is None:
        raise SystemExit("mmformer eval: --documents needs --data MANIFEST")
    if args.documents == "file":
        try:
            documents = read_document_files(documents, Path(args.data).parent,
                                            [f"{args.data}: caption {i + 1} ({args.caption_col})"
                                             for i in range(len(documents))])
        except ValueError as e:
            raise SystemExit(f"mmformer eval: {e}") from e
    overrides = {k: v for k, v in (("max_chunks", args.max_chunks), ("chunk_overflow", args.chunk_overflow))
                 if v is not None}
    model.config = dataclasses.replace(model.config, **overrides)
    image_emb = embed_images(model, images, args.batch_size, progress=True)
    try:
        doc_emb = embed_documents(model, documents, args.doc_batch_size, args.doc_mode, progress=True,
                                  names=[f"caption {i + 1} ({args.caption_col})" for i in range(len(documents))])
    except TooManyChunks as e:
        raise SystemExit(f"mmformer eval: {args.data}: {e}") from e
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
        raise ValueError("document files could not be read (expected UTF-8 text files):\n  " + "\n  ".join(bad[:20])
                         + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))
    return texts


def load_eval_set(model, args: argparse.Namespace):
    """(images (N,3,S,S) tensor or loader, captions, caption_to_image, description)."""
    from torch.utils.data import DataLoader

    from mmformer.data.emoji import InMemoryImageText, default_data_dir
    from mmformer.data.manifest import ImageTextManifest
    from mmformer.data.transforms import build_transforms

    c = model.config
    if args.data is None:
        ds = InMemoryImageText.eval_split("test", c.image_size, c.image_mean, c.image_std,
                                          root=default_data_dir(getattr(args, "data_dir", None)))
        return ds.stacked_images(), ds.captions, ds.caption_to_image.tolist(), f"bundled emoji test split ({len(ds)} images)"
    tf = build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std)
    man = ImageTextManifest(args.data, image_col=args.image_col, caption_col=args.caption_col,
                            transform=tf, split=args.split)
    images = DataLoader(_UniqueImages(man), batch_size=args.batch_size, num_workers=0)
    return images, list(man.captions), [int(i) for i in man.caption_to_image], \
        f"{args.data} ({len(man.image_paths)} images, {len(man.captions)} captions)"


class _UniqueImages:
    """The unique images of a manifest, in ``image_paths`` order, as (3,S,S) tensors."""

    def __init__(self, manifest) -> None:
        self.m = manifest

    def __len__(self) -> int:
        return len(self.m.image_paths)

    def __getitem__(self, i: int):
        from mmformer.data.transforms import load_image

        return self.m.transform(load_image(self.m.image_paths[i], max_pixels=self.m.max_pixels))


# ---- export / tokenizer ----------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from mmformer.training.checkpoint import export_checkpoint

    if (args.ckpt is None) == (args.model is None):
        raise SystemExit("mmformer export: give --ckpt FILE|DIR (with --out and/or --onnx) or --model DIR (with --onnx)")
    if args.ckpt is not None and args.out is None and args.onnx is None:
        raise SystemExit("mmformer export: --ckpt needs --out DIR (save_pretrained) and/or --onnx DIR")
    if args.model is not None and args.open_clip is not None:
        print(f"wrote {_clip_io().export_open_clip(args.model, args.open_clip)}")
        if args.onnx is None:
            return 0
    if args.model is not None and args.onnx is None:
        raise SystemExit("mmformer export: --model needs --onnx DIR or --open-clip FILE")
    model_dir = args.model
    with tempfile.TemporaryDirectory() as scratch:
        if args.ckpt is not None:
            # a .ckpt file, or the folder of a sharded (FSDP) checkpoint; errors print as one line (run)
            model_dir = export_checkpoint(args.ckpt, args.out or Path(scratch) / "model",
                                          overwrite=args.overwrite if args.out else False)
            if args.out:
                print(f"wrote {model_dir} (config.json, model.safetensors, tokenizer.model)")
        if args.onnx is not None:
            export_onnx_folder(model_dir, args.onnx, int8=not args.no_int8)
    return 0


def _clip_io():
    from mmformer import clip_io

    return clip_io


def cmd_import(args: argparse.Namespace) -> int:
    print(f"wrote {_clip_io().import_clip(args.out, args.open_clip, args.weights, args.hf_clip, args.quick_gelu)}")
    return 0


def export_onnx_folder(model_dir: str | Path, out: str, int8: bool) -> None:
    from mmformer.compress.onnx import export_onnx
    from mmformer.model import MMFormer

    try:
        model = MMFormer.from_pretrained(model_dir)
        manifest = export_onnx(model, out, int8=int8)
    except ImportError as e:
        raise SystemExit(f"mmformer export: {e}") from e
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"mmformer export --onnx: {e}") from e
    p = manifest["parity"]
    files = "image.onnx, text.onnx" + (", image.int8.onnx, text.int8.onnx" if int8 else "")
    print(f"wrote {out} ({files}, config.json, tokenizer.model, onnx.json)")
    print(f"onnxruntime vs PyTorch: fp32 max |diff| image {p['image_fp32_max_abs_diff']:.1e}, "
          f"text {p['text_fp32_max_abs_diff']:.1e}"
          + (f"; int8 min cosine image {p['image_int8_min_cosine']:.4f}, text {p['text_int8_min_cosine']:.4f}"
             if int8 else ""))


def cmd_prune(args: argparse.Namespace) -> int:
    """``mmformer prune``: :func:`mmformer.training.prune.prune_command`."""
    from mmformer.training.prune import prune_command

    return prune_command(model=args.model, out=args.out, heads=args.heads, criterion=args.criterion,
                         normalize=args.normalize, batches=args.batches, batch_size=args.batch_size,
                         recover=args.recover, lr=args.lr, precision=args.precision, seed=args.seed, data=args.data,
                         shards=args.shards, image_col=args.image_col, caption_col=args.caption_col,
                         data_dir=args.data_dir, overwrite=args.overwrite)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from mmformer.tokenizer import Tokenizer

    texts = list(read_texts(args.input, args.fields.split(","), args.split))
    tok = Tokenizer.train(texts, vocab_size=args.vocab_size, model_type=args.model_type)
    tok.save(args.out)
    print(f"trained a {args.model_type} tokenizer with {tok.vocab_size} pieces on {len(texts)} texts -> {args.out}")
    return 0


def read_texts(paths: list[str], fields: list[str], split: str | None):
    """Texts from .txt lines or the ``fields`` of .jsonl/.csv/.tsv rows (lists flattened)."""
    import csv
    import io

    from mmformer.files import read_utf8_lines, read_utf8_text

    def jsonl(path: Path):  # errors name the file, line and column
        for n, line in enumerate(read_utf8_lines(path), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON: {e.msg} (column {e.colno})") from None

    for path in map(Path, paths):
        if path.suffix == ".txt":
            yield from (line.strip() for line in read_utf8_lines(path) if line.strip())
            continue
        if path.suffix == ".jsonl":
            rows = jsonl(path)
        elif path.suffix in (".csv", ".tsv"):
            rows = csv.DictReader(io.StringIO(read_utf8_text(path), newline=""),
                                  delimiter="\t" if path.suffix == ".tsv" else ",")
        else:
            raise SystemExit(f"{path}: expected .txt, .jsonl, .csv or .tsv")
        for i, row in enumerate(rows, start=1):
            missing = [f for f in fields if f not in row]
            if missing:
                raise SystemExit(f"{path}: row {i} has no field(s) {missing}; fields are {sorted(row)}")
            if split is not None and row.get("split") != split:
                continue
            for f in fields:
                v = row[f]
                yield from (v if isinstance(v, list) else [v])


def cmd_serve(args: argparse.Namespace) -> int:
    from mmformer.serve.commands import cmd_serve as run_serve

    return run_serve(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from mmformer.data.bundled import BundledDataNotFound
    from mmformer.demo import run_demo

    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:  # 0 used to be ignored, -1 to train without end
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not args.minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    try:
        return run_demo(args)
    except BundledDataNotFound as e:
        raise SystemExit(f"mmformer demo: {e}") from e


if __name__ == "__main__":
    raise SystemExit(run())
