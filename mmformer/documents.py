"""Long documents as model input: windows of long texts for one encoder call.

- :class:`DocumentCollator`: texts (or piece-id lists) -> :class:`DocumentBatch`, all chunks of
  all documents as one (sum of chunks, L) id tensor for ONE encoder call, the per-document chunk
  counts, and a (B, Nmax) chunk mask for the documents padded to the batch's largest count. A
  cap on chunks has an explicit policy: ``"error"`` (raise, naming the document) or ``"first"``
  (keep the first ``max_chunks``; logged and flagged in ``DocumentBatch.truncated``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmformer.config import OVERFLOW_POLICIES
from mmformer.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, chunk_ids, wrap_and_pad

log = logging.getLogger(__name__)


class TooManyChunks(ValueError):
    """A document needs more chunks than the cap allows under the ``"error"`` policy."""


@dataclass
class DocumentBatch:
    """All chunks of a batch of documents, ready for one encoder call.

    Attributes:
        input_ids: (C, L) int64, C = sum of chunk counts; each row ``[bos] pieces [eos] pad...``,
            the chunks of document 0 first, in document order.
        attention_mask: (C, L) bool, True = real token.
        chunk_counts: (B,) int64, chunks per document (>= 1).
        truncated: (B,) bool, True where the ``"first"`` policy dropped chunks.
        n_tokens: (B,) int64, piece count of each document before chunking (and any cap).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    chunk_counts: torch.Tensor
    truncated: torch.Tensor
    n_tokens: torch.Tensor

    def __len__(self) -> int:
        return int(self.chunk_counts.shape[0])

    @property
    def chunk_mask(self) -> torch.Tensor:
        """(B, Nmax) bool, True for the real chunks of each document (row-major = chunk order)."""
        n_max = int(self.chunk_counts.max())
        return torch.arange(n_max, device=self.chunk_counts.device)[None] < self.chunk_counts[:, None]

    @property
    def in_long_document(self) -> torch.Tensor:
        """(C,) bool, True for the chunks of documents of more than one chunk (what
        :meth:`mmformer.model.MMFormer.chunk_states` routes through a document expert)."""
        return (self.chunk_counts > 1).repeat_interleave(self.chunk_counts)

    def to(self, device: torch.device | str) -> DocumentBatch:
        return DocumentBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.chunk_counts.to(device),
            self.truncated.to(device),
            self.n_tokens.to(device),
        )


class DocumentCollator:
    """Tokenize and chunk documents into a :class:`DocumentBatch`.

    Args:
        tokenizer: the model's tokenizer.
        length: window length L in tokens, bos and eos included (the model's context_length);
            each window holds ``length - 2`` pieces.
        stride: pieces between window starts (None = ``length - 2``: no overlap; smaller
            overlaps the windows). A document of at most ``length - 2`` pieces is one window,
            encoded exactly as ``tokenizer(text, max_length=length)`` would.
        max_chunks: cap on chunks per document (None = no cap).
        overflow: what to do with a document over the cap: ``"error"`` raises
            :class:`TooManyChunks` naming it; ``"first"`` keeps its first ``max_chunks`` chunks,
            logs a warning and sets ``DocumentBatch.truncated``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        length: int,
        stride: int | None = None,
        max_chunks: int | None = None,
        overflow: str = "error",
    ) -> None:
        if length < 3:
            raise ValueError(f"length must be >= 3 (bos, one piece, eos), got {length}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow={overflow!r} must be one of {OVERFLOW_POLICIES}")
        if max_chunks is not None and max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1 or None, got {max_chunks}")
        self.tokenizer, self.length = tokenizer, length
        self.pieces = length - 2
        self.stride = self.pieces if stride is None else stride
        if not 1 <= self.stride <= self.pieces:
            raise ValueError(f"stride must be in [1, {self.pieces}] for length={length}, got {stride}")
        self.max_chunks, self.overflow = max_chunks, overflow

    def __call__(self, texts: Sequence[str]) -> DocumentBatch:
        """Documents as texts -> :class:`DocumentBatch`."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of documents, got a single str")
        if self.tokenizer is None:
            raise RuntimeError("this collator has no tokenizer; use collate_ids with piece ids")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"documents {bad[:20]} are not str")
        return self.collate_ids(self.tokenizer.encode_batch(list(texts)))

    def collate_ids(self, docs: Sequence[Sequence[int]], names: Sequence[str] | None = None) -> DocumentBatch:
        """Documents as piece-id lists (no bos/eos) -> :class:`DocumentBatch`.

        ``names`` (optional, one per document) are used in error messages instead of indices.
        """
        if len(docs) == 0:
            raise ValueError("no documents to collate")
        rows: list[list[int]] = []
        counts, truncated = [], []
        for i, ids in enumerate(docs):
            windows = chunk_ids(list(ids), self.pieces, self.stride)
            cut = self.max_chunks is not None and len(windows) > self.max_chunks
            if cut:
                what = names[i] if names is not None else f"document {i}"
                if self.overflow == "error":
                    raise TooManyChunks(
                        f"{what}: {len(ids)} tokens make {len(windows)} chunks of {self.pieces} pieces "
                        f"(stride {self.stride}), over max_chunks={self.max_chunks}; raise max_chunks or "
                        "use overflow='first' to keep the first chunks"
                    )
                log.warning(
                    "%s: keeping the first %d of %d chunks (max_chunks, overflow='first')",
                    what,
                    self.max_chunks,
                    len(windows),
                )
                windows = windows[: self.max_chunks]
            rows += windows
            counts.append(len(windows))
            truncated.append(cut)
        specials = self.tokenizer.specials if self.tokenizer is not None else (BOS_ID, EOS_ID, PAD_ID)
        input_ids, attention_mask = wrap_and_pad(rows, self.length, specials=specials)
        return DocumentBatch(
            input_ids,
            attention_mask,
            torch.tensor(counts, dtype=torch.long),
            torch.tensor(truncated, dtype=torch.bool),
            torch.tensor([len(d) for d in docs], dtype=torch.long),
        )
