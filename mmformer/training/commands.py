"""The verbs that run on the training side: ``mmformer export`` (a Lightning checkpoint -> a
``save_pretrained`` folder, any model -> ONNX graphs), ``mmformer index build`` (embedding with
Lightning ``trainer.predict``, :mod:`mmformer.training.index_build`), and the flags of ``mmformer
prune`` (the verb is :func:`mmformer.training.prune.prune_command`). Each verb is a typed function
(``*_command``) with an ``add_*_arguments`` function that declares its flags; the module imports
torch and Lightning only when a verb runs, so that the verbs' ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mmformer.retrieval.options import (
    BACKEND_CHOICES,
    DATA_DIR_HELP,
    INDEX_DTYPE_CHOICES,
    add_backend_params,
    backend_params,
    positive,
)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mmformer export``."""
    p.add_argument("--ckpt", default=None, help="Lightning .ckpt file or sharded checkpoint folder (FSDP)")
    p.add_argument("--out", default=None, help="save_pretrained directory to write (with --ckpt)")
    p.add_argument("--model", default=None, help="save_pretrained directory to export to ONNX (with --onnx)")
    p.add_argument(
        "--onnx",
        default=None,
        metavar="DIR",
        help="write image.onnx, text.onnx (+ onnxruntime int8 copies), config and tokenizer to DIR",
    )
    p.add_argument("--no-int8", action="store_true", help="with --onnx: skip the int8 graphs")
    p.add_argument(
        "--open-clip",
        default=None,
        metavar="FILE",
        help="with --model: write its weights as an open_clip CLIP state dict (.pt or .safetensors)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing model folder at --out (swapped in only once complete)",
    )


def add_index_build_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mmformer index build``."""
    p.description = (
        "Embed with Lightning trainer.predict; resumable after a kill; unreadable inputs are skipped "
        "and listed in skipped.jsonl."
    )
    p.add_argument("--model", required=True, help="save_pretrained directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--images", help="folder of images, CSV/TSV/JSONL manifest, or WebDataset shards (.tar path or brace pattern)"
    )
    src.add_argument("--texts", help=".txt file (one text a line) or a manifest (its captions)")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="auto: exact up to 100k rows, else hnsw")
    p.add_argument("--dtype", default="float32", choices=INDEX_DTYPE_CHOICES, help="storage of embeddings.npy")
    p.add_argument("--split", default=None, help="manifest rows whose 'split' column equals this")
    p.add_argument("--image-col", default="image")
    p.add_argument("--caption-col", default="caption")
    p.add_argument(
        "--root",
        default=None,
        help="manifest sources: refuse image paths (absolute, ../, symlinks) "
        "that lead outside DIR (for manifests taken from elsewhere)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--part-size", type=int, default=1024, help="inputs per resumable part")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 32-true, bf16-mixed")
    p.add_argument("--int8", action="store_true", help="embed with the int8-quantized model (CPU)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", default="1")
    p.add_argument("--strategy", default="auto", help="e.g. ddp to embed on several devices")
    p.add_argument("--num-nodes", type=int, default=1)
    add_backend_params(p)
    p.add_argument("--overwrite", action="store_true", help="replace an index or parts of another build")


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mmformer prune``."""
    p.add_argument("--model", required=True, help="save_pretrained directory to prune")
    p.add_argument(
        "--heads",
        type=float,
        required=True,
        metavar="FRACTION",
        help="fraction of all heads to remove, in [0, 1); the lowest-scored over all blocks, "
        "at least one head left in every block",
    )
    p.add_argument("--out", required=True, help="save_pretrained directory to write the pruned model to")
    p.add_argument(
        "--criterion",
        choices=["gradient", "magnitude"],
        default="gradient",
        help="head importance: mean |dL/d gate| of the CLIP loss on training batches (default), "
        "or the norm of the head's weights (no data)",
    )
    p.add_argument(
        "--normalize",
        choices=["block", "none"],
        default="block",
        help="divide each block's scores by their L2 norm before the global ranking (block, "
        "default: Michel et al. 2019), or rank the raw scores (none)",
    )
    p.add_argument("--batches", type=int, default=8, help="training batches for the gradient criterion")
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="pairs per batch, for the scores and the recovery (default 256, the demo's training "
        'batch; README "Compression" shows what the earlier 64 with a constant rate cost)',
    )
    p.add_argument(
        "--recover",
        type=int,
        default=0,
        metavar="STEPS",
        help="fine-tune the pruned model this many steps (CLIP loss + distillation from the "
        "unpruned model, through the Lightning Trainer) on the training data, augmented, epoch "
        "after epoch; 0 = none",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=8e-4,
        help="recovery learning rate (AdamW), decayed to 0 on a cosine (default 8e-4, the shipped "
        'recipes\' training rate: README "Compression" compares 1e-4 and 4e-4)',
    )
    p.add_argument(
        "--precision",
        choices=["auto", "32-true", "bf16-mixed"],
        default="auto",
        help="recovery precision: auto (time a few training steps of each on one recovery batch, "
        "keep the faster, as `mmformer demo` does), 32-true, or bf16-mixed (bf16 autocast, "
        "fp32 weights)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the training batches' order and augmentation")
    p.add_argument(
        "--data",
        default=None,
        metavar="MANIFEST",
        help="CSV/TSV/JSONL manifest of image-caption pairs to score and recover on (default: the "
        "bundled emoji training split)",
    )
    p.add_argument(
        "--shards",
        default=None,
        metavar="PATTERN",
        help="WebDataset shard pattern to score and recover on, instead of a manifest",
    )
    p.add_argument("--image-col", default="image", help="with --data: the manifest's image column")
    p.add_argument("--caption-col", default="caption", help="with --data: the manifest's caption column")
    p.add_argument("--data-dir", default=None, help="without --data/--shards: " + DATA_DIR_HELP)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing model folder at --out (swapped in only once complete)",
    )


def export_command(
    *,
    ckpt: str | None = None,
    out: str | None = None,
    model: str | None = None,
    onnx: str | None = None,
    no_int8: bool = False,
    open_clip: str | None = None,
    overwrite: bool = False,
) -> int:
    """``mmformer export``: the Lightning checkpoint ``ckpt`` (a file, or the folder of a sharded FSDP
    checkpoint) as a ``save_pretrained`` folder ``out`` and/or ONNX graphs in ``onnx``; or the saved
    model ``model`` as ONNX graphs and/or an open_clip state dict ``open_clip``."""
    from mmformer.training.checkpoint import export_checkpoint

    if (ckpt is None) == (model is None):
        raise SystemExit(
            "mmformer export: give --ckpt FILE|DIR (with --out and/or --onnx) or --model DIR (with --onnx)"
        )
    if ckpt is not None and out is None and onnx is None:
        raise SystemExit("mmformer export: --ckpt needs --out DIR (save_pretrained) and/or --onnx DIR")
    if model is not None and open_clip is not None:
        from mmformer.clip_io import export_open_clip

        print(f"wrote {export_open_clip(model, open_clip)}")
        if onnx is None:
            return 0
    if model is not None and onnx is None:
        raise SystemExit("mmformer export: --model needs --onnx DIR or --open-clip FILE")
    model_dir = model
    with tempfile.TemporaryDirectory() as scratch:
        if ckpt is not None:
            # a .ckpt file, or the folder of a sharded (FSDP) checkpoint; errors print as one line (run)
            model_dir = export_checkpoint(ckpt, out or Path(scratch) / "model", overwrite=overwrite if out else False)
            if out:
                print(f"wrote {model_dir} (config.json, model.safetensors, tokenizer.model)")
        if onnx is not None:
            export_onnx_folder(model_dir, onnx, int8=not no_int8)
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
    print(
        f"onnxruntime vs PyTorch: fp32 max |diff| image {p['image_fp32_max_abs_diff']:.1e}, "
        f"text {p['text_fp32_max_abs_diff']:.1e}"
        + (
            f"; int8 min cosine image {p['image_int8_min_cosine']:.4f}, text {p['text_int8_min_cosine']:.4f}"
            if int8
            else ""
        )
    )


def index_build_command(
    *,
    model: str,
    out: str,
    images: str | None = None,
    texts: str | None = None,
    backend: str = "auto",
    dtype: str = "float32",
    split: str | None = None,
    image_col: str = "image",
    caption_col: str = "caption",
    root: str | None = None,
    batch_size: int = 256,
    part_size: int = 1024,
    workers: int = 0,
    precision: str = "32-true",
    int8: bool = False,
    accelerator: str = "cpu",
    devices: str = "1",
    strategy: str = "auto",
    num_nodes: int = 1,
    hnsw_m: int | None = None,
    ef_construction: int | None = None,
    nlist: int | None = None,
    pq_m: int | None = None,
    ef_search: int | None = None,
    nprobe: int | None = None,
    refine: int | None = None,
    overwrite: bool = False,
) -> int:
    """``mmformer index build``: embed ``images`` (or ``texts``) with the saved model ``model`` through
    Lightning ``trainer.predict`` and write the index ``out`` (resumable; unreadable inputs listed
    in ``skipped.jsonl``)."""
    from mmformer.compress import quantize_int8
    from mmformer.model import MMFormer
    from mmformer.retrieval.embed import truncation_note
    from mmformer.training.index_build import build_index

    positive("--batch-size", batch_size)
    positive("--part-size", part_size)
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if (images is None) == (texts is None):
        raise ValueError("give one of --images SRC or --texts SRC")
    net = MMFormer.from_pretrained(model)
    if int8:
        net = quantize_int8(net)
    params = backend_params(
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        nlist=nlist,
        pq_m=pq_m,
        ef_search=ef_search,
        nprobe=nprobe,
        refine=refine,
    )
    index = build_index(
        net,
        images or texts,
        out,
        kind="image" if images else "text",
        backend=backend,
        backend_params=params,
        dtype=dtype,
        batch_size=batch_size,
        part_size=part_size,
        num_workers=workers,
        precision=precision,
        accelerator=accelerator,
        devices=int(devices) if devices.isdigit() else devices,
        strategy=strategy,
        num_nodes=num_nodes,
        model_path=str(Path(model).resolve()),
        image_col=image_col,
        caption_col=caption_col,
        split=split,
        overwrite=overwrite,
        root=root,
    )
    if index is None:  # a non-zero rank of a multi-device build
        return 0
    m = index.manifest
    print(
        f"wrote {out}: {m['count']} {m['kind']} rows x {m['dim']} ({m['dtype']}), backend {m['backend']}, "
        f"{m['skipped']} skipped; embedding {m['embed_seconds']:.1f} s, index {m['index_seconds']:.1f} s"
    )
    if m["skipped"]:
        print(f"unreadable inputs are listed in {Path(out) / 'skipped.jsonl'}")
    note = truncation_note(m.get("truncated", 0), m["count"], net.config.context_length)
    if note:
        print(note)
    return 0
