"""Padding-free text tokens (mmformer.layers.packing): the packed text path equals the padded one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mmformer.config import ModelConfig, get_config
from mmformer.layers.packing import TokenPacking
from mmformer.model import MMFormer

LENGTHS = [3, 5, 16, 7, 2, 9, 4, 11, 3, 6]  # real tokens per row of a (10, 16) batch: 66 of 160


def text_batch(lengths=LENGTHS, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    ids = torch.randint(4, 4000, (len(lengths), t), generator=g).masked_fill(~mask, 0)
    return ids, mask


def packing_below(model, fraction):
    """``model`` with ``config.pack_text_below = fraction`` (a fresh config: the caller's is not edited)."""
    model.config = dataclasses.replace(model.config, pack_text_below=fraction)
    return model


def padded_and_packed(model, fn):
    """fn(model) with packing off, then on (the default)."""
    padded = fn(packing_below(model, 0))
    return padded, fn(packing_below(model, ModelConfig.pack_text_below))


def test_pack_unpack_round_trip_and_multiple():
    _, mask = text_batch()
    x = torch.randn(*mask.shape, 5)
    p = TokenPacking(mask)
    assert p.tokens == int(mask.sum()) == 66
    assert torch.equal(p.pack(x), x[mask])  # row-major order of the real tokens
    back = p.unpack(p.pack(x))
    assert torch.equal(back[mask], x[mask]) and not back[~mask].any()
    p64 = TokenPacking(mask, multiple=64)  # 66 real tokens -> 128 rows, the extra 62 from the pads
    assert p64.tokens == 128 and torch.equal(p64.index, p64.index.sort().values)
    assert torch.equal(TokenPacking(mask, multiple=64, real=66).index, p64.index)  # the count passed in
    packed_mask = torch.zeros(mask.numel(), dtype=torch.bool)
    packed_mask[p64.index] = True
    assert packed_mask.view_as(mask)[mask].all()  # every real token is packed
    assert TokenPacking(mask, multiple=1000).tokens == mask.numel()  # never more than B * T


def test_pack_errors_name_the_shapes():
    _, mask = text_batch()
    with pytest.raises(ValueError, match=r"\(B, T\) bool mask"):
        TokenPacking(mask.long())
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        TokenPacking(mask, multiple=0)
    p = TokenPacking(mask)
    with pytest.raises(ValueError, match=r"expected \(10, 16, C\)"):
        p.pack(torch.zeros(10, 15, 4))
    with pytest.raises(ValueError, match=r"expected \(66, C\) packed tokens"):
        p.unpack(torch.zeros(65, 4))


def test_packed_text_path_equals_padded_in_forward_and_backward():
    torch.manual_seed(0)
    model = MMFormer(get_config("tiny")).train()
    ids, mask = text_batch()

    def run(m):
        m.zero_grad(set_to_none=True)
        states = m.forward_text_features(ids, mask)
        emb = m.encode_text(ids, mask)
        (emb * torch.linspace(-1, 1, emb.shape[-1])).sum().backward()
        return states.detach(), emb.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (s0, e0, g0), (s1, e1, g1) = padded_and_packed(model, run)
    torch.testing.assert_close(s1[mask], s0[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and any("attn.qkv" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("variant", ["grad_checkpointing", "local_attention", "head_gate", "bf16"])
def test_packed_equals_padded_with(variant):
    torch.manual_seed(0)
    model = MMFormer(get_config("tiny", grad_checkpointing=variant == "grad_checkpointing")).train()
    if variant == "local_attention":
        model.set_text_attention("local", window=2, n_global=1)
    if variant == "head_gate":
        for block in model.blocks:
            block.attn.head_gate = torch.tensor([1.0, 0.0, 0.5, 1.0], requires_grad=True)
    ids, mask = text_batch()

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            return m.encode_text(ids, mask).float().detach()

    padded, packed = padded_and_packed(model, run)
    tol = 2e-2 if variant == "bf16" else 1e-5
    torch.testing.assert_close(packed, padded, atol=tol, rtol=tol)


def test_packing_is_skipped_without_pads_when_off_and_when_traced():
    model = MMFormer(get_config("tiny")).eval()
    ids, mask = text_batch()
    assert model._packing(mask) is not None
    assert model._packing(torch.ones_like(mask)) is None  # nothing to save
    assert packing_below(model, 0)._packing(mask) is None
    packing_below(model, ModelConfig.pack_text_below)
    seen = []
    original = model._packing
    model._packing = lambda m: seen.append(original(m)) or seen[-1]

    class EncodeText(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, i, m):
            return self.model.encode_text(i, m)

    torch.jit.trace(EncodeText(), (ids, mask), check_trace=False)
    assert seen == [None]  # a traced graph keeps the padded shapes


def test_pack_text_below_is_a_config_field_and_old_configs_pack_as_before(tmp_path):
    """A config.json written before the field existed loads with the default (0.9), packs the same
    batches and gives the same fingerprint; the field is saved, and a model saved with packing off
    loads with packing off."""
    from mmformer.model import model_fingerprint

    old = json.loads((Path(__file__).parent / "fixtures" / "config-227686d.json").read_text())
    assert "pack_text_below" not in old
    cfg = ModelConfig.from_json(Path(__file__).parent / "fixtures" / "config-227686d.json")
    assert cfg.pack_text_below == 0.9
    torch.manual_seed(0)
    model = MMFormer(cfg).eval()
    ids, mask = text_batch([2, 8, 3, 1], t=8)  # 14 of 32 positions real: packed
    ids = ids % cfg.vocab_size * mask  # the fixture's 64-piece vocabulary
    assert model._packing(mask) is not None and model._packing(torch.ones_like(mask)) is None
    off = MMFormer(dataclasses.replace(cfg, pack_text_below=0)).eval()
    off.load_state_dict(model.state_dict())
    assert off._packing(mask) is None
    assert model_fingerprint(off) == model_fingerprint(model)  # indexes stay valid
    torch.testing.assert_close(model.encode_text(ids, mask), off.encode_text(ids, mask), atol=1e-6, rtol=0)

    off.save_pretrained(tmp_path / "off")
    assert json.loads((tmp_path / "off" / "config.json").read_text())["pack_text_below"] == 0
    back = MMFormer.from_pretrained(tmp_path / "off")
    assert back.config.pack_text_below == 0 and back._packing(mask) is None
    # a runtime field: editing it in config.json is allowed
    d = json.loads((tmp_path / "off" / "config.json").read_text())
    (tmp_path / "off" / "config.json").write_text(json.dumps({**d, "pack_text_below": 0.5}))
    assert MMFormer.from_pretrained(tmp_path / "off").config.pack_text_below == 0.5
    with pytest.raises(ValueError, match=r"pack_text_below=1.5 must be in \[0, 1\]"):
        ModelConfig(pack_text_below=1.5)
    with pytest.raises(ValueError, match="'pack_text_below' must be float"):
        ModelConfig.from_dict({**old, "pack_text_below": "0.9"})
