"""Sparse attention (local + global, memory-compressed) against dense attention and float64 references."""

import math

import pytest
import torch

from mmformer.config import ModelConfig
from mmformer.layers.attention import attend
from mmformer.layers.sparse import compressed_attention, local_global_attention, make_attend
from mmformer.model import MMFormer


def reference(qkv, heads, allowed):
    """Masked softmax attention in float64; allowed: (B, T, S) bool over (query, key)."""
    qkv = qkv.double()
    b, t, three_d = qkv.shape
    d = three_d // 3
    q, k, v = qkv.view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)  # (B, H, T, S)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2).reshape(b, t, d)


def padded_inputs(t=37, seed=0):
    torch.manual_seed(seed)
    qkv = torch.randn(3, t, 3 * 32)
    pad = torch.ones(3, t, dtype=torch.bool)
    pad[1, 30:] = False
    pad[2, 9:] = False
    return qkv, pad


@pytest.mark.parametrize("n_global", [0, 1, 3])
def test_local_attention_with_window_covering_the_sequence_equals_dense(n_global):
    qkv, pad = padded_inputs()
    dense = attend(qkv, 4, pad)
    local = local_global_attention(qkv, 4, pad, window=36, n_global=n_global, block=8)
    real = pad[..., None].expand_as(dense)
    torch.testing.assert_close(local[real], dense[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(local).all()


def test_local_global_attention_matches_banded_reference():
    qkv, pad = padded_inputs()
    t, w, g = qkv.shape[1], 4, 2
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = ((i - j).abs() <= w) | (j < g) | (i < g)  # (T, T)
    allowed = allowed[None] & pad[:, None, :]
    ref = reference(qkv, 4, allowed)
    out = local_global_attention(qkv, 4, pad, window=w, n_global=g, block=5)
    real = pad[..., None].expand_as(out)
    torch.testing.assert_close(out[real].double(), ref[real], atol=1e-5, rtol=1e-5)
    # and it is really sparse: differs from dense
    assert (out - attend(qkv, 4, pad))[real].abs().max() > 1e-3


def test_compression_one_equals_dense_and_compression_matches_pooled_reference():
    qkv, pad = padded_inputs()
    dense = attend(qkv, 4, pad)
    real = pad[..., None].expand_as(dense)
    torch.testing.assert_close(
        compressed_attention(qkv, 4, pad, compression=1)[real], dense[real], atol=1e-6, rtol=1e-6
    )
    # compression 4: K and V mean-pooled over real tokens of each stride, float64 reference
    c, (b, t, _) = 4, qkv.shape
    q, k, v = qkv.double().view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
    out = torch.zeros(b, 4, t, 8, dtype=torch.float64)
    for bi in range(b):
        slots = [[s for s in range(st, min(st + c, t)) if pad[bi, s]] for st in range(0, t, c)]
        slots = [s for s in slots if s]
        kp = torch.stack([k[bi][:, s].mean(1) for s in slots], 1)  # (H, S, Dh)
        vp = torch.stack([v[bi][:, s].mean(1) for s in slots], 1)
        out[bi] = torch.softmax(q[bi] @ kp.transpose(-1, -2) / math.sqrt(8), -1) @ vp
    ref = out.transpose(1, 2).reshape(b, t, 32)
    got = compressed_attention(qkv, 4, pad, compression=c)
    torch.testing.assert_close(got[real].double(), ref[real], atol=1e-5, rtol=1e-5)


def test_model_text_path_with_sparse_options_equals_dense_where_it_should():
    torch.manual_seed(0)
    cfg = dict(width=32, depth=2, heads=4, image_size=16, patch_size=8, vocab_size=60, context_length=40, embed_dim=16)
    m = MMFormer(ModelConfig(**cfg)).eval()
    ids = torch.randint(4, 60, (2, 40))
    ids[:, 0], ids[0, -1], ids[1, 25], ids[1, 26:] = 2, 3, 3, 0
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        dense, dense_image = m.encode_text(ids), m.encode_image(images)
        m.set_text_attention("local", window=39, n_global=1)
        torch.testing.assert_close(m.encode_text(ids), dense, atol=1e-5, rtol=1e-5)
        m.set_text_attention("compressed", compression=1)
        torch.testing.assert_close(m.encode_text(ids), dense, atol=1e-5, rtol=1e-5)
        m.set_text_attention("local", window=2, n_global=1)
        assert (m.encode_text(ids) - dense).abs().max() > 1e-4
        assert torch.equal(m.encode_image(images), dense_image)  # the image path stays dense
    assert m.config.attention == "local" and m.config.attention_window == 2
    assert (
        ModelConfig.from_dict({**cfg, "attention": "compressed", "attention_compression": 2}).attention_compression == 2
    )
    with pytest.raises(ValueError, match="attention='sparse' must be"):
        ModelConfig(attention="sparse")
    with pytest.raises(ValueError, match="must be one of"):
        make_attend("sparse")
