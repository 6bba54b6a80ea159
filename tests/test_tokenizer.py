"""SentencePiece tokenizer: training, batch encoding, round trips, chunking."""

import pytest
import torch

from mmformer.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

CORPUS = [
    "grinning face",
    "red apple",
    "green apple",
    "face with tears of joy",
    "smiling cat",
    "beaming face with smiling eyes",
    "flag: japan",
    "woman technologist",
    "red heart",
] * 10


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=60)


def test_round_trip_decodes_what_was_encoded(tok):
    for text in ["grinning face", "smiling cat with red apple", "flag: japan"]:
        ids, _ = tok([text], max_length=64)
        assert tok.decode(ids[0].tolist()) == text


def test_batch_encoding_pads_truncates_and_keeps_eos(tok):
    ids, mask = tok(["red", "beaming face with smiling eyes"], max_length=6)
    assert ids.shape == mask.shape and ids.shape[1] <= 6
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    for row, m in zip(ids, mask):
        real = row[m]
        assert real[0] == BOS_ID and real[-1] == EOS_ID  # truncation keeps the eos
        assert (row[~m] == PAD_ID).all()
    assert mask[1].all() and not mask[0].all()
    ids, _ = tok(["red"], max_length=6, pad_to_max=True)
    assert ids.shape == (1, 6)


def test_save_load_gives_the_same_ids(tok, tmp_path):
    tok.save(tmp_path / "t.model")
    again = Tokenizer.load(tmp_path / "t.model")
    assert again.encode("smiling face with tears") == tok.encode("smiling face with tears")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        Tokenizer.load(tmp_path / "bad.model")


def test_chunk_windows_cover_the_text_with_stride(tok):
    text = " ".join(CORPUS[:9])
    ids = tok.encode(text)
    windows = tok.chunk(text, length=8, stride=5)
    assert all(len(w) == 8 for w in windows)
    assert windows[0] == ids[:8] and windows[-1] == ids[-8:]
    for a, b in zip(windows, windows[1:-1]):
        assert b[:3] == a[5:]  # overlap of length - stride
    assert tok.chunk("red", length=8) == [tok.encode("red")]
    with pytest.raises(ValueError, match="stride"):
        tok.chunk(text, length=4, stride=5)


def test_bpe_and_empty_corpus():
    assert Tokenizer.train(CORPUS, vocab_size=60, model_type="bpe").vocab_size <= 60
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", "  "])
