"""MMFormer: sharing modes, shapes, persistence, timm interop."""

import json
import math
from pathlib import Path

import pytest
import torch

from mmformer.config import ModelConfig, get_config
from mmformer.model import MMFormer
from mmformer.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = dict(width=32, depth=3, heads=4, image_size=16, patch_size=8, vocab_size=50, context_length=8, embed_dim=24)


def count(share):
    return MMFormer(ModelConfig(**SMALL, share=share)).num_parameters()


def test_parameter_counts_differ_by_exactly_what_is_shared():
    d, h, depth = 32, 128, 3
    qkv = 3 * d * d + 3 * d
    proj = d * d + d
    mlp = d * h + h + h * d + d
    assert count("none") - count("qkv") == depth * qkv
    assert count("qkv") - count("attention") == depth * proj
    assert count("attention") - count("all") == depth * mlp


def test_embeddings_are_unit_length_and_logit_scale_is_clamped():
    torch.manual_seed(0)
    m = MMFormer(ModelConfig(**SMALL))
    ids = torch.tensor([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]])
    out = m(torch.randn(2, 3, 16, 16), ids)
    assert out["image_embeds"].shape == out["text_embeds"].shape == (2, 24)
    torch.testing.assert_close(out["image_embeds"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_embeds"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m(torch.randn(1, 3, 16, 16), ids[:1])["logit_scale"].item() == 100.0


def test_padding_does_not_change_a_text_embedding():
    torch.manual_seed(0)
    m = MMFormer(ModelConfig(**SMALL)).eval()
    short = m.encode_text(torch.tensor([[2, 5, 6, 3]]))
    padded = m.encode_text(torch.tensor([[2, 5, 6, 3, 0, 0, 0]]))
    torch.testing.assert_close(short, padded, atol=1e-6, rtol=1e-6)


def test_bad_shapes_raise_clear_errors():
    m = MMFormer(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 16, 16\)"):
        m.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="exceeds context_length=8"):
        m.encode_text(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="all-padding row"):
        m.encode_text(torch.tensor([[2, 3], [0, 0]]))
    with pytest.raises(ValueError, match="share='some'"):
        ModelConfig(**SMALL, share="some")


def test_save_load_round_trip_is_identical(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.train(["a red apple", "a green pear", "the blue sky", "grinning face"] * 20, vocab_size=40)
    m = MMFormer(ModelConfig(**{**SMALL, "vocab_size": 64}), tok).eval()
    m.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["width"] == 32
    m2 = MMFormer.from_pretrained(tmp_path / "ckpt").eval()
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(m.encode_image(images), m2.encode_image(images))
    assert torch.equal(m.encode_texts(["a red apple", "sky"]), m2.encode_texts(["a red apple", "sky"]))


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        MMFormer.from_pretrained(tmp_path)
    m = MMFormer(ModelConfig(**SMALL))
    m.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors: unreadable weights"):
        MMFormer.from_pretrained(tmp_path)
    other = MMFormer(ModelConfig(**{**SMALL, "depth": 2}))
    other.save_pretrained(tmp_path / "o")
    (tmp_path / "o" / "config.json").write_text(json.dumps(ModelConfig(**SMALL).to_dict()))
    with pytest.raises(ValueError, match=r"unexpected=\[\]|missing=\['blocks.2"):
        MMFormer.from_pretrained(tmp_path / "o")


def test_presets_and_json_round_trip(tmp_path):
    base = get_config("base")
    assert (base.width, base.depth, base.heads, base.patch_size) == (768, 12, 12, 16)
    base.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == base
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"widht": 3})


@pytest.mark.parametrize("share", ["qkv", "none"])
def test_image_features_equal_timm_vit(tmp_path, share):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = tmp_path / "vit_tiny.pth"
    torch.save(vit.state_dict(), path)  # a local weights file, as a user would bring
    cfg = ModelConfig(
        width=192,
        depth=12,
        heads=3,
        image_size=224,
        patch_size=16,
        image_pos="learned",
        image_pre_norm=False,
        share=share,
    )
    m = MMFormer(cfg).eval()
    m.load_timm_vit(path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_image_features(x), vit.forward_features(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image_pos='learned'"):
        MMFormer(ModelConfig(width=192, depth=12, heads=3, image_size=224, patch_size=16)).load_timm_vit(path)
    with pytest.raises(ValueError, match="shape mismatches"):
        MMFormer(
            ModelConfig(
                width=192, depth=12, heads=3, image_size=112, patch_size=16, image_pos="learned", image_pre_norm=False
            )
        ).load_timm_vit(path)


def test_config_written_before_extra_was_retired_still_loads(tmp_path):
    # written by ModelConfig.to_json at 227686d, when every config.json held "extra": {}
    old = FIXTURES / "config-227686d.json"
    assert "extra" in json.loads(old.read_text())
    cfg = ModelConfig.from_json(old)
    assert (cfg.share, cfg.attention, cfg.chunk_overflow, cfg.max_chunks, cfg.width) == (
        "attention",
        "local",
        "first",
        4,
        32,
    )
    assert "extra" not in cfg.to_dict()
    # a checkpoint directory whose config.json holds "extra" (even a non-empty one) loads the same weights
    m = MMFormer(cfg).eval()
    m.save_pretrained(tmp_path / "ckpt")
    d = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**d, "extra": {"note": "kept by nothing"}}))
    m2 = MMFormer.from_pretrained(tmp_path / "ckpt").eval()
    assert m2.config == cfg
    ids = torch.randint(3, 64, (2, 8))
    assert torch.equal(m.encode_text(ids), m2.encode_text(ids))


# ---- parameter roles: the rules the training code used to apply to parameter names -----------
def old_is_text_only(name):
    return name.startswith(("token_embed.", "norm.text.", "text_proj.")) or ".text." in name


def old_is_document_expert(name):
    return name.startswith(("norm.document.", "document_embed.")) or ".document." in name


def old_no_decay(name, p):
    return p.ndim < 2 or any(
        k in name for k in ("token_embed", "document_embed", "pos_embed", "cls_token", "logit_scale")
    )


def old_reset_parameters(model):
    """MMFormer.reset_parameters as it picked each Linear's init by its name."""
    d, depth = model.config.width, model.config.depth
    for name, m in model.named_modules():
        if name.startswith("fusion."):
            continue
        if isinstance(m, torch.nn.Linear):
            if name.endswith("_proj") or ".qkv" in name:
                std = d**-0.5
            elif ".fc1" in name:
                std = (2 * d) ** -0.5
            else:
                std = d**-0.5 * (2 * depth) ** -0.5
            torch.nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    torch.nn.init.normal_(model.token_embed.weight, std=0.02)
    if model.document_embed is not None:
        torch.nn.init.normal_(model.document_embed.weight, std=0.02)
    torch.nn.init.normal_(model.cls_token, std=0.02)
    if isinstance(model.pos_embed, torch.nn.Parameter):
        torch.nn.init.trunc_normal_(model.pos_embed, std=0.02)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(model.config.logit_scale_init))
    if model.fusion is not None:
        model.fusion.reset_parameters()


@pytest.mark.parametrize("share", ["qkv", "attention", "all", "none"])
@pytest.mark.parametrize("image_pos", ["sincos", "learned"])
def test_parameter_roles_equal_the_old_name_rules(share, image_pos):
    from mmformer.training.optim import parameter_groups

    for expert, fusion in ((False, False), (True, False), (False, True), (True, True)):
        m = MMFormer(ModelConfig(**SMALL, share=share, image_pos=image_pos))
        if expert:
            m.enable_document_expert()
        if fusion:
            m.enable_fusion(4)
        params = dict(m.named_parameters())
        roles = m.parameter_roles()
        assert set(roles) == set(params)
        assert {n for n, r in roles.items() if r == "text"} == {n for n in params if old_is_text_only(n)}
        assert {n for n, r in roles.items() if r == "document"} == {n for n in params if old_is_document_expert(n)}
        assert {n for n, r in roles.items() if r == "fusion"} == {n for n in params if n.startswith("fusion.")}
        assert {n for n, r in roles.items() if r == "shared"} == {"logit_scale"} | {
            n
            for n in params
            if n.startswith("blocks.")
            and n.split(".")[2] in ("attn", "mlp")
            and n.split(".")[-2] not in ("image", "text", "document")
            and n.split(".")[-3] not in ("image", "text", "document")
        }
        assert all(
            r == "image"
            for n, r in roles.items()
            if n.startswith(("patch_embed.", "cls_token", "pos_embed", "norm_pre.", "image_proj.", "norm.image."))
        )
        decay, no_decay = parameter_groups(m)
        names = {id(p): n for n, p in params.items()}
        assert {names[id(p)] for p in no_decay} == {n for n, p in params.items() if old_no_decay(n, p)}
        assert len(decay) + len(no_decay) == len(params)
        # initialisation by role draws the same weights as the old initialisation by name
        torch.manual_seed(7)
        m.reset_parameters()
        new = {k: v.clone() for k, v in m.state_dict().items()}
        torch.manual_seed(7)
        old_reset_parameters(m)
        assert all(torch.equal(new[k], v) for k, v in m.state_dict().items())


def test_eval_mode_restores_every_submodule_flag_even_on_error():
    from mmformer.model import eval_mode

    m = MMFormer(ModelConfig(**SMALL)).train()
    m.blocks[1].eval()  # e.g. a frozen part kept in eval mode while the rest trains
    before = {name: mod.training for name, mod in m.named_modules()}
    with eval_mode(m) as inside:
        assert inside is m and not any(mod.training for mod in m.modules())
    assert {name: mod.training for name, mod in m.named_modules()} == before
    with pytest.raises(RuntimeError, match="boom"), eval_mode(m):
        raise RuntimeError("boom")
    assert {name: mod.training for name, mod in m.named_modules()} == before


def test_fingerprint_is_the_one_the_code_before_retiring_extra_gave():
    """Indexes record the model fingerprint; dropping ModelConfig.extra must not change it.
    The value was printed by model_fingerprint at 227686d for these deterministic weights."""
    from mmformer.model import model_fingerprint

    m = MMFormer(
        ModelConfig(
            width=32, depth=1, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16
        )
    )
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / (p.numel() + i + 1))
    assert model_fingerprint(m) == "d54e460b2a682649"


# ---- images as people have them; inference mode in eval ------------------------------------------
def _picture(size=(30, 22), rgb=(200, 30, 40)):
    """A PIL picture of another size than the model's, with a square of a second colour."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, rgb)
    ImageDraw.Draw(im).rectangle((4, 4, 14, 12), fill=(20, 200, 60))
    return im


def test_encode_image_takes_pil_paths_bytes_and_lists_as_the_tensor_path(tmp_path):
    import io

    from PIL import Image

    m = MMFormer(ModelConfig(**SMALL)).eval()
    pics = [_picture(), _picture((17, 40), (10, 10, 240))]
    ref = m.encode_image(torch.stack([m.preprocess(p) for p in pics]))  # the tensor fast path
    assert ref.shape == (2, SMALL["embed_dim"])
    paths = []
    for i, p in enumerate(pics):
        paths.append(tmp_path / f"p{i}.png")
        p.save(paths[-1])
    encoded = []
    for p in pics:
        buf = io.BytesIO()
        p.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    rgba = pics[0].convert("RGBA")  # converted to RGB as load_image does
    for got in (
        m.encode_image(pics),
        m.encode_images(pics),
        m.encode_image([str(q) for q in paths]),
        m.encode_image(paths),
        m.encode_image(encoded),
        m.encode_image([pics[0], paths[1]]),
        m.encode_image([m.preprocess(pics[0]), encoded[1]]),
    ):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    for one in (pics[0], str(paths[0]), paths[0], encoded[0], bytearray(encoded[0]), rgba):
        torch.testing.assert_close(m.encode_image(one), ref[:1], atol=1e-6, rtol=0)
    assert isinstance(m.preprocess(pics[0]), torch.Tensor) and m.preprocess(pics[0]).shape == (3, 16, 16)
    with pytest.raises(
        TypeError,
        match=r"images\[1\]: expected a PIL image, a path, encoded bytes or a tensor, "
        r"got int",
    ):
        m.encode_image([pics[0], 3])
    with pytest.raises(ValueError, match="empty list of images"):
        m.encode_image([])
    with pytest.raises(ValueError, match=r"missing\.png.*file not found"):
        m.encode_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"images\[0\] \(bytes\).*cannot decode"):
        m.encode_image(b"not an image")
    assert Image.open(paths[0]).size == (30, 22)


def test_encode_text_takes_strings_as_encode_texts():
    tok = Tokenizer.train(["a red square", "a blue circle", "green"] * 5, vocab_size=30)
    m = MMFormer(ModelConfig(**{**SMALL, "vocab_size": 64}), tok).eval()
    texts = ["a red square", "a blue circle"]
    ids, mask = tok(texts, max_length=SMALL["context_length"])
    ref = m.encode_text(ids, mask)
    torch.testing.assert_close(m.encode_text(texts), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(m.encode_text("a red square"), ref[:1], atol=1e-6, rtol=0)
    torch.testing.assert_close(m.encode_texts(texts), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pass no attention_mask"):
        m.encode_text(texts, mask)


def test_encode_calls_record_no_graph_in_eval_and_keep_gradients_in_train():
    from mmformer.model import eval_mode

    tok = Tokenizer.train(["a red square", "a blue circle", "green"] * 5, vocab_size=30)
    m = MMFormer(ModelConfig(**{**SMALL, "vocab_size": 64}), tok)
    x = torch.randn(2, 3, 16, 16)
    ids, mask = tok(["a red square", "green"], max_length=SMALL["context_length"])
    m.eval()
    outs = [
        m.encode_image(x),
        m.encode_text(ids, mask),
        m.encode_texts(["a red square"]),
        m.encode_document(["a red square and a blue circle"], mode="mean"),
    ]
    for out in outs:
        assert not out.requires_grad and out.grad_fn is None
        assert not out.is_inference()  # an ordinary tensor: usable in a later autograd computation
    probe = torch.nn.Linear(outs[0].shape[1], 2)
    probe(outs[0]).sum().backward()  # a probe trained on eval-mode embeddings
    assert probe.weight.grad is not None
    with torch.inference_mode():  # inside inference mode already: nothing changes
        assert m.encode_image(x).is_inference()
    m.train()
    for out in (m.encode_image(x), m.encode_text(ids, mask), m.encode_document(["a red square"], mode="mean")):
        assert out.requires_grad and out.grad_fn is not None
    with eval_mode(m):
        assert not m.encode_image(x).requires_grad
        out = m(x, ids, mask)  # the training call keeps its graph in eval mode (losses of an eval-mode model)
        assert out["image_embeds"].requires_grad and out["text_embeds"].requires_grad
        out["image_embeds"].sum().backward()
    assert m.patch_embed.proj.weight.grad is not None
    m.eval()
    m.inference_in_eval = False
    assert m.encode_image(x).requires_grad
