"""int8 and ONNX inference: size, images/s and texts/s at batch 1 and 64 for fp32, bf16 autocast,
int8 through torch.ao and through torchao (eager and torch.compile-d), and the exported ONNX
graphs in onnxruntime (fp32 and int8), plus the held-out recall of a trained model under each.

    python -m bench.int8 --model runs/demo/model             # after `mmformer demo`
    python -m bench.int8 --presets tiny,small --model none   # speed and size only

Speed: encode_image / encode_text (ONNX: the two graphs through onnxruntime) of batches of each
``--batch-sizes``, the fastest of at least ``--repeats`` timed passes (more, until a second has
passed, for small batches) after a warm-up (which, for the compiled
rows, compiles for that shape), all in one process so the ratios compare like with like; torch
and onnxruntime use the same number of threads. Size: the Linear weights as stored in memory
(int8 values + per-channel scales) and the whole model serialized (``torch.save`` of the state
dict; ONNX: image.onnx + text.onnx, each of which holds the shared trunk). Closeness: the lowest
per-row cosine between each variant's and fp32's embeddings of 256 held-out images and captions.
Recall: the bundled held-out family, text->image and image->text R@1 of ``--model`` under each
variant.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch

from bench.common import OnnxModel, add_csv_argument, best_rate, load_tokenizer, machine_line, markdown_table, write_csv
from mmformer.compress import default_backend, int8_linear_bytes, quantize_int8
from mmformer.config import get_config
from mmformer.model import MMFormer

TEXT = "a smiling face with heart eyes and a red apple"


def serialized_mb(model: torch.nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


class TorchVariant:
    def __init__(self, model: MMFormer, dtype: torch.dtype | None = None) -> None:
        self.model, self.dtype = model, dtype

    def _run(self, fn):
        if self.dtype is None:
            return fn()
        with torch.autocast("cpu", dtype=self.dtype):
            return fn()

    def image(self, images: torch.Tensor):
        return self._run(lambda: self.model.encode_image(images)).float()

    def text(self, ids: torch.Tensor, mask: torch.Tensor):
        return self._run(lambda: self.model.encode_text(ids, mask)).float()

    def sizes(self) -> tuple[float | None, float | None]:
        return int8_linear_bytes(self.model)[0] / 2**20, serialized_mb(self.model) if self.dtype is None else None


class OnnxVariant(TorchVariant):
    """The exported graphs in onnxruntime (as many threads as torch), called as the model is."""

    def __init__(self, folder: Path, int8: bool) -> None:
        super().__init__(OnnxModel(folder, int8=int8, threads=torch.get_num_threads()))

    def sizes(self) -> tuple[float | None, float | None]:
        return None, self.model.file_bytes() / 2**20


def variants(model: MMFormer, args, scratch: Path, name: str) -> dict[str, object]:
    out: dict[str, object] = {"fp32": TorchVariant(model)}
    if not args.skip_bf16:
        out["bf16 autocast"] = TorchVariant(model, torch.bfloat16)
    out["int8 torch.ao"] = TorchVariant(quantize_int8(model, backend="torch.ao"))
    out["int8 torchao"] = TorchVariant(quantize_int8(model, backend="torchao"))
    if not args.skip_compile:
        out["int8 torchao + compile"] = TorchVariant(quantize_int8(model, backend="torchao", compile=True))
        if args.compile_fp32:
            fp32c = MMFormer(model.config, model.tokenizer).eval()
            fp32c.load_state_dict(model.state_dict())
            fp32c.forward_tokens = torch.compile(fp32c.forward_tokens)
            out["fp32 + compile"] = TorchVariant(fp32c)
    if not args.skip_onnx:
        from mmformer.compress.onnx import export_onnx

        folder = scratch / name.replace(" ", "_").replace("/", "_")
        export_onnx(model, folder)
        out["ONNX fp32 (onnxruntime)"] = OnnxVariant(folder, int8=False)
        out["ONNX int8 (onnxruntime)"] = OnnxVariant(folder, int8=True)
    return out


def recall(v, model: MMFormer) -> dict[str, float]:
    from mmformer.data.emoji import InMemoryImageText
    from mmformer.retrieval import retrieval_metrics

    c = model.config
    ds = InMemoryImageText.eval_split("test", c.image_size, c.image_mean, c.image_std)
    images = ds.stacked_images()
    with torch.inference_mode():
        img = torch.cat([v.image(images[s : s + 256]) for s in range(0, len(images), 256)])
        txt = []
        for s in range(0, len(ds.captions), 256):
            ids, mask = model.tokenizer(ds.captions[s : s + 256], max_length=c.context_length)
            txt.append(v.text(ids, mask))
    m = retrieval_metrics(img, torch.cat(txt), ds.caption_to_image.tolist())
    return {"t2i_R@1": m["t2i_R@1"], "i2t_R@1": m["i2t_R@1"]}


def closeness(v, ref, model: MMFormer, n: int = 256) -> dict[str, float]:
    """Lowest per-row cosine between the variant's and fp32's embeddings of ``n`` held-out images
    and captions (both unit length)."""
    from mmformer.data.emoji import InMemoryImageText

    c = model.config
    ds = InMemoryImageText.eval_split("test", c.image_size, c.image_mean, c.image_std)
    images = ds.stacked_images()[:n]
    ids, mask = model.tokenizer(ds.captions[:n], max_length=c.context_length)
    with torch.inference_mode():
        cos_i = (v.image(images) * ref.image(images)).sum(-1).min().item()
        cos_t = (v.text(ids, mask) * ref.text(ids, mask)).sum(-1).min().item()
    return {"cos_img": cos_i, "cos_txt": cos_t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--model", default="runs/demo/model", help="trained model for the recall rows ('none' to skip)")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-bf16", action="store_true", help="bf16 is emulated (slow) on CPUs without AVX-512 BF16")
    p.add_argument(
        "--skip-compile", action="store_true", help="no torch.compile rows (each compiles for a minute or more)"
    )
    p.add_argument("--compile-fp32", action="store_true", help="also a compiled fp32 row (what compile alone gives)")
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="keep timing a measurement (up to 200 calls) until this many seconds have passed (default: 1)",
    )
    add_csv_argument(p)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    tok, _ = load_tokenizer()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    models = [
        (name, MMFormer(get_config(name, vocab_size=tok.vocab_size), tok).eval())
        for name in args.presets.split(",")
        if name
    ]
    if args.model != "none" and Path(args.model).is_dir():
        models.append((f"trained ({args.model})", MMFormer.from_pretrained(args.model).eval()))
    rows = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        for name, model in models:
            c = model.config
            vs = variants(model, args, Path(scratch), name)
            for label, v in vs.items():
                lin_mb, file_mb = v.sizes()
                row = {"model": name, "variant": label}
                row.update({k: v for k, v in (("linear_mb", lin_mb), ("file_mb", file_mb)) if v is not None})
                for b in batches:
                    images = torch.randn(b, 3, c.image_size, c.image_size)
                    ids, mask = model.tokenizer([TEXT] * b, max_length=c.context_length)
                    row[f"img_{b}"] = best_rate(
                        lambda v=v, images=images: v.image(images), b, args.repeats, args.min_seconds
                    )
                    row[f"txt_{b}"] = best_rate(
                        lambda v=v, ids=ids, mask=mask: v.text(ids, mask), b, args.repeats, args.min_seconds
                    )
                row.update(closeness(v, vs["fp32"], model))
                if name.startswith("trained"):
                    row.update(recall(v, model))
                rows.append(row)
                print(row, flush=True)
    cols = [
        ("model", "model", 0),
        ("variant", "variant", 0),
        ("Linear weights MB", "linear_mb", 2),
        ("on disk MB", "file_mb", 2),
    ]
    for b in batches:
        cols += [(f"images/s b{b}", f"img_{b}", 0), (f"texts/s b{b}", f"txt_{b}", 0)]
    cols += [("min cos image", "cos_img", 4), ("min cos text", "cos_txt", 4)]
    if any("t2i_R@1" in r for r in rows):
        cols += [("t2i R@1", "t2i_R@1", 2), ("i2t R@1", "i2t_R@1", 2)]
    print()
    print(markdown_table(rows, cols))
    print(
        f"\nbest of {args.repeats} after a warm-up; {torch.get_num_threads()} torch / onnxruntime threads; "
        f"int8 auto backend on this CPU: {default_backend()}; total {time.time() - t_start:.0f} s"
    )
    print(machine_line())
    if args.csv:
        print(f"wrote {write_csv(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
