"""Search backends at scale: build time, memory, query latency and recall@10 against exact.

    python -m bench.retrieval                                   # 100k and 1M x 256, clustered + random
    python -m bench.retrieval --n 100000 --dims 256,512 --backends exact,flat,hnsw,ivfpq

Vectors are unit length: ``random`` = uniform on the sphere (the hardest case for any
approximate index: no structure), ``clustered`` = 1000 centres with spread (closer to real
embeddings). Queries come from the same distribution. Latency is measured per call: batch 1
(p50/p99 over ``--queries`` calls) and batch 64 (per-query time of a 64-query call). Memory is
the backend's own bytes (FAISS: its serialized size; exact: the float32 matrix) and the
process RSS growth while building. Recall@10 is the overlap with exact top-10, averaged.

``--disk`` measures the on-disk path instead, one row per ``--n`` (clustered, float16 storage,
IVF-PQ with exact re-ranking from the memory-mapped embeddings)::

    python -m bench.retrieval --disk --n 10000000 --workdir /data/bench-index   # the 10M row
    python -m bench.retrieval --disk --n 200000 --nlist 256                     # smoke size

The vectors are written to ``--workdir`` in blocks; exact top-10 of ``--queries`` (default 1000)
queries is computed blockwise over the stored float16 values; the index is built from the file
by ``build_from_embeddings`` in one subprocess (build time, peak RSS) and searched memory-mapped
in another (batch-1 p50/p99 on one thread, recall@10, peak RSS); index size = its files on disk.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import add_csv_argument, machine_line, markdown_table, write_csv
from mmformer.retrieval.backends import BackendParams, ExactBackend, FaissBackend


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def make_data(n: int, d: int, kind: str, seed: int, centers: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):  # in blocks: 1M x 512 float64 would need 4 GB at once
        m = min(100_000, n - s)
        if kind == "random":
            x = rng.standard_normal((m, d), dtype=np.float32)
        else:
            x = centers[rng.integers(0, len(centers), m)] + 0.5 / np.sqrt(d) * rng.standard_normal(
                (m, d), dtype=np.float32
            )
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latency(backend, q: np.ndarray, batch: int, k: int = 10) -> tuple[float, float]:
    """(p50, p99) milliseconds per query of calls with ``batch`` queries each."""
    times = []
    for s in range(0, len(q) - batch + 1, batch):
        t = time.perf_counter()
        backend.search(q[s : s + batch], k)
        times.append((time.perf_counter() - t) * 1000 / batch)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def backend_bytes(b) -> int:
    if isinstance(b, ExactBackend):
        return b.matrix.numel() * 4
    import faiss

    return int(faiss.serialize_index(b.index).size)


# ---- the on-disk row (--disk) ------------------------------------------------------------------
def write_clustered_npy(path: Path, n: int, d: int, centers: np.ndarray, seed: int, dtype=np.float16) -> None:
    """``make_data(..., "clustered")`` rows streamed into a ``.npy`` file in blocks (never all in memory)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n, d)}
        )
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            x = centers[rng.integers(0, len(centers), m)] + 0.5 / np.sqrt(d) * rng.standard_normal(
                (m, d), dtype=np.float32
            )
            f.write((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype).tobytes())


def exact_top10(path: Path, q: np.ndarray) -> np.ndarray:
    """Exact top-10 rows of each query over a ``.npy`` file, block by block."""
    import torch

    from mmformer.retrieval.backends import iter_npy_blocks

    best_s = torch.full((len(q), 10), -torch.inf)
    best_i = torch.full((len(q), 10), -1, dtype=torch.long)
    qt = torch.from_numpy(q)
    for start, block in iter_npy_blocks(path, 262_144):
        s = qt @ torch.from_numpy(block).T
        top = torch.topk(s, min(10, s.shape[1]), dim=1)
        cand_s = torch.cat([best_s, top.values], 1)
        cand_i = torch.cat([best_i, top.indices + start], 1)
        keep = torch.topk(cand_s, 10, dim=1).indices
        best_s, best_i = cand_s.gather(1, keep), cand_i.gather(1, keep)
    return best_i.numpy()


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would also count the parent it was forked from)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child_build(spec: dict) -> dict:
    from mmformer.retrieval import build_from_embeddings

    t0 = time.perf_counter()
    index = build_from_embeddings(
        spec["src"], spec["out"], backend="ivfpq", dtype="float16", backend_params=spec["params"]
    )
    return {
        "build_s": time.perf_counter() - t0,
        "build_rss_mb": peak_rss_mb(),
        "params": index.manifest["backend_params"],
    }


def child_search(spec: dict) -> dict:
    import faiss
    import torch

    from mmformer.retrieval import Index

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    index = Index.open(spec["out"], mmap=True, verify=False, search_params=spec["search"])
    q = np.load(spec["queries"])
    truth = np.load(spec["truth"])
    for i in range(min(20, len(q))):  # first touches of the centroids and code tables
        index.search(q[i : i + 1], 10)
    times, found = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        _, ids = index.search(q[i : i + 1], 10)
        times.append((time.perf_counter() - t) * 1000)
        found.append(ids[0])
    recall = float(np.mean([len(np.intersect1d(a, t)) / 10 for a, t in zip(found, truth)]))
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "recall": recall,
        "search_rss_mb": peak_rss_mb(),
    }


def run_child(kind: str, spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.retrieval", "--child", kind, json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"bench.retrieval: the {kind} subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def disk_rows(args) -> list[dict]:
    rows = []
    d = 256
    for n in map(int, args.n.split(",")):
        work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-retrieval-")) / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        centers = make_data(1000, d, "random", seed=1)
        t0 = time.perf_counter()
        write_clustered_npy(work / "vectors.npy", n, d, centers, seed=2)
        q = make_data(args.queries or 1000, d, "clustered", seed=3, centers=centers)
        np.save(work / "queries.npy", q)
        t1 = time.perf_counter()
        np.save(work / "truth.npy", exact_top10(work / "vectors.npy", q))
        truth_s = time.perf_counter() - t1
        print(f"n={n}: data {t1 - t0:.0f} s, exact ground truth {truth_s:.0f} s", flush=True)
        params = {k: v for k, v in (("nlist", args.nlist), ("train_size", args.train_size)) if v}
        built = run_child("build", {"src": str(work / "vectors.npy"), "out": str(work / "index"), "params": params})
        (work / "vectors.npy").unlink()  # the index holds its own copy
        disk = sum(f.stat().st_size for f in (work / "index").iterdir() if f.is_file())
        p = built["params"]
        nprobes = [int(v) for v in args.nprobes.split(",")] if args.nprobes else [args.nprobe]
        for nprobe in nprobes:  # one build, searched at each nprobe
            search = {k: v for k, v in (("nprobe", nprobe), ("refine", args.refine)) if v}
            found = run_child(
                "search",
                {
                    "out": str(work / "index"),
                    "queries": str(work / "queries.npy"),
                    "truth": str(work / "truth.npy"),
                    "search": search,
                },
            )
            row = {
                "n": n,
                "dim": d,
                "nlist": p["nlist"],
                "nprobe": search.get("nprobe", p["nprobe"]),
                "refine": search.get("refine", p["refine"]),
                "build_s": built["build_s"],
                "build_rss_mb": built["build_rss_mb"],
                "disk_mb": disk / 2**20,
                "search_rss_mb": found["search_rss_mb"],
                "p50_ms": found["p50_ms"],
                "p99_ms": found["p99_ms"],
                "recall": found["recall"],
                "truth_s": truth_s,
            }
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        markdown_table(
            [{**r, "n": f"{r['n']:,}"} for r in rows],
            [
                ("N", "n", 0),
                ("dim", "dim", 0),
                ("nlist", "nlist", 0),
                ("nprobe", "nprobe", 0),
                ("re-rank x k", "refine", 0),
                ("build s", "build_s", 0),
                ("build peak RSS MB", "build_rss_mb", 0),
                ("index on disk MB", "disk_mb", 0),
                ("search peak RSS MB", "search_rss_mb", 0),
                ("p50 ms (batch 1)", "p50_ms", 2),
                ("p99 ms (batch 1)", "p99_ms", 2),
                ("recall@10 vs exact", "recall", 3),
            ],
        )
    )
    print(
        "\nIVF-PQ (D/4 bytes a vector) built from a float16 file by build_from_embeddings, lists on disk; "
        "searched memory-mapped on 1 thread, re-ranked exactly from the float16 embeddings"
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--child":
        result = {"build": child_build, "search": child_search}[sys.argv[2]](json.loads(sys.argv[3]))
        print(json.dumps(result))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="100000,1000000")
    p.add_argument("--dims", default="256")
    p.add_argument("--data", default="clustered,random")
    p.add_argument("--backends", default="exact,hnsw,ivfpq")
    p.add_argument("--queries", type=int, default=None, help="queries per measurement (default 256; --disk: 1000)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW ef_search (default: the library's)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF nprobe (default: the library's)")
    p.add_argument(
        "--nprobes", default=None, help="--disk: comma-separated nprobe values, each searched on the one build"
    )
    p.add_argument(
        "--exact-queries", type=int, default=None, help="batch-1 exact latency over this many queries (default: all)"
    )
    p.add_argument(
        "--disk",
        action="store_true",
        help="the on-disk row: build from a file and search memory-mapped, each in a subprocess",
    )
    p.add_argument("--workdir", default=None, help="--disk: where the vectors and the index go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="--disk: keep the vectors and the index afterwards")
    p.add_argument("--nlist", type=int, default=None, help="--disk: IVF lists (default: the library's rule)")
    p.add_argument("--train-size", type=int, default=None, help="--disk: IVF-PQ training rows (default: the library's)")
    p.add_argument("--refine", type=int, default=None, help="--disk: re-rank refine x k candidates exactly")
    add_csv_argument(p)
    args = p.parse_args(argv)
    if args.disk:
        rows = disk_rows(args)
        print(machine_line())
        if args.csv:
            print(f"wrote {write_csv(args.csv, rows)}")
        return 0
    args.queries = args.queries or 256
    if args.queries < 64:
        p.error(f"--queries {args.queries}: at least 64 (the batch-64 latency needs one full batch)")
    params = BackendParams.from_dict(
        {k: v for k, v in (("ef_search", args.ef_search), ("nprobe", args.nprobe)) if v is not None}
    )
    rows = []
    for n in map(int, args.n.split(",")):
        for d in map(int, args.dims.split(",")):
            for kind in args.data.split(","):
                centers = make_data(1000, d, "random", seed=1)
                x = make_data(n, d, kind, seed=2, centers=centers)
                q = make_data(args.queries, d, kind, seed=3, centers=centers)
                _, truth = ExactBackend(x).search(q, 10)
                for name in args.backends.split(","):
                    gc.collect()
                    before = rss_mb()
                    t0 = time.perf_counter()
                    b = ExactBackend(x) if name == "exact" else FaissBackend.build(name, x, params)
                    build_s = time.perf_counter() - t0
                    grown = rss_mb() - before
                    q1 = q[: args.exact_queries] if name == "exact" and args.exact_queries else q
                    p50, p99 = latency(b, q1, 1)
                    b50, _ = latency(b, q, 64)
                    _, ids = b.search(q, 10)
                    recall = float(np.mean([len(np.intersect1d(a, t)) / 10 for a, t in zip(ids, truth)]))
                    row = {
                        "n": n,
                        "dim": d,
                        "data": kind,
                        "backend": name,
                        "build_s": build_s,
                        "index_mb": backend_bytes(b) / 2**20,
                        "rss_mb": grown,
                        "p50_ms": p50,
                        "p99_ms": p99,
                        "b64_ms": b50,
                        "recall": recall,
                    }
                    rows.append(row)
                    print(
                        " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                        flush=True,
                    )
                    del b
                del x
    print()
    shown = [{**r, "n": f"{r['n']:,}"} for r in rows]
    print(
        markdown_table(
            shown,
            [
                ("N", "n", 0),
                ("dim", "dim", 0),
                ("data", "data", 0),
                ("backend", "backend", 0),
                ("build s", "build_s", 1),
                ("index MB", "index_mb", 0),
                ("RSS growth MB", "rss_mb", 0),
                ("p50 ms (batch 1)", "p50_ms", 2),
                ("p99 ms (batch 1)", "p99_ms", 2),
                ("ms/query (batch 64)", "b64_ms", 3),
                ("recall@10 vs exact", "recall", 3),
            ],
        )
    )
    defaults = BackendParams()
    print(
        f"\nHNSW M={params.hnsw_m} efConstruction={params.ef_construction} efSearch={params.ef_search}; "
        f"IVF-PQ nlist ~4 sqrt(N), D/4 bytes per vector, nprobe={params.nprobe}, exact re-ranking of "
        f"{params.refine}x k candidates (library defaults: efSearch {defaults.ef_search}, nprobe {defaults.nprobe})"
    )
    print(machine_line())
    if args.csv:
        print(f"wrote {write_csv(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
