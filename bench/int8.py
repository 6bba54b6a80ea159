"""int8 inference: model size, images/s and texts/s for fp32, bf16 autocast and int8, and the
held-out recall change of a trained model.

    python bench/int8.py --model runs/demo/model             # after `mmformer demo`
    python bench/int8.py --presets tiny,small --model none   # speed and size only

Speed: encode_image / encode_text of batches (``--batch-size``), best of ``--repeats`` timed
passes after a warm-up, in one process so the ratios compare like with like. Size: the Linear
weights as stored in memory (int8 values + per-channel scales) and the whole state dict
serialized (``torch.save``; the float model in safetensors). Recall: the bundled held-out
family (twitter), text->image and image->text R@1 of ``--model`` under each precision.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_tokenizer, machine_line, markdown_table  # noqa: E402

from mmformer.compress import int8_linear_bytes, quantize_int8  # noqa: E402
from mmformer.config import get_config  # noqa: E402
from mmformer.model import MMFormer  # noqa: E402


def serialized_mb(model: torch.nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def variants(model: MMFormer) -> dict[str, tuple[MMFormer, torch.dtype | None]]:
    return {"fp32": (model, None), "bf16 autocast": (model, torch.bfloat16), "int8": (quantize_int8(model), None)}


def throughput(fn, batch: int, repeats: int) -> float:
    with torch.inference_mode():
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return batch / best


def run(fn, dtype: torch.dtype | None):
    if dtype is None:
        return fn()
    with torch.autocast("cpu", dtype=dtype):
        return fn()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--model", default="runs/demo/model", help="trained model for the recall rows ('none' to skip)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-bf16", action="store_true", help="bf16 is emulated (slow) on CPUs without AVX-512 BF16")
    args = p.parse_args()
    torch.manual_seed(0)
    tok, _ = load_tokenizer()
    rows = []
    models = [(name, MMFormer(get_config(name, vocab_size=tok.vocab_size), tok).eval())
              for name in args.presets.split(",")]
    if args.model != "none" and Path(args.model).is_dir():
        models.append((f"trained ({args.model})", MMFormer.from_pretrained(args.model).eval()))
    for name, model in models:
        c = model.config
        images = torch.randn(args.batch_size, 3, c.image_size, c.image_size)
        texts = ["a smiling face with heart eyes and a red apple"] * args.batch_size
        ids, mask = model.tokenizer(texts, max_length=c.context_length)
        for label, (m, dtype) in variants(model).items():
            if args.skip_bf16 and dtype is torch.bfloat16:
                continue
            lin_mb = int8_linear_bytes(m)[0] / 2**20
            row = {"model": name, "precision": label, "linear_mb": lin_mb,
                   "file_mb": serialized_mb(m) if label != "bf16 autocast" else float("nan"),
                   "img_s": throughput(lambda: run(lambda: m.encode_image(images), dtype), args.batch_size, args.repeats),
                   "txt_s": throughput(lambda: run(lambda: m.encode_text(ids, mask), dtype), args.batch_size, args.repeats)}
            if name.startswith("trained"):
                row.update(recall(m, dtype))
            rows.append(row)
            print(row, flush=True)
    print()
    print(markdown_table(rows, [("model", "model", 0), ("precision", "precision", 0),
                                ("Linear weights MB", "linear_mb", 2), ("state dict MB", "file_mb", 2),
                                ("images/s", "img_s", 0), ("texts/s", "txt_s", 0),
                                ("t2i R@1", "t2i_R@1", 2), ("i2t R@1", "i2t_R@1", 2)]))
    print(f"\nbatch {args.batch_size}, best of {args.repeats}; int8 = torch dynamic quantization "
          f"(per-channel weights, engine {torch.backends.quantized.engine})")
    print(machine_line())


def recall(model: MMFormer, dtype: torch.dtype | None) -> dict[str, float]:
    from mmformer.data.emoji import InMemoryImageText
    from mmformer.retrieval import evaluate_retrieval

    c = model.config
    ds = InMemoryImageText.eval_split("test", c.image_size, c.image_mean, c.image_std)
    m = evaluate_retrieval(model, model.tokenizer, ds.stacked_images(), ds.captions, ds.caption_to_image.tolist(),
                           batch_size=256, autocast_dtype=dtype)
    return {"t2i_R@1": m["t2i_R@1"], "i2t_R@1": m["i2t_R@1"]}


if __name__ == "__main__":
    main()
