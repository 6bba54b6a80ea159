"""CLIP's BPE tokenizer (mmformer.bpe): open_clip's ids, the Tokenizer interface, saved with the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmformer.bpe import ClipTokenizer
from mmformer.config import ModelConfig
from mmformer.model import MMFormer

open_clip = pytest.importorskip("open_clip")

TEXTS = [
    "a photo of a cat",
    "Two DOGS   playing in the snow!!",
    "caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9 &amp; co.",
    "it's 2026, we'll see: 3.14159 \U0001f600\U0001f431",
    "<start_of_text> literal specials <end_of_text>",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "x" * 300,
    " ".join(["word"] * 100),
    "",
]


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer.default()


def test_ids_equal_open_clips_tokenizer(tok):
    ref = open_clip.get_tokenizer("ViT-B-32")
    want = ref(TEXTS)  # (B, 77): start, pieces (truncated), end, zeros
    ids, mask = tok(TEXTS, max_length=77, pad_to_max=True)
    assert torch.equal(ids, want)
    ends = 76 - (want.flip(1) == tok.eos_id).int().argmax(1)  # each row's last end of text
    assert torch.equal(mask, torch.arange(77)[None] <= ends[:, None])
    for text in TEXTS[:6]:
        assert tok.encode(text) == ref.encode(text)
    assert tok.vocab_size == 49408 and (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 0)


def test_batch_padding_windows_and_decode(tok):
    ids, mask = tok(["a cat", "a dog on a mat"], max_length=77)  # padded with id 0 to the longest row
    assert ids.shape == (2, 7) and ids[0, 4:].tolist() == [0, 0, 0]
    assert mask.tolist() == [[True] * 4 + [False] * 3, [True] * 7]
    ids, mask = tok(["a cat", "a long caption here"], max_length=4)
    assert ids[1].tolist()[-1] == tok.eos_id and ids.shape == (2, 4)
    assert tok.decode(tok(["A Photo of a cat"])[0][0]) == "a photo of a cat"
    pieces = tok.encode("one two three four five six seven")
    assert tok.chunk("one two three four five six seven", 3, 2) == [pieces[0:3], pieces[2:5], pieces[4:7]]
    with pytest.raises(ValueError, match="max_length must be >= 3"):
        tok(["a"], max_length=2)


def test_bad_merges_file_is_named(tmp_path):
    bad = tmp_path / "merges.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"merges.gz: not a gzipped CLIP merges file"):
        ClipTokenizer.load(bad)


def test_imported_model_saves_its_tokenizer_and_encodes_strings_as_open_clip(tmp_path):
    torch.manual_seed(0)
    peer = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    model = MMFormer.from_open_clip(peer, "ViT-B-32").eval()
    assert isinstance(model.tokenizer, ClipTokenizer)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "clip_bpe.txt.gz").is_file() and not (tmp_path / "m" / "tokenizer.model").exists()
    loaded = MMFormer.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded.tokenizer, ClipTokenizer)
    texts = TEXTS[:5]  # the last one holds a literal end of text: pooled at the first, as open_clip does
    with torch.no_grad():
        want = peer.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts), normalize=True)
        torch.testing.assert_close(loaded.encode_texts(texts), want, atol=1e-5, rtol=0)
    # a SentencePiece model saved over it leaves no stale CLIP merges behind
    small = MMFormer(
        ModelConfig(
            width=32, depth=1, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16
        ),
        tokenizer=None,
    )
    small.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "clip_bpe.txt.gz").exists()


def test_documents_and_the_service_wrap_with_clips_specials(tok):
    cfg = ModelConfig(
        width=32,
        depth=1,
        heads=4,
        image_size=16,
        patch_size=8,
        vocab_size=49408,
        context_length=8,
        embed_dim=16,
        share="none",
        text_pool="argmax",
        text_mask="causal",
        text_pos="learned",
    )
    torch.manual_seed(0)
    model = MMFormer(cfg, tok).eval()
    short, long = "a photo of a cat", "one two three four five six seven eight nine ten eleven"
    batch = model.document_collator()([short, long])
    assert batch.chunk_counts.tolist() == [1, 2]
    assert all(row[0] == tok.bos_id and tok.eos_id in row for row in batch.input_ids.tolist())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_document([short])[0], model.encode_texts([short])[0])
    from mmformer.serve.engine import Engine

    engine = Engine(model)
    inputs = engine.prepare_texts([short, "two dogs"])
    got = torch.from_numpy(np.stack(engine.encode_text_batch(inputs)))
    with torch.no_grad():
        torch.testing.assert_close(got, model.encode_texts([short, "two dogs"]), atol=1e-6, rtol=0)
