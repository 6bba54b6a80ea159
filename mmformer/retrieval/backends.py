"""Search backends over unit-length embeddings (inner product = cosine similarity).

- ``exact``: torch matmul + ``topk`` over the (N, D) float32 matrix (:class:`ExactBackend`).
- ``flat``: FAISS ``IndexFlatIP``, exact as well (FAISS's BLAS kernels).
- ``hnsw``: FAISS ``IndexHNSWFlat``: a graph over the full vectors; ``ef_search`` trades speed
  for recall.
- ``ivfpq``: FAISS ``IndexIVFPQ`` (compressed codes in ``nlist`` inverted lists, ``nprobe`` of
  them scanned per query); its ``refine * k`` candidates are re-ranked exactly with the stored
  embeddings, which may stay memory-mapped on disk.

:func:`choose_backend` picks one by size for ``backend="auto"``. Every backend answers
``search(queries (Q, D) float32 numpy, k) -> (scores (Q, k) float32, ids (Q, k) int64)`` with
id -1 / score -inf where fewer than k results exist, as FAISS does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmformer.files import atomic_path

log = logging.getLogger(__name__)

BACKENDS = ("auto", "exact", "flat", "hnsw", "ivfpq")
FAISS_FILE = "faiss.index"
EXACT_MAX_AUTO = 100_000  # "auto" searches exactly up to this many vectors


def choose_backend(n: int, requested: str = "auto") -> str:
    """The backend for ``n`` vectors: ``requested``, or by size when it is ``"auto"``.

    Exact search up to 100k vectors (fast enough per query, and no build time); HNSW above, where
    a full scan per query gets slow (see the benchmarks pages).
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} must be one of {BACKENDS}")
    if requested != "auto":
        return requested
    return "exact" if n <= EXACT_MAX_AUTO else "hnsw"


def import_faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("FAISS backends need the faiss-cpu package: pip install faiss-cpu") from e
    return faiss


@dataclass
class BackendParams:
    """Build and search parameters of the FAISS backends (stored in the index manifest).

    hnsw_m: graph degree; ef_construction / ef_search: HNSW candidate list sizes.
    nlist: IVF lists (0 = about 4 sqrt(N), a power of two); nprobe: lists scanned per query;
    pq_m: PQ sub-quantizers (0 = D/4 bytes per vector); refine: the IVF-PQ shortlist is
    ``refine * k`` candidates, re-ranked exactly (1 = no re-ranking).
    """

    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: int = 0
    nprobe: int = 32
    pq_m: int = 0
    refine: int = 16

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "BackendParams":
        d = dict(d or {})
        known = {k: d.pop(k) for k in list(d) if k in cls.__dataclass_fields__}
        unknown = sorted(d)
        if unknown:
            raise ValueError(f"unknown backend parameter(s) {unknown}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _empty_result(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), -np.inf, dtype=np.float32), np.full((q, k), -1, dtype=np.int64)


class ExactBackend:
    """Exact inner-product top-k with torch over an (N, D) array (float32 in memory)."""

    name = "exact"

    def __init__(self, embeddings: np.ndarray, block_size: int = 1024) -> None:
        # A float32 array (memory-mapped or not) is used without a copy; float16 is widened once.
        array = np.asarray(embeddings)
        if array.dtype != np.float32:
            array = array.astype(np.float32)
        with _quiet_readonly():  # a read-only memmap is fine: it is only read
            self.matrix = torch.from_numpy(array)  # (N, D)
        self.block_size = block_size

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        scores, ids = _empty_result(q.shape[0], k)
        kk = min(k, self.matrix.shape[0])
        if kk == 0:
            return scores, ids
        with torch.inference_mode():
            for s in range(0, q.shape[0], self.block_size):
                sims = q[s:s + self.block_size] @ self.matrix.T  # (B, N)
                top = torch.topk(sims, kk, dim=1)
                scores[s:s + self.block_size, :kk] = top.values.numpy()
                ids[s:s + self.block_size, :kk] = top.indices.numpy()
        return scores, ids

    def save(self, directory: Path) -> None:
        """Nothing beyond ``embeddings.npy``, which the index writes itself."""


class _quiet_readonly:
    """Silence torch's warning about wrapping a read-only (memory-mapped) numpy array."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=".*not writable.*")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


class FaissBackend:
    """A FAISS index (``flat``, ``hnsw`` or ``ivfpq``) built over the embeddings.

    Build with :meth:`build`, persist with :meth:`save`, reopen with :meth:`load` (memory-mapped
    where FAISS allows it: the IVF lists of ``ivfpq`` and the vectors of ``flat``).
    """

    def __init__(self, kind: str, index: Any, params: BackendParams,
                 embeddings: np.ndarray | None = None) -> None:
        self.name, self.index, self.params = kind, index, params
        self.embeddings = embeddings  # (N, D) for IVF-PQ re-ranking (may be a memmap)
        self.set_search_params()

    @classmethod
    def build(cls, kind: str, embeddings: np.ndarray, params: BackendParams | None = None,
              seed: int = 0) -> "FaissBackend":
        """Build a ``kind`` index over (N, D) float embeddings."""
        faiss = import_faiss()
        params = params or BackendParams()
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        n, d = x.shape
        ip = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, params.hnsw_m, ip)
            index.hnsw.efConstruction = params.ef_construction
        elif kind == "ivfpq":
            nlist = params.nlist or _default_nlist(n)
            pq_m = params.pq_m or _default_pq_m(d)
            if d % pq_m:
                raise ValueError(f"ivfpq: pq_m={pq_m} must divide the embedding dim {d}")
            if n < nlist:
                raise ValueError(f"ivfpq: {n} vectors are too few for nlist={nlist}; use backend exact or flat")
            # 8-bit codes need ~40 * 256 training points; small sets get smaller codebooks
            nbits = int(min(8, max(1, math.floor(math.log2(max(n, 80) / 40)))))
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, pq_m, nbits, ip)
            params = BackendParams(**{**params.to_dict(), "nlist": nlist, "pq_m": pq_m})
            rng = np.random.default_rng(seed)
            # k-means wants ~40-256 points per centroid (IVF: nlist, PQ: 2^nbits); 200k is plenty
            n_train = min(n, max(64 * nlist, 40 * 2**nbits), 200_000)
            train = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
            index.cp.seed = seed
            index.train(train)
        else:
            raise ValueError(f"unknown FAISS backend {kind!r}; expected flat, hnsw or ivfpq")
        index.add(x)
        return cls(kind, index, params, embeddings if kind == "ivfpq" else None)

    def set_search_params(self) -> None:
        if self.name == "hnsw":
            self.index.hnsw.efSearch = self.params.ef_search
        elif self.name == "ivfpq":
            self.index.nprobe = self.params.nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.name != "ivfpq" or self.params.refine <= 1 or self.embeddings is None:
            scores, ids = self.index.search(q, k)
            scores[ids < 0] = -np.inf
            return scores, ids.astype(np.int64)
        _, cand = self.index.search(q, k * self.params.refine)  # (Q, refine*k) shortlist
        return rerank_exact(q, cand, self.embeddings, k)

    def save(self, directory: Path) -> None:
        faiss = import_faiss()
        path = Path(directory) / FAISS_FILE
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, tmp)

    @classmethod
    def load(cls, kind: str, directory: Path, params: BackendParams,
             embeddings: np.ndarray | None = None, mmap: bool = True,
             expect: tuple[int, int] | None = None) -> "FaissBackend":
        """Read ``faiss.index``; ``expect`` = (count, dim) it must hold, checked at open."""
        faiss = import_faiss()
        path = Path(directory) / FAISS_FILE
        index = None
        if mmap and kind in ("flat", "ivfpq"):
            try:
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError as e:  # this FAISS build or index type cannot map it
                log.info("FAISS could not memory-map %s (%s); reading it into memory", path, e)
        if index is None:
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as e:
                raise ValueError(f"{path}: unreadable FAISS index ({str(e).splitlines()[0]}); rebuild the index") from e
        if expect is not None and (index.ntotal, index.d) != expect:
            raise ValueError(f"{path}: holds {index.ntotal} vectors of dim {index.d}, the index manifest says "
                             f"{expect[0]} of dim {expect[1]} (a file from another index?); rebuild the index "
                             "or search with --backend exact")
        return cls(kind, index, params, embeddings)


def rerank_exact(queries: np.ndarray, candidates: np.ndarray, embeddings: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score (Q, C) candidate ids exactly against ``embeddings`` and keep the best k per query."""
    q_n, _ = candidates.shape
    scores, ids = _empty_result(q_n, k)
    for i in range(q_n):
        cand = candidates[i][candidates[i] >= 0]
        if cand.size == 0:
            continue
        order = np.sort(np.unique(cand))  # sorted ids read a memmap in file order
        s = np.asarray(embeddings[order], dtype=np.float32) @ queries[i]
        top = np.argsort(-s, kind="stable")[:k]
        scores[i, :top.size], ids[i, :top.size] = s[top], order[top]
    return scores, ids


def _default_nlist(n: int) -> int:
    """About 4 sqrt(N) lists, a power of two, at least 1 and at most N / 39 (FAISS's training floor)."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    return int(max(1, min(nlist, n // 39 or 1)))


def _default_pq_m(d: int) -> int:
    """D/4 one-byte sub-quantizers (4 dims each), kept a divisor of D."""
    m = max(1, d // 4)
    while d % m:
        m -= 1
    return m
