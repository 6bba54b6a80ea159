"""Long-document training and evaluation data: bundled prose, needle documents.

(The model's own input types, :class:`~mmformer.documents.DocumentBatch` and
:class:`~mmformer.documents.DocumentCollator`, live in :mod:`mmformer.documents`.)
- :func:`load_prose`: the bundled public-domain prose (``data/prose/kjv.txt``) as piece ids.
- :func:`needle_documents`: for each caption, a document of ``length`` tokens of prose filler
  with the caption inserted at a word boundary at a random position; records the position.
- :func:`split_needle_documents`: the caption cut into fragments placed in distant chunks, plus
  hard-negative documents holding single fragments, so that only cross-chunk fusion solves it.
- :class:`NeedleDataset`: images paired with freshly drawn needle documents, for fine-tuning.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmformer.data.bundled import bundled_dir
from mmformer.documents import DocumentCollator
from mmformer.tokenizer import Tokenizer, chunk_starts, wrap_and_pad

log = logging.getLogger(__name__)

PROSE_FILE = "kjv.txt"


# ---- prose and needle documents ---------------------------------------------------------------
def default_prose_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The bundled prose text, ``<prose folder>/kjv.txt``.

    ``explicit`` (the prose folder, or a folder holding ``prose/``), else ``$MMFORMER_DATA/prose``,
    else the repository checkout's ``data/prose``, else the copy inside an installed wheel: see
    :mod:`mmformer.data.bundled`.

    Raises:
        BundledDataNotFound: a ``FileNotFoundError`` naming the places looked at and how to get the data.
    """
    return bundled_dir("prose", explicit) / PROSE_FILE


def load_prose(tokenizer: Tokenizer, path: str | os.PathLike | None = None, max_chars: int | None = None) -> list[int]:
    """The prose file (one paragraph/verse a line) as one list of piece ids, lines in order."""
    path = Path(path) if path is not None else default_prose_path()
    text = path.read_text(encoding="utf-8")
    if max_chars is not None:
        text = text[:max_chars]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no text")
    ids: list[int] = []
    for piece_ids in tokenizer.sp.encode(lines):
        ids += piece_ids
    return ids


class Filler:
    """Random spans of prose piece ids, cut and joined at word starts (pieces beginning with ``▁``)."""

    def __init__(self, tokenizer: Tokenizer, prose_ids: Sequence[int]) -> None:
        self.ids = list(prose_ids)
        starts = _word_pieces(tokenizer)
        self.word_start = [i for i, t in enumerate(self.ids) if t in starts]
        if len(self.word_start) < 2:
            raise ValueError("prose too short or without word boundaries")

    def span(self, n: int, rng: random.Random) -> list[int]:
        """``n`` piece ids starting at a random word start (another random start where the
        prose ends first)."""
        return self.span_with_source(n, rng)[0]

    def span_with_source(self, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """:meth:`span` and, per piece, its position in the prose (:attr:`ids`)."""
        out: list[int] = []
        src: list[int] = []
        while len(out) < n:
            s = self.word_start[rng.randrange(len(self.word_start))]
            piece = self.ids[s : s + n - len(out)]
            out += piece
            src += range(s, s + len(piece))
        return out, src


def _word_pieces(tokenizer: Tokenizer) -> set[int]:
    return {i for i in range(tokenizer.vocab_size) if tokenizer.sp.id_to_piece(i).startswith("\u2581")}


@dataclass
class NeedleDoc:
    """A document as piece ids with where its needle sits.

    ``position`` = first needle piece index / document length (0..1); ``needle_index`` = the
    caption it carries; ``spans`` = (start, end) piece ranges of the needle fragments.
    """

    ids: list[int]
    needle_index: int
    position: float
    spans: list[tuple[int, int]]


def insert_at_word(
    filler: list[int], insert: list[int], rng: random.Random, word_pieces: set[int], lo: float = 0.0, hi: float = 1.0
) -> tuple[list[int], int]:
    """``insert`` placed before a random word start of ``filler`` in [lo, hi) of its length."""
    n = len(filler)
    cands = [i for i in range(int(lo * n), max(int(hi * n), int(lo * n) + 1)) if i >= n or filler[i] in word_pieces]
    at = rng.choice(cands) if cands else min(int(lo * n), n)
    return filler[:at] + insert + filler[at:], at


def needle_documents(
    tokenizer: Tokenizer,
    captions: Sequence[str],
    length: int,
    filler: Filler,
    seed: int = 0,
    positions: Sequence[float] | None = None,
) -> list[NeedleDoc]:
    """One document of ``length`` pieces per caption: prose filler with the caption inserted.

    The caption goes before a word start drawn uniformly over the document (or in the decile
    around ``positions[i]`` when given). A caption at least ``length`` pieces long is the
    whole document. Deterministic in ``seed``.
    """
    rng = random.Random(seed)
    wp = _word_pieces(tokenizer)
    docs = []
    for i, cap_ids in enumerate(tokenizer.sp.encode(list(captions))):
        body = filler.span(max(length - len(cap_ids), 0), rng)
        if positions is not None:
            lo = min(max(positions[i], 0.0), 1.0)
            ids, at = insert_at_word(body, list(cap_ids), rng, wp, lo, min(lo + 0.1, 1.0))
        else:
            ids, at = insert_at_word(body, list(cap_ids), rng, wp)
        docs.append(NeedleDoc(ids, i, at / max(len(ids), 1), [(at, at + len(cap_ids))]))
    return docs


def split_needle_documents(
    tokenizer: Tokenizer, captions: Sequence[str], length: int, filler: Filler, seed: int = 0
) -> tuple[list[NeedleDoc], list[NeedleDoc]]:
    """Captions of >= 2 words cut into words placed in distant parts of the document.

    Fragment k of a caption of K words goes into the k-th of K equal parts of the document (so
    fragments sit at least one part apart). For each such caption a hard negative document holds
    ONE of its fragments (the first) in the same place plus the other fragments of a different
    caption, so matching single fragments cannot tell them apart. Returns (documents,
    hard_negatives); ``needle_index`` of a negative is the caption whose first fragment it holds.
    Captions of one word are skipped (no split possible).
    """
    rng = random.Random(seed)
    wp = _word_pieces(tokenizer)
    words = [c.split() for c in captions]
    multi = [i for i, w in enumerate(words) if len(w) >= 2]
    docs, negs = [], []
    for i in multi:
        frags = [tokenizer.encode(w) for w in words[i]]
        docs.append(_place_fragments(frags, i, length, filler, rng, wp))
        j = rng.choice([m for m in multi if m != i and words[m][1:] != words[i][1:]] or [i])
        other = [tokenizer.encode(w) for w in words[j]]
        negs.append(_place_fragments([frags[0], *other[1:]], i, length, filler, rng, wp))
    return docs, negs


def _place_fragments(
    frags: list[list[int]], index: int, length: int, filler: Filler, rng: random.Random, wp: set[int]
) -> NeedleDoc:
    k = len(frags)
    body = filler.span(max(length - sum(map(len, frags)), 0), rng)
    part = len(body) // k
    ids: list[int] = []
    spans = []
    for f_i, frag in enumerate(frags):
        seg = body[f_i * part : (f_i + 1) * part if f_i < k - 1 else len(body)]
        seg2, at = insert_at_word(seg, frag, rng, wp, 0.25, 0.75)
        spans.append((len(ids) + at, len(ids) + at + len(frag)))
        ids += seg2
    return NeedleDoc(ids, index, spans[0][0] / max(len(ids), 1), spans)


class NeedleDataset(Dataset):
    """Images paired with needle documents drawn afresh for every item (training).

    Item i: ``{"image": (3, S, S) tensor, "doc_ids": list[int], "doc_source": list[int],
    "caption_ids": list[int], "concept": int, "index": i}`` where the document carries caption i
    (``caption_ids``, its pieces) at a random position, the length drawn among ``lengths``;
    ``doc_source`` gives each document piece's position in the filler's prose (-1 for the
    caption's pieces).

    Args:
        images: (N, 3, S, S) float or uint8 images (uint8 is converted with ``mean``/``std``).
        captions: one per image.
        tokenizer, filler: as in :func:`needle_documents`.
        lengths: document lengths in pieces, drawn uniformly per item.
        concepts: optional (N,) concept id per image (same-concept pairs are not negatives).
        fixed: the same document for item i on every access (validation); else a new draw.
    """

    def __init__(
        self,
        images: torch.Tensor,
        captions: Sequence[str],
        tokenizer: Tokenizer,
        filler: Filler,
        lengths: Sequence[int],
        concepts: torch.Tensor | None = None,
        seed: int = 0,
        fixed: bool = False,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        if not lengths or min(lengths) < 1:
            raise ValueError(f"lengths must be positive piece counts, got {lengths}")
        self.images, self.captions = images, list(captions)
        self.cap_ids = tokenizer.sp.encode(self.captions)
        self.filler, self.lengths = filler, list(lengths)
        self.wp = _word_pieces(tokenizer)
        self.concepts = concepts if concepts is not None else torch.arange(len(captions))
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.seed, self.fixed = seed, fixed
        self._calls = 0

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        self._calls += 1
        key = (self.seed, i) if self.fixed else (self.seed, i, self._calls, os.getpid())
        rng = random.Random(hash(key))
        length = rng.choice(self.lengths)
        cap = list(self.cap_ids[i])
        body, src = self.filler.span_with_source(max(length - len(cap), 0), rng)
        ids, at = insert_at_word(body, cap, rng, self.wp)
        image = self.images[i]
        if image.dtype == torch.uint8:
            image = (image.float() / 255 - self.mean) / self.std
        return {
            "image": image,
            "doc_ids": ids,
            "doc_source": src[:at] + [-1] * len(cap) + src[at:],
            "caption_ids": cap,
            "concept": int(self.concepts[i]),
            "index": i,
        }


class NeedleCollator:
    """Items of :class:`NeedleDataset` -> ``{"images", "documents": DocumentBatch, "doc_sources",
    "caption_ids", "caption_mask", "concepts", "indices"}``; the bare captions are (B, T) ids as
    the tokenizer encodes a short text for the collator's window (truncated to it);
    ``doc_sources`` the items' ``doc_source`` lists."""

    def __init__(self, collator: DocumentCollator) -> None:
        self.collator = collator

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        caption_ids, caption_mask = wrap_and_pad([it["caption_ids"] for it in items], self.collator.length)
        return {
            "images": torch.stack([it["image"] for it in items]),
            "documents": self.collator.collate_ids([it["doc_ids"] for it in items]),
            "doc_sources": [it["doc_source"] for it in items],
            "caption_ids": caption_ids,
            "caption_mask": caption_mask,
            "concepts": torch.tensor([it["concept"] for it in items], dtype=torch.long),
            "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }


def caption_windows(
    sources: Sequence[Sequence[int]], chunk_counts: torch.Tensor, pieces: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks that hold a needle document's whole caption: (rows, owners), their rows in the
    batch's (C, L) chunks and the documents they belong to. ``sources`` as in
    :class:`NeedleDataset` (caption pieces are -1); one-chunk documents are left out."""
    rows, owners = [], []
    row = 0
    for i, (src, count) in enumerate(zip(sources, chunk_counts.tolist())):
        caption = [j for j, x in enumerate(src) if x < 0]
        if count > 1 and caption:
            a, e = caption[0], caption[-1] + 1
            for k, s0 in enumerate(chunk_starts(len(src), pieces, stride)):
                if s0 <= a and e <= s0 + pieces:
                    rows.append(row + k)
                    owners.append(i)
        row += count
    return torch.tensor(rows, dtype=torch.long), torch.tensor(owners, dtype=torch.long)
