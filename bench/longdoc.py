"""Long documents: needle retrieval vs length and position, split needles, encode cost vs length.

Documents are prose filler (``data/prose/kjv.txt``) with an emoji caption (the needle) inserted
at a word boundary; the queries are a seeded subset of the held-out twitter images (test split),
the same for every length (the longest lengths take its first ``--long-queries``), and every
document is ranked against ALL test images (text -> image R@1, chance = 1/N). Methods:
``first`` (truncation to the first window), ``mean`` / ``max`` (pooling of chunk embeddings),
``fusion`` (cross-attention fusion; needs a model fine-tuned with train/longdoc.yaml). The
ceiling is the short-caption R@1 of the same model on the same queries. Needle positions are
spread evenly over the deciles (query i goes to decile i mod 10), so the position table reads
from the same documents.

Split needles: the caption's words are placed in distant parts of a document; each such
document has a hard negative holding only its first word (plus the other words of another
caption). Image -> document R@1 over all split documents and negatives.

Cost: encode time (median of repeats) and peak memory (resident-set growth in a fresh
subprocess) for one document, chunked + fusion versus one window over the whole document with
dense, local (sliding window + global) or compressed attention (same weights, context grown to
the document; only the cost is meaningful there, the model was not trained at that length).

On the CPU the bench calls :func:`mmformer.runtime.keep_freed_memory` first (as the fine-tuning
command does; ``--unmap-freed-memory`` to leave malloc alone): with glibc's default every large
buffer is a fresh mapping whose page faults grow with the document. On CUDA (``--device cuda``) memory is the peak of torch's allocator above what the model and
inputs already hold, and times are synchronised; ``--precision bf16`` runs every encode under
bf16 autocast (the embeddings are compared in float32).

    python -m bench.longdoc --model runs/longdoc/model                  # everything
    flock /tmp/mmformer-bench.lock python -m bench.longdoc --model M --only cost
    python -m bench.longdoc --model M --device cuda --precision bf16    # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import time

import torch
import torch.nn.functional as F

from bench.common import add_csv_argument, machine_line, markdown_table, module_command, subprocess_env, write_csv
from mmformer.config import DOCUMENT_MODES as MODES
from mmformer.data.emoji import InMemoryImageText
from mmformer.data.longdoc import Filler, load_prose, needle_documents, split_needle_documents
from mmformer.model import MMFormer
from mmformer.runtime import keep_freed_memory
from mmformer.training.precision import time_steps


def t2i_r1(image: torch.Tensor, text: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(Q,) bool: the target image ranks first (ties optimistic) among all images."""
    sims = text @ image.T  # (Q, N)
    correct = sims[torch.arange(len(target), device=sims.device), target]
    return (sims > correct[:, None]).sum(1) == 0


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` for ``precision == "bf16"``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def embed_docs(
    model: MMFormer,
    docs: list[list[int]],
    modes: tuple[str, ...],
    max_chunks_per_call: int = 4096,
    precision: str = "fp32",
):
    """{mode: (B, E) normalised float32}, documents grouped so one encoder call holds <=
    max_chunks_per_call chunks."""
    col = model.document_collator()
    device = model.logit_scale.device
    per = max(1, max_chunks_per_call // max(1, -(-max(len(d) for d in docs) // col.stride)))
    out = {m: [] for m in modes}
    with torch.inference_mode(), autocast(device, precision):
        for s in range(0, len(docs), per):
            res = model.forward_document(col.collate_ids(docs[s : s + per]).to(device), modes)
            for m in modes:
                out[m].append(F.normalize(res[m].float(), dim=-1))
    return {m: torch.cat(v) for m, v in out.items()}


def retrieval(model: MMFormer, args) -> list[dict]:
    """The length, position and (``--split-length``) split-needle tables; returns their rows."""
    tok = model.tokenizer
    modes = tuple(m for m in MODES if m != "fusion" or model.fusion is not None)
    ds = InMemoryImageText.eval_split(
        "test", model.config.image_size, model.config.image_mean, model.config.image_std, root=args.data_dir
    )
    device = model.logit_scale.device
    with torch.inference_mode(), autocast(device, args.precision):
        image = F.normalize(model.encode_image(ds.stacked_images().to(device)).float(), dim=-1)
        short = F.normalize(model.encode_texts(ds.captions).float(), dim=-1)
    filler = Filler(tok, load_prose(tok))
    n_img = len(ds)
    order = random.Random(args.seed).sample(range(n_img), n_img)  # one query order for every length
    pieces = model.config.context_length - 2
    length_rows, position_rows = [], []
    for length in args.lengths:
        n_q = args.queries if length <= args.long_from else args.long_queries
        q = sorted(order[:n_q])  # longer documents take a prefix of the same queries
        target = torch.tensor(q, device=device)
        ceiling = t2i_r1(image, short[q], target).float().mean().item() * 100
        positions = [(i % 10) / 10 for i in range(len(q))]
        docs = needle_documents(
            tok, [ds.captions[i] for i in q], length, filler, seed=args.seed + length, positions=positions
        )
        t0 = time.perf_counter()
        emb = embed_docs(model, [d.ids for d in docs], modes, precision=args.precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        hits = {m: t2i_r1(image, emb[m], target) for m in modes}
        label = f"{length} (1 window)" if length <= pieces else str(length)
        row = {
            "length": label,
            "queries": len(q),
            "ceiling": ceiling,
            "s_per_doc": dt / len(q),
            **{m: hits[m].float().mean().item() * 100 for m in modes},
        }
        if "fusion" in modes:
            row["fusion_frac"] = row["fusion"] / ceiling if ceiling else float("nan")
        length_rows.append(row)
        print(
            f"length {label}: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})}",
            flush=True,
        )
        if length > pieces:
            dec = torch.tensor([min(int(d.position * 10), 9) for d in docs], device=device)
            for m in modes:
                position_rows.append(
                    {
                        "length": length,
                        "method": m,
                        **{
                            f"d{k}": hits[m][dec == k].float().mean().item() * 100 if (dec == k).any() else float("nan")
                            for k in range(10)
                        },
                    }
                )
    print(
        f"\n### Text->image R@1 (%) vs document length (pieces); gallery = all {n_img} test images, "
        f"chance = {100 / n_img:.2f}%\n"
    )
    cols = [("length", "length", 0), ("queries", "queries", 0), ("short caption (ceiling)", "ceiling", 1)]
    cols += [(m if m != "first" else "truncation (first window)", m, 1) for m in modes]
    if "fusion" in modes:
        cols.append(("fusion / ceiling", "fusion_frac", 2))
    cols.append(("s / doc (all methods, one pass)", "s_per_doc", 3))
    print(markdown_table(length_rows, cols))
    print("\n### R@1 (%) vs needle position (decile of the document) \n")
    print(
        markdown_table(
            position_rows,
            [("length", "length", 0), ("method", "method", 0)]
            + [(f"{k * 10}-{k * 10 + 10}%", f"d{k}", 1) for k in range(10)],
        )
    )
    rows = [{"table": "length", **r} for r in length_rows] + [{"table": "position", **r} for r in position_rows]
    if args.split_length:
        split_rows = split(model, image, ds, filler, modes, args)
        rows += [{"table": "split", "length": args.split_length, **r} for r in split_rows]
    return rows


def split(model, image, ds, filler, modes, args) -> list[dict]:
    tok = model.tokenizer
    rng = random.Random(args.seed + 7)
    q = sorted(rng.sample(range(len(ds)), min(args.queries, len(ds))))
    caps = [ds.captions[i] for i in q]
    docs, negs = split_needle_documents(tok, caps, args.split_length, filler, seed=args.seed)
    owners = torch.tensor([q[d.needle_index] for d in docs], device=image.device)  # image of each split document
    emb = embed_docs(model, [d.ids for d in docs] + [n.ids for n in negs], modes, precision=args.precision)
    rows = []
    for m in modes:
        sims = (image[owners] @ emb[m].T).cpu()  # (Q, 2Q): images of the split captions vs all documents
        correct = sims[torch.arange(len(docs)), torch.arange(len(docs))]
        r1 = ((sims > correct[:, None]).sum(1) == 0).float().mean().item() * 100
        neg_wins = (
            sims[torch.arange(len(docs)), len(docs) + torch.arange(len(docs))] > correct
        ).float().mean().item() * 100
        rows.append({"method": m, "r1": r1, "neg": neg_wins})
    print(
        f"\n### Split needles at {args.split_length} pieces: image -> document R@1 (%) over {len(docs)} split "
        f"documents + {len(negs)} hard negatives (chance {100 / (2 * len(docs)):.2f}%)\n"
    )
    print(
        markdown_table(
            rows, [("method", "method", 0), ("R@1", "r1", 1), ("own hard negative scores higher (%)", "neg", 1)]
        )
    )
    return rows


# ---- cost -----------------------------------------------------------------------------------------
def measure(args) -> None:
    """Child process: time and peak-memory growth of one encode; prints one JSON line."""
    method, length = args.measure[0], int(args.measure[1])
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = MMFormer.from_pretrained(args.model).eval()
    ids = torch.randint(4, base.config.vocab_size, (length,)).tolist()
    if method == "chunked":
        model = base
        mode = "fusion" if base.fusion is not None else "mean"
        col = model.document_collator()
        model = model.to(device)
        batch, warm = col.collate_ids([ids]).to(device), col.collate_ids([ids[:64]]).to(device)
        run = lambda b=batch: model.forward_document(b, (mode,))  # noqa: E731
    else:
        cfg = dataclasses.replace(base.config, context_length=length + 2, fusion_latents=0)
        model = MMFormer(cfg).eval()
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("fusion.")}
        model.load_state_dict(state)
        model = model.to(device)
        opts = {"local": dict(window=args.window, n_global=1), "compressed": dict(compression=args.compression)}
        model.set_text_attention(method if method != "dense" else "dense", **opts.get(method, {}))
        x, warm = torch.tensor([[2, *ids, 3]], device=device), torch.tensor([[2, *ids[:64], 3]], device=device)
        run = lambda b=x: model.encode_text(b)  # noqa: E731
    cuda = device.type == "cuda"
    with torch.inference_mode(), autocast(device, args.precision):
        run(warm)  # first-call initialisation, outside the measurement
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            mem0 = torch.cuda.memory_allocated(device) / 2**20
        else:
            _reset_peak()
            mem0 = _status_mb("VmRSS")

        def timed() -> None:
            run()
            if cuda:
                torch.cuda.synchronize(device)

        seconds = time_steps(timed, args.repeats, warmup=0)  # the median; warmed up above
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _status_mb("VmHWM")) - mem0
    print(json.dumps({"time_s": seconds, "peak_mb": max(peak, 0.0)}))


def _reset_peak() -> None:
    """Reset this process's peak resident set (VmHWM) to the current one (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


COST_METHODS = ("chunked", "dense", "local", "compressed")


def cost(args) -> list[dict]:
    methods = args.cost_methods
    rows = []
    for length in args.cost_lengths:
        row = {"length": length}
        for m in methods:
            if m == "dense" and length > args.dense_max:
                row[m + "_t"] = row[m + "_m"] = float("nan")
                continue
            cmd = module_command(
                "bench.longdoc",
                "--model",
                args.model,
                "--measure",
                m,
                str(length),
                "--repeats",
                str(args.repeats),
                "--window",
                str(args.window),
                "--compression",
                str(args.compression),
                "--device",
                args.device,
                "--precision",
                args.precision,
            )
            cmd += ["--unmap-freed-memory"] if args.unmap_freed_memory else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
            if proc.returncode:
                raise RuntimeError(f"cost of {m} at {length} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            out = proc.stdout.strip().splitlines()[-1]
            r = json.loads(out)
            row[m + "_t"], row[m + "_m"] = r["time_s"], r["peak_mb"]
        rows.append(row)
        print(f"cost {length}: {row}", flush=True)
    for prev, cur in zip(rows, rows[1:]) if "chunked" in methods else ():
        cur["chunked_ratio"] = (
            cur["chunked_t"] / prev["chunked_t"] if cur["length"] == 2 * prev["length"] else float("nan")
        )
    print(
        f"\n### Encode cost of one document on {args.device} ({args.precision}; time s, peak memory growth MB); "
        f"local window {args.window} + 1 global token, compression {args.compression}\n"
    )
    cols = [
        ("length", "length", 0),
        ("chunked+fusion s", "chunked_t", 3),
        ("x per doubling", "chunked_ratio", 2),
        ("chunked MB", "chunked_m", 0),
        ("dense s", "dense_t", 3),
        ("dense MB", "dense_m", 0),
        ("local s", "local_t", 3),
        ("local MB", "local_m", 0),
        ("compressed s", "compressed_t", 3),
        ("compressed MB", "compressed_m", 0),
    ]
    cols = [c for c in cols if c[1] == "length" or c[1].rsplit("_", 1)[0] in methods]
    print(markdown_table(rows, cols))
    return [{"table": "cost", **r} for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="save_pretrained directory (with fusion for the fusion column)")
    p.add_argument("--only", choices=["retrieval", "cost"], default=None)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[14, 2048, 4096, 8192, 16384])
    p.add_argument("--queries", type=int, default=256, help="query images for lengths <= --long-from")
    p.add_argument("--long-queries", type=int, default=128, help="query images for longer documents")
    p.add_argument("--long-from", type=int, default=4096)
    p.add_argument("--split-length", type=int, default=2048, help="0 = skip the split-needle table")
    p.add_argument(
        "--cost-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192, 16384]
    )
    p.add_argument(
        "--cost-methods",
        type=lambda s: [m for m in s.split(",") if m],
        default=list(COST_METHODS),
        help="comma-separated, of " + ", ".join(COST_METHODS) + " (default: all)",
    )
    p.add_argument("--dense-max", type=int, default=16384, help="skip dense attention beyond this length")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--compression", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed encodes per measurement (the median counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast")
    p.add_argument(
        "--unmap-freed-memory",
        action="store_true",
        help="leave glibc's malloc as it is (mmformer.runtime.keep_freed_memory is called otherwise)",
    )
    p.add_argument("--data-dir", default=None, help="the emoji data of the query images (default: the bundled copy)")
    add_csv_argument(p)
    p.add_argument("--measure", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.cost_methods or set(args.cost_methods) - set(COST_METHODS):
        p.error(f"--cost-methods {','.join(args.cost_methods)}: choose from {', '.join(COST_METHODS)}")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    if not args.unmap_freed_memory:
        keep_freed_memory()  # as the fine-tuning command does; else page faults grow with length
    if args.measure:
        measure(args)
        return 0
    model = MMFormer.from_pretrained(args.model).eval().to(args.device)
    print(
        f"model {args.model}: window {model.config.context_length} tokens ({model.config.context_length - 2} pieces), "
        f"fusion {'with ' + str(model.config.fusion_latents) + ' latents' if model.fusion is not None else 'none'}"
    )
    rows = []
    if args.only in (None, "retrieval"):
        rows += retrieval(model, args)
    if args.only in (None, "cost"):
        rows += cost(args)
    gpu = f", {torch.cuda.get_device_name(args.device)}" if torch.device(args.device).type == "cuda" else ""
    print("\n" + machine_line() + gpu + f", {args.precision}")
    if args.csv:
        rows = [{**r, "device": args.device + gpu, "precision": args.precision} for r in rows]
        print(f"wrote {write_csv(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
