"""open_clip and Hugging Face CLIP weights into MMFormer (share="none") and back: equal embeddings.

The peers are built with random weights (nothing downloads): open_clip's ViT-B-32 and ViT-B-16
architectures from its bundled configs, and a small Hugging Face ``CLIPConfig``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mmformer.model import MMFormer

open_clip = pytest.importorskip("open_clip")

CAPTIONS = ["a photo of a cat", "two dogs playing in the snow!", "an emoji of a red heart"]


@functools.lru_cache(maxsize=1)  # the plain ViT-B-32 pair serves several tests (a pair takes seconds to build)
def open_clip_pair(arch: str, **kw):
    torch.manual_seed(0)
    peer = open_clip.create_model(arch, pretrained=None, **kw).eval()
    with torch.no_grad():  # open_clip starts some tensors at zero; make every weight matter
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return peer, MMFormer.from_open_clip(peer, arch).eval()


def clip_token_ids(n: int = 3) -> torch.Tensor:
    """(n, 77) CLIP BPE ids of CAPTIONS (start, pieces, end-of-text, zeros)."""
    return open_clip.get_tokenizer("ViT-B-32")(CAPTIONS[:n])


@pytest.mark.parametrize("arch, kw", [("ViT-B-16", {}), ("ViT-B-32", {"force_quick_gelu": True}), ("ViT-B-32", {})])
def test_open_clip_import_gives_equal_embeddings(arch, kw):
    peer, model = open_clip_pair(arch, **kw) if kw else open_clip_pair(arch)
    assert model.config.share == "none" and model.config.mlp_act == ("quick_gelu" if kw else "gelu")
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    ids = clip_token_ids()
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), peer.encode_image(images, normalize=True), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(model.encode_text(ids), peer.encode_text(ids, normalize=True), atol=1e-5, rtol=0)
        # trailing padding trimmed away (a batch padded to its longest text) embeds the same
        trimmed = ids[:, : int((ids != 0).sum(1).max())]
        torch.testing.assert_close(model.encode_text(trimmed), peer.encode_text(ids, normalize=True), atol=1e-5, rtol=0)
        assert torch.equal(model.logit_scale, peer.logit_scale)


def test_open_clip_import_from_a_weights_file_and_a_training_checkpoint(tmp_path):
    peer, model = open_clip_pair("ViT-B-32")
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in peer.state_dict().items()}}, tmp_path / "epoch_3.pt"
    )
    loaded = MMFormer.from_open_clip(tmp_path / "epoch_3.pt", "ViT-B-32").eval()
    own, other = model.state_dict(), loaded.state_dict()
    assert own.keys() == other.keys() and all(torch.equal(own[k], other[k]) for k in own)


def test_open_clip_unknown_or_missing_keys_are_one_line_errors():
    peer, _ = open_clip_pair("ViT-B-32")
    state = dict(peer.state_dict())
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(768)
    with pytest.raises(ValueError, match=r"open_clip key 'visual.transformer.resblocks.0.ls_1.gamma' has no MMFormer"):
        MMFormer.from_open_clip(state, "ViT-B-32")
    del state["visual.transformer.resblocks.0.ls_1.gamma"]
    del state["ln_final.bias"]
    with pytest.raises(ValueError, match=r"missing=\['norm.text.bias'\]"):
        MMFormer.from_open_clip(state, "ViT-B-32")
    with pytest.raises(ValueError, match=r"shape mismatches"):
        MMFormer.from_open_clip(peer.state_dict(), "ViT-B-16")


def test_a_text_tower_shallower_than_the_image_tower_runs_through_the_first_blocks():
    from mmformer.convert.open_clip import open_clip_config

    assert open_clip_config("ViT-L-14").text_depth == 12 and open_clip_config("ViT-L-14").depth == 24
    cfg = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2},
    }
    torch.manual_seed(0)
    peer = open_clip.model.CLIP(**cfg).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    config = open_clip_config("tiny", cfg=cfg)
    assert (config.depth, config.text_depth, config.text_width) == (3, 2, 48)
    model = MMFormer(config)
    from mmformer.convert.open_clip import open_clip_to_mmformer

    model.load_state_dict_checked(open_clip_to_mmformer(peer.state_dict()))
    model.eval()
    assert "blocks.2.norm1.text.weight" not in model.state_dict()
    images, ids = torch.randn(2, 3, 32, 32), open_clip.get_tokenizer("ViT-B-32")(CAPTIONS[:2], context_length=12)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), peer.encode_image(images, normalize=True), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(model.encode_text(ids), peer.encode_text(ids, normalize=True), atol=1e-5, rtol=0)
    deeper = {**cfg, "text_cfg": {**cfg["text_cfg"], "layers": 4}}
    with pytest.raises(ValueError, match="3 image blocks and 4 text blocks"):
        open_clip_config("tiny", cfg=deeper)


@pytest.mark.parametrize(
    "arch, message",
    [
        ("ViT-B-16-SigLIP", "init_logit_bias = -10 is not supported"),
        ("no-such-arch", "open_clip has no architecture 'no-such-arch'"),
    ],
)
def test_open_clip_architectures_mmformer_cannot_express_are_named(arch, message):
    from mmformer.convert.open_clip import open_clip_config

    with pytest.raises(ValueError, match=message):
        open_clip_config(arch)


# ---- Hugging Face CLIP ---------------------------------------------------------------------
def hf_pair(**text):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config={
            **dict(
                vocab_size=100,
                hidden_size=32,
                intermediate_size=80,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=12,
                bos_token_id=98,
                eos_token_id=99,
                pad_token_id=0,
            ),
            **text,
        },
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    peer = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return peer


def features(out) -> torch.Tensor:
    """get_*_features' result: a tensor, or (transformers 5) an output whose pooler_output it is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_hf_clip_import_gives_equal_embeddings(tmp_path):
    peer = hf_pair()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    ids = torch.tensor([[98, 5, 6, 7, 99, 0, 0, 0], [98, 0, 11, 99, 0, 0, 0, 0], [98, 4, 5, 6, 7, 8, 9, 99]])
    mask = torch.arange(8)[None] <= (ids == 99).int().argmax(1)[:, None]
    with torch.no_grad():
        want_image = torch.nn.functional.normalize(features(peer.get_image_features(pixel_values=images)), dim=-1)
        want_text = torch.nn.functional.normalize(
            features(peer.get_text_features(input_ids=ids, attention_mask=mask.long())), dim=-1
        )
    peer.save_pretrained(tmp_path / "hf")
    for source in (peer, tmp_path / "hf"):
        model = MMFormer.from_hf_clip(source).eval()
        assert model.config.text_width == 32 and model.config.width == 48 and model.config.mlp_act == "quick_gelu"
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), want_image, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.encode_text(ids), want_text, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.encode_text(ids, mask), want_text, atol=1e-5, rtol=0)


def test_hf_clip_bad_input_is_named(tmp_path):
    from mmformer.convert.hf_clip import hf_clip_to_mmformer

    peer = hf_pair()
    state = dict(peer.state_dict())
    state["text_model.encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"key 'text_model.encoder.layers.0.self_attn.rotary.weight' has no MMFormer"):
        hf_clip_to_mmformer(state)
    del state["text_model.encoder.layers.0.self_attn.rotary.weight"]
    del state["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"lacks the \['k'\] projection\(s\) of blocks.1.attn.qkv.text.bias"):
        hf_clip_to_mmformer(state)
    with pytest.raises(ValueError, match="eos_token_id = 50"):
        MMFormer.from_hf_clip(hf_pair(eos_token_id=50))
    with pytest.raises(FileNotFoundError, match="expected a Hugging Face CLIP directory"):
        MMFormer.from_hf_clip(tmp_path)
