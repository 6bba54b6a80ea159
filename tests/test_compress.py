"""int8 quantization through torchao and torch.ao: closeness to fp32 on the bundled data, the
torchao path on its own (torch.ao's deprecated API made to fail), the auto fallback, fingerprints
shared with the float model (indexes built with either are searched with the other), compile."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import mmformer.compress.int8 as int8
from mmformer.compress import available_backends, int8_linear_bytes, quantize_int8
from mmformer.config import ModelConfig
from mmformer.model import MMFormer, model_fingerprint
from mmformer.retrieval import Retriever, build_index
from mmformer.tokenizer import Tokenizer, default_tokenizer_path

pytest.importorskip("torchao")
COSINE_MIN = 0.99  # per row, int8 vs fp32 unit embeddings


@pytest.fixture(scope="module")
def emoji():
    from mmformer.data.emoji import InMemoryImageText

    torch.manual_seed(0)
    tok = Tokenizer.load(default_tokenizer_path())
    model = MMFormer(ModelConfig(vocab_size=tok.vocab_size), tok).eval()  # the tiny preset
    ds = InMemoryImageText.eval_split("test", 64)
    return model, ds.stacked_images()[:96], ds.captions[:96]


@pytest.fixture()
def no_torch_ao(monkeypatch):
    """torch.ao's deprecated quantize_dynamic gone, as in a future torch."""
    import torch.ao.quantization

    def removed(*args, **kwargs):
        raise NotImplementedError("torch.ao.quantization.quantize_dynamic was removed")

    monkeypatch.setattr(torch.ao.quantization, "quantize_dynamic", removed)


def _min_cosines(model, q, images, captions):
    with torch.inference_mode():
        cos_i = (model.encode_image(images) * q.encode_image(images)).sum(-1)
        cos_t = (model.encode_texts(captions) * q.encode_texts(captions)).sum(-1)
    return cos_i.min().item(), cos_t.min().item()


def test_both_backends_are_available_here():
    assert set(available_backends()) == {"torchao", "torch.ao"}
    assert int8.default_backend() in ("torchao", "torch.ao")


@pytest.mark.parametrize("backend", ["torchao", "torch.ao"])
def test_int8_embeddings_stay_close_to_fp32(emoji, backend, one_thread):
    model, images, captions = emoji
    q = quantize_int8(model, backend=backend)
    assert q is not model and q.is_int8 and q.int8_backend == backend and not getattr(model, "is_int8", False)
    assert all(
        isinstance(m.weight, torch.Tensor) and m.weight.dtype == torch.float32
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )  # the float model is untouched
    cos_i, cos_t = _min_cosines(model, q, images, captions)
    assert cos_i > COSINE_MIN and cos_t > COSINE_MIN
    (fb, n), (qb, nq) = int8_linear_bytes(model), int8_linear_bytes(q)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert n == nq == n_linear == int8.count_int8_linears(q) >= 23 and fb / qb > 3.5
    assert model_fingerprint(q) == model_fingerprint(model)


def test_torchao_path_works_without_torch_ao(emoji, no_torch_ao, caplog, one_thread):
    model, images, captions = emoji
    with pytest.raises(NotImplementedError, match="removed"):
        quantize_int8(model, backend="torch.ao")  # an explicit backend does not fall back
    with caplog.at_level(logging.WARNING, logger="mmformer.compress.int8"):
        q = quantize_int8(model)  # auto
    assert q.int8_backend == "torchao" and int8.count_int8_linears(q) >= 23
    if int8.default_backend() == "torch.ao":
        assert "falling back to torchao" in caplog.text
    cos_i, cos_t = _min_cosines(model, q, images, captions)
    assert cos_i > COSINE_MIN and cos_t > COSINE_MIN
    assert model_fingerprint(q) == model_fingerprint(model) and q.source_fingerprint == model_fingerprint(model)


def test_auto_falls_back_to_torch_ao_when_torchao_fails(emoji, monkeypatch):
    model, _, _ = emoji
    monkeypatch.setattr(int8, "default_backend", lambda: "torchao")
    monkeypatch.setattr(int8, "_torchao_api", lambda: None)  # torchao not installed
    q = quantize_int8(model)
    assert q.int8_backend == "torch.ao" and int8.count_int8_linears(q) >= 23
    with pytest.raises(ImportError, match="torchao"):
        quantize_int8(model, backend="torchao")
    with pytest.raises(ValueError, match="expected one of"):
        quantize_int8(model, backend="fbgemm")


def test_inplace_and_idempotent(emoji):
    model, _, _ = emoji
    copy = MMFormer(model.config, model.tokenizer).eval()
    copy.load_state_dict(model.state_dict())
    q = quantize_int8(copy, inplace=True, backend="torchao")
    assert q is copy and quantize_int8(q) is q and not any(p.requires_grad for p in q.parameters())


def test_compiled_trunk_equals_eager(emoji, one_thread):
    model, images, captions = emoji
    q = quantize_int8(model, backend="torchao")
    # the 'eager' compile backend traces the trunk with dynamo (graph capture of the int8 weights,
    # both modalities, masks) without inductor's minutes of C++ compilation; see the slow test
    c = quantize_int8(model, backend="torchao", compile="eager")
    assert c.int8_compiled == "eager"
    with torch.inference_mode():
        torch.testing.assert_close(c.encode_image(images[:8]), q.encode_image(images[:8]), atol=1e-5, rtol=0)
        torch.testing.assert_close(c.encode_texts(captions[:8]), q.encode_texts(captions[:8]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_inductor_compiled_int8_is_close_to_fp32(emoji):
    model, images, captions = emoji
    c = quantize_int8(model, backend="torchao", compile=True)
    cos_i, cos_t = _min_cosines(model, c, images[:16], captions[:16])
    assert cos_i > COSINE_MIN and cos_t > COSINE_MIN


# ---- indexes: float and int8 (torchao) models share a fingerprint -----------------------------------
COLORS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (240, 230, 20),
    "black": (5, 5, 5),
    "white": (250, 250, 250),
}


@pytest.fixture()
def small_world(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.train([f"a {c} square" for c in COLORS] * 5, vocab_size=30)
    model = MMFormer(
        ModelConfig(
            width=32, depth=2, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16
        ),
        tok,
    ).eval()
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, rgb in COLORS.items():
        arr = np.clip(np.array(rgb)[None, None] + rng.integers(-15, 15, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{name}.png")
    return model, d


def test_indexes_of_float_and_torchao_int8_models_serve_each_other(small_world, tmp_path, no_torch_ao):
    pytest.importorskip("faiss")
    model, images = small_world
    q = quantize_int8(model, backend="torchao")
    built_float = build_index(model, images, tmp_path / "float", progress=False)
    built_int8 = build_index(q, images, tmp_path / "int8", progress=False)  # the Lightning predict path
    assert built_int8.manifest["model"]["int8"] and built_int8.fingerprint == built_float.fingerprint
    np.testing.assert_allclose(np.asarray(built_int8.embeddings), np.asarray(built_float.embeddings), atol=0.05)
    files = sorted(images.glob("*.png"))
    for searcher, index in ((q, built_float), (model, built_int8)):
        hits = Retriever(searcher, index).search_image([files[2]], k=1)[0]
        assert hits[0].id == files[2].name and hits[0].score > 0.98
