"""Search backends over unit-length embeddings (inner product = cosine similarity).

- ``exact``: torch matmul + ``topk`` over the (N, D) float32 matrix (:class:`ExactBackend`).
- ``flat``: FAISS ``IndexFlatIP``, exact as well (FAISS's BLAS kernels).
- ``hnsw``: FAISS ``IndexHNSWFlat``: a graph over the full vectors; ``ef_search`` trades speed
  for recall.
- ``ivfpq``: FAISS ``IndexIVFPQ`` (compressed codes in ``nlist`` inverted lists, ``nprobe`` of
  them scanned per query); its ``refine * k`` candidates are re-ranked exactly with the stored
  embeddings, which may stay memory-mapped on disk.

:func:`build_from_npy` builds any of them from an ``embeddings.npy`` file read in blocks, so the
build never holds the embeddings: IVF-PQ is trained on a sample, each block is encoded into its
own small IVF file, and the blocks are merged into inverted lists on disk (``faiss.ivfdata``,
opened memory-mapped). ``flat`` and ``hnsw`` are filled block by block as well, but their FAISS
structures hold every vector in float32 (plus the graph for HNSW), so their memory grows with
the corpus; at scale, use ``ivfpq``.

:func:`choose_backend` picks one by size for ``backend="auto"``. Every backend answers
``search(queries (Q, D) float32 numpy, k) -> (scores (Q, k) float32, ids (Q, k) int64)`` with
id -1 / score -inf where fewer than k results exist, as FAISS does.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmformer.files import atomic_path

log = logging.getLogger(__name__)

BACKENDS = ("auto", "exact", "flat", "hnsw", "ivfpq")
FAISS_FILE = "faiss.index"
IVF_DATA_FILE = "faiss.ivfdata"  # on-disk inverted lists of an ``ivfpq`` index built by build_from_npy
BLOCK_ROWS = 65536  # rows per block when streaming embeddings from disk
MAX_TRAIN = 200_000  # IVF-PQ training sample cap (rows)
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


@contextmanager
def _faiss_output_logged():
    """FAISS's on-disk inverted lists print progress lines with C ``printf``; the library never
    prints, so file descriptor 1 is pointed at a temporary file meanwhile and its text logged at
    DEBUG. (Anything another thread writes to stdout in that window is logged with it.)"""
    import ctypes
    import sys
    import tempfile

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace").strip()
            if text:
                log.debug("faiss: %s", text)


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
    ``refine * k`` candidates, re-ranked exactly (1 = no re-ranking); train_size: rows the IVF-PQ
    quantizers are trained on (0 = 64 per list, at least 40 per PQ centroid, at most 200k).
    """

    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: int = 0
    nprobe: int = 32
    pq_m: int = 0
    refine: int = 16
    train_size: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> BackendParams:
        d = dict(d or {})
        known = {k: d.pop(k) for k in list(d) if k in cls.__dataclass_fields__}
        unknown = sorted(d)
        if unknown:
            raise ValueError(f"unknown backend parameter(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
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
                sims = q[s : s + self.block_size] @ self.matrix.T  # (B, N)
                top = torch.topk(sims, kk, dim=1)
                scores[s : s + self.block_size, :kk] = top.values.numpy()
                ids[s : s + self.block_size, :kk] = top.indices.numpy()
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

    def __init__(self, kind: str, index: Any, params: BackendParams, embeddings: np.ndarray | None = None) -> None:
        self.name, self.index, self.params = kind, index, params
        self.embeddings = embeddings  # (N, D) for IVF-PQ re-ranking (may be a memmap)
        self.set_search_params()

    @classmethod
    def build(
        cls, kind: str, embeddings: np.ndarray, params: BackendParams | None = None, seed: int = 0
    ) -> FaissBackend:
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
            n_train = _train_size(n, nlist, nbits, params.train_size)
            train = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
            index.cp.seed = seed
            index.train(train)
        else:
            raise ValueError(f"unknown FAISS backend {kind!r}; expected flat, hnsw or ivfpq")
        index.add(x)
        return cls(kind, index, params, embeddings if kind == "ivfpq" else None)

    @classmethod
    def build_from_npy(
        cls,
        kind: str,
        npy_path: Path,
        directory: Path,
        params: BackendParams | None = None,
        seed: int = 0,
        block_rows: int = BLOCK_ROWS,
    ) -> FaissBackend:
        """Build a ``kind`` index over the (N, D) rows of ``npy_path`` (float32 or float16), read
        in blocks of ``block_rows`` with plain file reads (nothing of it stays mapped), and save it
        in ``directory`` (``faiss.index``, plus ``faiss.ivfdata`` for ``ivfpq``).

        IVF-PQ: the quantizers are trained on a sample of at most 200k rows (drawn in one
        sequential pass), each block is encoded into its own IVF file in a temporary folder and
        the blocks are merged into on-disk inverted lists. Memory: one block, the sample and the
        trained quantizers, whatever N is. ``flat`` / ``hnsw`` are filled block by block too, but
        hold all N vectors in float32 themselves.
        """
        faiss = import_faiss()
        params = params or BackendParams()
        directory = Path(directory)
        n, d, _ = npy_shape(npy_path)
        ip = faiss.METRIC_INNER_PRODUCT
        if kind in ("flat", "hnsw"):
            if kind == "flat":
                index = faiss.IndexFlatIP(d)
            else:
                index = faiss.IndexHNSWFlat(d, params.hnsw_m, ip)
                index.hnsw.efConstruction = params.ef_construction
            for _, block in iter_npy_blocks(npy_path, block_rows):
                index.add(block)
            b = cls(kind, index, params)
            b.save(directory)
            return b
        if kind != "ivfpq":
            raise ValueError(f"unknown FAISS backend {kind!r}; expected flat, hnsw or ivfpq")
        nlist = params.nlist or _default_nlist(n)
        pq_m = params.pq_m or _default_pq_m(d)
        if d % pq_m:
            raise ValueError(f"ivfpq: pq_m={pq_m} must divide the embedding dim {d}")
        if n < nlist:
            raise ValueError(f"ivfpq: {n} vectors are too few for nlist={nlist}; use backend exact or flat")
        nbits = int(min(8, max(1, math.floor(math.log2(max(n, 80) / 40)))))
        params = BackendParams(**{**params.to_dict(), "nlist": nlist, "pq_m": pq_m})
        trained = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, pq_m, nbits, ip)
        trained.cp.seed = seed
        trained.train(_sample_rows(npy_path, _train_size(n, nlist, nbits, params.train_size), seed, block_rows))
        blocks_dir = directory / ".ivf-blocks.tmpdir"
        shutil.rmtree(blocks_dir, ignore_errors=True)
        blocks_dir.mkdir(parents=True)
        try:
            block_files = []
            for start, block in iter_npy_blocks(npy_path, block_rows):
                part = faiss.clone_index(trained)
                part.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
                block_files.append(str(blocks_dir / f"block-{len(block_files):06d}.index"))
                faiss.write_index(part, block_files[-1])
                del part
            # the block indexes stay referenced (and own their memory-mapped lists) until merged
            blocks = [faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in block_files]
            vec = faiss.InvertedListsPtrVector()
            for block_index in blocks:
                vec.push_back(faiss.extract_index_ivf(block_index).invlists)
            data = directory / IVF_DATA_FILE
            data.unlink(missing_ok=True)
            invlists = faiss.OnDiskInvertedLists(nlist, trained.code_size, str(data))
            with _faiss_output_logged():
                total = invlists.merge_from_multiple(vec.data(), vec.size(), False)
            del vec, blocks
            trained.ntotal = total
            trained.replace_invlists(invlists, True)
            invlists.this.disown()
        finally:
            shutil.rmtree(blocks_dir, ignore_errors=True)
        b = cls(kind, trained, params)
        b.save(directory)
        return b

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
    def load(
        cls,
        kind: str,
        directory: Path,
        params: BackendParams,
        embeddings: np.ndarray | None = None,
        mmap: bool = True,
        expect: tuple[int, int] | None = None,
    ) -> FaissBackend:
        """Read ``faiss.index``; ``expect`` = (count, dim) it must hold, checked at open."""
        faiss = import_faiss()
        path = Path(directory) / FAISS_FILE
        index = None
        if kind == "ivfpq" and (Path(directory) / IVF_DATA_FILE).is_file():
            # inverted lists on disk (build_from_npy): always memory-mapped, found beside faiss.index
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        elif mmap and kind == "ivfpq":
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        elif mmap and kind in ("flat", "hnsw"):  # the float32 vectors mapped in place, the graph in memory
            flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
        else:
            flags = 0
        if flags:
            try:
                with _faiss_output_logged():
                    index = faiss.read_index(str(path), flags)
            except RuntimeError as e:  # this FAISS build or index type cannot map it
                if kind == "ivfpq" and flags & faiss.IO_FLAG_ONDISK_SAME_DIR:
                    raise ValueError(
                        f"{path}: unreadable FAISS index or {IVF_DATA_FILE} "
                        f"({str(e).splitlines()[0]}); rebuild the index"
                    ) from e
                log.info("FAISS could not memory-map %s (%s); reading it into memory", path, e)
        if index is None:
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as e:
                raise ValueError(f"{path}: unreadable FAISS index ({str(e).splitlines()[0]}); rebuild the index") from e
        if expect is not None and (index.ntotal, index.d) != expect:
            raise ValueError(
                f"{path}: holds {index.ntotal} vectors of dim {index.d}, the index manifest says "
                f"{expect[0]} of dim {expect[1]} (a file from another index?); rebuild the index "
                "or search with --backend exact"
            )
        return cls(kind, index, params, embeddings)


def rerank_exact(
    queries: np.ndarray, candidates: np.ndarray, embeddings: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
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
        scores[i, : top.size], ids[i, : top.size] = s[top], order[top]
    return scores, ids


def npy_shape(path: Path) -> tuple[int, int, np.dtype]:
    """(rows, dim, dtype) of a 2-D ``.npy`` file, from its header."""
    with open(path, "rb") as f:
        shape, _, dtype = _npy_header(f, path)
    return shape[0], shape[1], dtype


def _npy_header(f, path: Path) -> tuple[tuple[int, int], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read[version](f)
    except ValueError as e:
        raise ValueError(f"{path}: not a .npy file ({e})") from e
    if len(shape) != 2 or fortran or dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(
            f"{path}: expected a C-ordered 2-D float32 or float16 array, got shape {shape} "
            f"{dtype}{' (Fortran order)' if fortran else ''}"
        )
    return shape, fortran, dtype


def iter_npy_blocks(path: Path, block_rows: int = BLOCK_ROWS):
    """Yield (first row, float32 (m, D) block) over a 2-D ``.npy`` file with plain reads: no
    memory map, so the process holds one block of it at a time."""
    with open(path, "rb") as f:
        (n, d), _, dtype = _npy_header(f, path)
        for start in range(0, n, block_rows):
            m = min(block_rows, n - start)
            block = np.fromfile(f, dtype=dtype, count=m * d)
            if block.size != m * d:
                raise ValueError(f"{path}: truncated at row {start + block.size // max(d, 1)} of {n}")
            yield start, block.reshape(m, d).astype(np.float32, copy=False)


def _sample_rows(path: Path, size: int, seed: int, block_rows: int) -> np.ndarray:
    """``size`` distinct rows of a ``.npy`` file drawn at random, read in one sequential pass."""
    n, d, _ = npy_shape(path)
    if size >= n:
        return np.concatenate([b for _, b in iter_npy_blocks(path, block_rows)])
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    out = np.empty((size, d), dtype=np.float32)
    filled = 0
    for start, block in iter_npy_blocks(path, block_rows):
        take = rows[(rows >= start) & (rows < start + len(block))] - start
        out[filled : filled + take.size] = block[take]
        filled += take.size
    return out


def _train_size(n: int, nlist: int, nbits: int, requested: int = 0) -> int:
    """k-means wants ~40-256 points per centroid (IVF: nlist, PQ: 2^nbits); 200k is plenty."""
    if requested:
        return min(n, max(requested, nlist))
    return min(n, max(64 * nlist, 40 * 2**nbits), MAX_TRAIN)


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
