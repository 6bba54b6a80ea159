"""SentencePiece tokenizer: train from texts, save/load, batch encode with padding, chunk.

Special ids are fixed: pad=0, unk=1, bos=2, eos=3. A batch encode wraps each text as
``[bos] pieces [eos]``, truncating the pieces (never the eos) to fit ``max_length``.
:func:`default_tokenizer_path` is the default model, package data in ``mmformer/assets/``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from mmformer.files import write_bytes_atomic

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def default_tokenizer_path() -> Path:
    """The default SentencePiece model, shipped inside the package (``mmformer/assets/tokenizer.model``).

    Unigram, 2000 pieces, trained on the names and keywords of the bundled emoji data's train
    concepts (the command that made it is in ``data/README.md``).
    """
    return Path(__file__).resolve().parent / "assets" / "tokenizer.model"


class Tokenizer:
    """A SentencePiece model with the batch interface the model and data code use.

    ``ids, mask = tokenizer(texts, max_length=16)`` gives (B, T) int64 ids and a (B, T) bool
    mask (True = real token), T = the longest encoded text, at most ``max_length``.
    """

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, model_proto: bytes) -> None:
        self._proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        specials = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if specials != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                "SentencePiece model must use pad=0, unk=1, bos=2, eos=3 "
                f"(got pad={specials[0]}, unk={specials[1]}, bos={specials[2]}, eos={specials[3]}); "
                "train it with Tokenizer.train"
            )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4096,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        lowercase: bool = True,
    ) -> Tokenizer:
        """Train on an iterator of texts. ``vocab_size`` is an upper bound on small corpora."""
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        texts = [t.lower() if lowercase else t for t in texts if t and t.strip()]
        if not texts:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            hard_vocab_limit=False,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            num_threads=min(4, os.cpu_count() or 1),
            minloglevel=2,
        )
        tok = cls(buf.getvalue())
        log.info("trained a %s tokenizer with %d pieces on %d texts", model_type, tok.vocab_size, len(texts))
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write the SentencePiece model file atomically."""
        write_bytes_atomic(Path(path), self._proto)

    # ---- encoding -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def specials(self) -> tuple[int, int, int]:
        """The (bos, eos, pad) ids :func:`wrap_and_pad` wraps and pads rows with."""
        return BOS_ID, EOS_ID, PAD_ID

    def encode(self, text: str) -> list[int]:
        """Piece ids of ``text`` without special tokens."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Piece ids of each text, without special tokens (one SentencePiece call)."""
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, skipping pad/bos/eos."""
        return self.sp.decode([int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)])

    def __call__(
        self, texts: str | list[str], max_length: int = 64, pad_to_max: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch to ((B, T) int64 ids, (B, T) bool mask); T <= max_length."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 (bos, one piece, eos), got {max_length}")
        return wrap_and_pad(self.sp.encode(list(texts)), max_length, pad_to_max)

    def chunk(self, text: str, length: int, stride: int | None = None) -> list[list[int]]:
        """Windows of at most ``length`` piece ids, starting every ``stride`` ids.

        ``stride`` defaults to ``length`` (no overlap); ``stride < length`` overlaps windows by
        ``length - stride``. The windows cover every piece; the last window ends at the text's
        end. An empty text gives one empty window.
        """
        return chunk_ids(self.encode(text), length, stride)


def wrap_and_pad(
    pieces: list[list[int]],
    max_length: int,
    pad_to_max: bool = False,
    specials: tuple[int, int, int] = (BOS_ID, EOS_ID, PAD_ID),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Piece-id lists -> ((B, T) int64 ids, (B, T) bool mask): each row ``[bos] pieces [eos]``,
    pieces truncated (never the eos) to fit ``max_length``, padded to the longest row (or to
    ``max_length`` with ``pad_to_max``). ``specials``: the (bos, eos, pad) ids; the mask marks each
    row's own tokens (a pad id that is also a piece, as CLIP's 0, stays real inside a row)."""
    bos, eos, pad = specials
    rows = [[bos, *ids[: max_length - 2], eos] for ids in pieces]
    t = max_length if pad_to_max else max((len(r) for r in rows), default=2)
    ids = np.full((len(rows), t), pad, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


def chunk_ids(ids: list[int], length: int, stride: int | None = None) -> list[list[int]]:
    """:meth:`Tokenizer.chunk` on piece ids already encoded: windows of at most ``length`` ids."""
    return [list(ids[s : s + length]) for s in chunk_starts(len(ids), length, stride)]


def chunk_starts(n: int, length: int, stride: int | None = None) -> list[int]:
    """Where the windows of :func:`chunk_ids` start in a text of ``n`` ids: every ``stride`` ids,
    the last one ending at the text's end (one window at 0 when ``n <= length``)."""
    stride = length if stride is None else stride
    if length < 1 or not 1 <= stride <= length:
        raise ValueError(f"need length >= 1 and 1 <= stride <= length, got length={length}, stride={stride}")
    if n <= length:
        return [0]
    return [*range(0, n - length, stride), n - length]


# ---- the ``mmformer tokenizer`` verb -----------------------------------------------------------
def add_arguments(p) -> None:
    """The flags of ``mmformer tokenizer`` (``p``: an ``argparse.ArgumentParser``)."""
    p.add_argument(
        "--input", required=True, nargs="+", help=".txt (one text a line) or .jsonl/.csv/.tsv files (see --fields)"
    )
    p.add_argument(
        "--fields", default="caption", help="comma-separated columns to read from jsonl/csv (list values are flattened)"
    )
    p.add_argument("--split", default=None, help="keep jsonl/csv rows whose 'split' equals this")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--out", required=True)


def tokenizer_command(
    *,
    input: list[str],
    out: str,
    fields: str = "caption",
    split: str | None = None,
    vocab_size: int = 2000,
    model_type: str = "unigram",
) -> int:
    """``mmformer tokenizer``: train a SentencePiece tokenizer on the texts of the ``input`` files
    (:func:`read_texts`) and save it to ``out``; prints what it trained."""
    texts = list(read_texts(input, fields.split(","), split))
    tok = Tokenizer.train(texts, vocab_size=vocab_size, model_type=model_type)
    tok.save(out)
    print(f"trained a {model_type} tokenizer with {tok.vocab_size} pieces on {len(texts)} texts -> {out}")
    return 0


def read_texts(paths: list[str], fields: list[str], split: str | None) -> Iterable[str]:
    """Texts from .txt lines or the ``fields`` of .jsonl/.csv/.tsv rows (lists flattened)."""
    import csv
    import io
    import json

    from mmformer.files import read_utf8_lines, read_utf8_text

    def jsonl(path: Path):  # errors name the file, line and column
        for n, line in enumerate(read_utf8_lines(path), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON: {e.msg} (column {e.colno})") from None

    for path in map(Path, paths):
        if path.suffix == ".txt":
            yield from (line.strip() for line in read_utf8_lines(path) if line.strip())
            continue
        if path.suffix == ".jsonl":
            rows = jsonl(path)
        elif path.suffix in (".csv", ".tsv"):
            rows = csv.DictReader(
                io.StringIO(read_utf8_text(path), newline=""), delimiter="\t" if path.suffix == ".tsv" else ","
            )
        else:
            raise ValueError(f"{path}: expected a .txt, .jsonl, .csv or .tsv file")
        for i, row in enumerate(rows, start=1):
            missing = [f for f in fields if f not in row]
            if missing:
                raise ValueError(f"{path}: row {i} has no field(s) {missing}; fields are {sorted(row)}")
            if split is not None and row.get("split") != split:
                continue
            for f in fields:
                v = row[f]
                yield from (v if isinstance(v, list) else [v])
