"""Exact (brute-force) inner-product index in plain torch.

The index holds an (N, D) tensor of embeddings, expected L2-normalised so that the inner product
is the cosine similarity (the index does not normalise them). ``search`` scores queries in
blocks by a float32 matmul and keeps the top k with ``torch.topk``. Ids are row positions in the
order of ``add`` calls (0..N-1), as in FAISS ``IndexFlatIP``. On disk the index is a single
``.npy`` file of the (N, D) array, written atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmformer.files import atomic_path

__all__ = ["ExactIndex"]

logger = logging.getLogger(__name__)

_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


class ExactIndex:
    """Exact inner-product search over stored embeddings.

    Args:
        dim: embedding dim D; ``None`` takes it from the first ``add``.
        dtype: storage dtype, ``torch.float32`` or ``torch.float16`` (scores are float32 either way).
        device: where the embeddings live and the search runs.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"ExactIndex dtype must be torch.float32 or torch.float16, got {dtype}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"ExactIndex dim must be a positive int or None, got {dim!r}")
        self.dtype = dtype
        self.device = torch.device(device)
        self._dim = dim
        self._emb = torch.empty(0, dim or 0, dtype=dtype, device=self.device)  # (N, D)

    @property
    def dim(self) -> int | None:
        """Embedding dim D, or ``None`` while the index is empty and was built without one."""
        return self._dim

    @property
    def ntotal(self) -> int:
        """Number of stored embeddings."""
        return int(self._emb.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def embeddings(self) -> Tensor:
        """The stored (N, D) embeddings (not a copy: do not modify)."""
        return self._emb

    def __repr__(self) -> str:
        return f"ExactIndex(ntotal={self.ntotal}, dim={self.dim}, dtype={self.dtype}, device={self.device})"

    def _check(self, x: Tensor, what: str) -> Tensor:
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        if x.dim() != 2:
            raise ValueError(f"ExactIndex.{what}: expected a (N, D) tensor, got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"ExactIndex.{what}: expected floating point values, got dtype {x.dtype}")
        if self._dim is not None and x.shape[1] != self._dim:
            raise ValueError(
                f"ExactIndex.{what}: dimension mismatch: got vectors of dim {x.shape[1]}, "
                f"but the index holds dim {self._dim}"
            )
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().flatten()[:20].tolist()
            raise ValueError(f"ExactIndex.{what}: non-finite values (NaN/inf) in rows {rows}")
        return x

    def add(self, emb: Tensor) -> None:
        """Append (n, D) embeddings; they get ids ``ntotal .. ntotal + n - 1``."""
        emb = self._check(emb, "add")
        if self._dim is None:
            self._dim = int(emb.shape[1])
            self._emb = self._emb.new_empty(0, self._dim)
        emb = emb.detach().to(device=self.device, dtype=self.dtype)
        self._emb = torch.cat([self._emb, emb], dim=0)

    def reset(self) -> None:
        """Remove all embeddings (the dim is kept)."""
        self._emb = self._emb[:0].clone()

    @torch.no_grad()
    def search(self, queries: Tensor, k: int, *, block_size: int = 1024) -> tuple[Tensor, Tensor]:
        """Top-k stored embeddings by inner product for each query.

        Args:
            queries: (Q, D) query embeddings (any float dtype; scored in float32).
            k: number of neighbours per query, >= 1.
            block_size: queries scored at a time (memory ~ ``block_size * N * 4`` bytes).

        Returns:
            ``scores (Q, k) float32`` in descending order and ``ids (Q, k) int64`` on the index
            device. When ``k > ntotal`` the missing places hold score ``-inf`` and id ``-1``
            (as FAISS does). The order among exactly tied scores is unspecified.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ExactIndex.search: k must be a positive int, got {k!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"ExactIndex.search: block_size must be a positive int, got {block_size!r}")
        queries = self._check(queries, "search").to(self.device)
        n_q = queries.shape[0]
        scores = torch.full((n_q, k), float("-inf"), dtype=torch.float32, device=self.device)
        ids = torch.full((n_q, k), -1, dtype=torch.long, device=self.device)
        kk = min(k, self.ntotal)
        if kk == 0 or n_q == 0:
            return scores, ids
        gallery = self._emb.float()  # (N, D) float32 accumulation
        for start in range(0, n_q, block_size):
            stop = min(start + block_size, n_q)
            sims = queries[start:stop].float() @ gallery.T  # (B, N)
            top_scores, top_ids = torch.topk(sims, kk, dim=1, largest=True, sorted=True)
            scores[start:stop, :kk] = top_scores
            ids[start:stop, :kk] = top_ids
        return scores, ids

    def save(self, path: str | os.PathLike) -> None:
        """Write the (N, D) array to ``path`` as ``.npy`` (exactly that path; no suffix is added).

        The file is written to a temporary file in the same folder and moved into place with
        ``os.replace``, so ``path`` is either the old file or the complete new one, never half
        written.
        """
        if self._dim is None:
            raise ValueError("ExactIndex.save: the index is empty and has no dim; add embeddings first")
        path = Path(path)
        array = self._emb.detach().cpu().numpy()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        logger.info("saved ExactIndex (%d x %d, %s) to %s", self.ntotal, self._dim, self.dtype, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "ExactIndex":
        """Read an index written by :meth:`save`; the dtype (float32/float16) is kept."""
        path = Path(path)
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"ExactIndex.load: {path} is not a valid .npy embedding file: {err}") from err
        if not isinstance(array, np.ndarray) or array.ndim != 2:
            raise ValueError(
                f"ExactIndex.load: {path} must hold a 2-D (N, D) array, got shape "
                f"{getattr(array, 'shape', None)}"
            )
        if array.dtype not in (np.float32, np.float16):
            raise ValueError(f"ExactIndex.load: {path} holds dtype {array.dtype}; expected float32 or float16")
        if array.shape[1] < 1:
            raise ValueError(f"ExactIndex.load: {path} has D=0 columns")
        emb = torch.from_numpy(np.ascontiguousarray(array))
        index = cls(dim=int(array.shape[1]), dtype=emb.dtype, device=device)
        index._emb = emb.to(index.device)
        return index
