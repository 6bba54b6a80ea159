"""CLIP's byte-level BPE tokenizer, with the batch interface of :class:`mmformer.tokenizer.Tokenizer`.

The merges file is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz``, shipped inside this package
(``mmformer/assets/clip_bpe_simple_vocab_16e6.txt.gz``, MIT, ``mmformer/assets/LICENSE-clip-bpe.txt``)
and saved beside a model that uses it. Text is cleaned as open_clip's default ``"lower"`` mode does
(ftfy, HTML unescape, whitespace collapsed, lower case), so ids equal open_clip's tokenizer's:
``[start_of_text] pieces [end_of_text]``, pieces truncated to fit, then id 0 as padding. Id 0 is
also the piece ``!``: the mask this tokenizer returns marks each row's own tokens, and a model
with ``text_pool="argmax"`` finds them without a mask (up to the end-of-text id, the highest).
Needs ``ftfy`` and ``regex`` (``pip install mmformer[clip]``).
"""

from __future__ import annotations

import gzip
import html
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from mmformer.files import write_bytes_atomic
from mmformer.tokenizer import chunk_ids, wrap_and_pad

log = logging.getLogger(__name__)

#: file name of the merges inside a save_pretrained directory
CLIP_BPE_NAME = "clip_bpe.txt.gz"
_MERGES = 49152 - 256 - 2  # merges CLIP uses (lines 1.. of the file)


def default_clip_bpe_path() -> Path:
    """CLIP's merges file shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """Each of the 256 byte values -> a printable character (CLIP's reversible byte alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ClipTokenizer:
    """CLIP's BPE tokenizer: ``ids, mask = tokenizer(texts, max_length=77)`` gives (B, T) int64 ids
    and a (B, T) bool mask (True = the row's own tokens), T = the longest row or ``max_length``.

    ``pad_id`` 0, ``bos_id`` 49406 (start of text), ``eos_id`` 49407 (end of text).
    """

    file_name = CLIP_BPE_NAME

    def __init__(self, merges_gz: bytes) -> None:
        try:
            import ftfy
            import regex
        except ImportError as e:
            raise ImportError("CLIP's tokenizer needs ftfy and regex (pip install 'mmformer[clip]')") from e
        self._ftfy = ftfy
        self._gz = bytes(merges_gz)
        try:
            lines = gzip.decompress(self._gz).decode("utf-8").split("\n")[1 : _MERGES + 1]
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise ValueError(f"not a gzipped CLIP merges file ({e})") from None
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != _MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"a CLIP merges file has {_MERGES} merges of two symbols after its header line")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<start_of_text>", "<end_of_text>"]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.bos_id, self.eos_id, self.pad_id = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"], 0
        self._cache: dict[str, list[int]] = {}
        self._pattern = regex.compile(
            r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def default(cls) -> ClipTokenizer:
        """CLIP's tokenizer with the merges shipped inside the package."""
        return cls.load(default_clip_bpe_path())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClipTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP merges file not found: {path}")
        try:
            return cls(path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the gzipped merges file atomically."""
        write_bytes_atomic(Path(path), self._gz)

    # ---- encoding -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _clean(self, text: str) -> str:
        text = html.unescape(html.unescape(self._ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _bpe(self, token: str) -> list[int]:
        """Piece ids of one pre-token (its bytes as CLIP's alphabet), by merging the best-ranked pair first."""
        if token in self._cache:
            return self._cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[piece] for piece in word]
        if len(self._cache) < 100_000:
            self._cache[token] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Piece ids of ``text`` without the start / end of text."""
        ids: list[int] = []
        for token in self._pattern.findall(self._clean(text)):
            if token in ("<start_of_text>", "<end_of_text>"):
                ids.append(self.encoder[token])
                continue
            ids += self._bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8")))
        return ids

    @property
    def specials(self) -> tuple[int, int, int]:
        """The (bos, eos, pad) ids :func:`mmformer.tokenizer.wrap_and_pad` wraps and pads rows with."""
        return self.bos_id, self.eos_id, self.pad_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Piece ids of each text, without the start / end of text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first end of text, without the start of text."""
        pieces = []
        for i in map(int, ids):
            if i == self.eos_id:
                break
            if i != self.bos_id:
                pieces.append(self.decoder[i])
        raw = bytearray(self.byte_decoder[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(
        self, texts: str | list[str], max_length: int = 77, pad_to_max: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch to ((B, T) int64 ids, (B, T) bool mask); T <= max_length."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 (start, one piece, end), got {max_length}")
        return wrap_and_pad(self.encode_batch(texts), max_length, pad_to_max, specials=self.specials)

    def chunk(self, text: str, length: int, stride: int | None = None) -> list[list[int]]:
        """Windows of at most ``length`` piece ids, starting every ``stride`` ids (as
        :meth:`mmformer.tokenizer.Tokenizer.chunk`)."""
        return chunk_ids(self.encode(text), length, stride)
