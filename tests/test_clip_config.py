"""The config fields and layers a CLIP tower needs: causal text mask, learned text positions, argmax
pooling, QuickGELU, a patch embedding without bias, a text path of its own width (share="none")."""

from __future__ import annotations

import pytest
import torch

from mmformer.config import ModelConfig
from mmformer.layers.causal import causal_attend
from mmformer.layers.multiway import QuickGELU
from mmformer.model import MMFormer, model_fingerprint

TWO_TOWER = dict(
    width=32,
    depth=2,
    heads=4,
    image_size=16,
    patch_size=8,
    vocab_size=64,
    context_length=8,
    embed_dim=16,
    share="none",
    text_width=24,
    text_heads=3,
    text_mlp_ratio=2.0,
    text_pos="learned",
    text_mask="causal",
    text_pool="argmax",
    mlp_act="quick_gelu",
    patch_bias=False,
)


def test_causal_attend_matches_a_float64_reference_and_ignores_later_padding():
    torch.manual_seed(0)
    b, t, h, dh = 2, 6, 2, 4
    qkv = torch.randn(b, t, 3 * h * dh, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = causal_attend(qkv, h, mask)
    q, k, v = qkv.view(b, t, 3, h, dh).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / dh**0.5
    allowed = torch.ones(t, t).tril().bool()[None, None] & mask[:, None, None, :]
    ref = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # (B, H, T, Dh)
    ref = ref.transpose(1, 2).reshape(b, t, h * dh)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, :4], ref[1, :4])
    # a real position never sees a later key: changing later tokens changes nothing before them
    changed = qkv.clone()
    changed[:, 3:] += 1.0
    torch.testing.assert_close(causal_attend(changed, h, mask)[:, :3], out[:, :3])


def test_quick_gelu_is_x_sigmoid_1702x():
    x = torch.linspace(-4, 4, 17)
    torch.testing.assert_close(QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)))


def test_two_tower_config_builds_per_modality_shapes():
    m = MMFormer(ModelConfig(**TWO_TOWER)).eval()
    sd = m.state_dict()
    assert "patch_embed.proj.bias" not in sd
    assert sd["text_pos"].shape == (8, 24) and sd["token_embed.weight"].shape == (64, 24)
    assert sd["blocks.0.attn.qkv.image.weight"].shape == (96, 32)
    assert sd["blocks.0.attn.qkv.text.weight"].shape == (72, 24)
    assert sd["blocks.0.mlp.text.fc1.weight"].shape == (48, 24)
    assert sd["norm.text.weight"].shape == (24,) and sd["text_proj.weight"].shape == (16, 24)
    assert isinstance(m.blocks[0].mlp["text"].act, QuickGELU)
    assert m.parameter_roles()["text_pos"] == "text" and "text_pos" in m.no_weight_decay()
    # argmax pooling: the real tokens end at the highest id; what follows it (even id 0) changes nothing
    ids = torch.tensor([[5, 9, 63, 0, 0, 0], [5, 9, 7, 63, 4, 4]])
    with torch.no_grad():
        z = m.encode_text(ids)
        torch.testing.assert_close(m.encode_text(ids[:, :4]), z)
        shorter = ids.clone()
        shorter[1, 4:] = 11
        torch.testing.assert_close(m.encode_text(shorter), z)
        assert m.encode_image(torch.randn(2, 3, 16, 16)).shape == (2, 16)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(text_width=24), "need share='none'"),
        (dict(share="none", text_width=24, text_heads=5), "not divisible by text heads 5"),
        (dict(share="none", text_width=24, fusion_latents=4), "does not support document_expert"),
        (dict(depth=3, text_depth=2), "need share='none'"),
        (dict(share="none", depth=2, text_depth=3), r"text_depth=3 must be in \[1, depth=2\]"),
        (dict(mlp_act="relu"), "mlp_act='relu' must be one of"),
        (dict(text_mask="causal", attention="local"), "needs attention='dense'"),
        (dict(text_pos="rope"), "text_pos='rope' must be"),
        (dict(text_pool="first"), "text_pool='first' must be one of"),
    ],
)
def test_bad_clip_fields_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**dict(width=32, heads=4), **fields})


def test_new_fields_at_their_defaults_keep_the_fingerprint_and_change_it_otherwise():
    base = dict(width=32, depth=1, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16)
    torch.manual_seed(0)
    m = MMFormer(ModelConfig(**base))
    fp = model_fingerprint(m)
    m.config = ModelConfig(**base, mlp_act="gelu", text_mask="bidirectional")
    assert model_fingerprint(m) == fp
    m.config = ModelConfig(**base, mlp_act="quick_gelu")
    assert model_fingerprint(m) != fp


def test_two_tower_model_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    m = MMFormer(ModelConfig(**TWO_TOWER)).eval()
    m.save_pretrained(tmp_path / "m")
    m2 = MMFormer.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([[5, 9, 63, 0]])
    with torch.no_grad():
        assert torch.equal(m.encode_text(ids), m2.encode_text(ids))
