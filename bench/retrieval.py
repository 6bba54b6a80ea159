"""Search backends at scale: build time, memory, query latency and recall@10 against exact.

    python -m bench.retrieval                                   # 100k and 1M x 256, clustered + random
    python -m bench.retrieval --n 100000 --dims 256,512 --backends exact,flat,hnsw,ivfpq

Vectors are unit length: ``random`` = uniform on the sphere (the hardest case for any
approximate index: no structure), ``clustered`` = 1000 centres with spread (closer to real
embeddings). Queries come from the same distribution. Latency is measured per call: batch 1
(p50/p99 over ``--queries`` calls) and batch 64 (per-query time of a 64-query call). Memory is
the backend's own bytes (FAISS: its serialized size; exact: the float32 matrix) and the
process RSS growth while building. Recall@10 is the overlap with exact top-10, averaged.
"""

from __future__ import annotations

import argparse
import gc
import time

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
            x = centers[rng.integers(0, len(centers), m)] + 0.5 / np.sqrt(d) * rng.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latency(backend, q: np.ndarray, batch: int, k: int = 10) -> tuple[float, float]:
    """(p50, p99) milliseconds per query of calls with ``batch`` queries each."""
    times = []
    for s in range(0, len(q) - batch + 1, batch):
        t = time.perf_counter()
        backend.search(q[s:s + batch], k)
        times.append((time.perf_counter() - t) * 1000 / batch)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def backend_bytes(b) -> int:
    if isinstance(b, ExactBackend):
        return b.matrix.numel() * 4
    import faiss

    return int(faiss.serialize_index(b.index).size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="100000,1000000")
    p.add_argument("--dims", default="256")
    p.add_argument("--data", default="clustered,random")
    p.add_argument("--backends", default="exact,hnsw,ivfpq")
    p.add_argument("--queries", type=int, default=256, help="queries per measurement")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW ef_search (default: the library's)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF nprobe (default: the library's)")
    p.add_argument("--exact-queries", type=int, default=None,
                   help="batch-1 exact latency over this many queries (default: all)")
    add_csv_argument(p)
    args = p.parse_args(argv)
    if args.queries < 64:
        p.error(f"--queries {args.queries}: at least 64 (the batch-64 latency needs one full batch)")
    params = BackendParams.from_dict({k: v for k, v in (("ef_search", args.ef_search), ("nprobe", args.nprobe))
                                      if v is not None})
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
                    row = {"n": n, "dim": d, "data": kind, "backend": name, "build_s": build_s,
                           "index_mb": backend_bytes(b) / 2**20, "rss_mb": grown, "p50_ms": p50, "p99_ms": p99,
                           "b64_ms": b50, "recall": recall}
                    rows.append(row)
                    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)
                    del b
                del x
    print()
    shown = [{**r, "n": f"{r['n']:,}"} for r in rows]
    print(markdown_table(shown, [("N", "n", 0), ("dim", "dim", 0), ("data", "data", 0), ("backend", "backend", 0),
                                ("build s", "build_s", 1), ("index MB", "index_mb", 0),
                                ("RSS growth MB", "rss_mb", 0), ("p50 ms (batch 1)", "p50_ms", 2),
                                ("p99 ms (batch 1)", "p99_ms", 2), ("ms/query (batch 64)", "b64_ms", 3),
                                ("recall@10 vs exact", "recall", 3)]))
    defaults = BackendParams()
    print(f"\nHNSW M={params.hnsw_m} efConstruction={params.ef_construction} efSearch={params.ef_search}; "
          f"IVF-PQ nlist ~4 sqrt(N), D/4 bytes per vector, nprobe={params.nprobe}, exact re-ranking of "
          f"{params.refine}x k candidates (library defaults: efSearch {defaults.ef_search}, nprobe {defaults.nprobe})")
    print(machine_line())
    if args.csv:
        print(f"wrote {write_csv(args.csv, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
