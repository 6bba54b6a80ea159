"""ONNX export (`mmformer export --onnx`): both encoder graphs against PyTorch with onnxruntime
(fp32 within 1e-4, any batch and text length), the onnxruntime int8 copies close to fp32 (cosine
> 0.99 per row) and ~4x smaller, the folder's manifest, and the refusals."""

import json

import numpy as np
import pytest
import torch

from mmformer.cli import main
from mmformer.compress import quantize_int8
from mmformer.config import ModelConfig
from mmformer.model import MMFormer, model_fingerprint
from mmformer.tokenizer import Tokenizer, default_tokenizer_path

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from mmformer.compress.onnx import OnnxEncoder, export_onnx  # noqa: E402

ATOL = 1e-4  # fp32 graph vs PyTorch, every embedding entry
COSINE_MIN = 0.99  # int8 graph vs PyTorch fp32, per row


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from mmformer.data.emoji import InMemoryImageText

    torch.manual_seed(0)
    tok = Tokenizer.load(default_tokenizer_path())
    model = MMFormer(ModelConfig(vocab_size=tok.vocab_size), tok).eval()  # the tiny preset
    tmp = tmp_path_factory.mktemp("onnx")
    model.save_pretrained(tmp / "model")
    assert main(["export", "--model", str(tmp / "model"), "--onnx", str(tmp / "onnx")]) == 0
    ds = InMemoryImageText.eval_split("test", 64)
    return model, tmp / "onnx", ds.stacked_images()[:37], ds.captions[:37]


def test_folder_holds_graphs_config_tokenizer_and_manifest(exported):
    model, out, _, _ = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "image.onnx",
        "text.onnx",
        "image.int8.onnx",
        "text.int8.onnx",
        "config.json",
        "tokenizer.model",
        "onnx.json",
    } <= names and not [n for n in names if n.startswith(".")]
    man = json.loads((out / "onnx.json").read_text())
    assert man["fingerprint"] == model_fingerprint(model) and man["opset"] >= 17
    assert man["parity"]["image_fp32_max_abs_diff"] < ATOL and man["parity"]["text_int8_min_cosine"] > COSINE_MIN
    assert ModelConfig.from_json(out / "config.json") == model.config
    for name, inputs in (("image.onnx", ["images"]), ("text.onnx", ["input_ids", "attention_mask"])):
        g = onnx.load(str(out / name)).graph
        assert [i.name for i in g.input] == inputs and [o.name for o in g.output] == ["embeddings"]
        dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input]
        assert all(d[0] == "batch" for d in dims)  # dynamic batch
        if name == "text.onnx":
            assert all(d[1:] == ["length"] for d in dims)  # dynamic text length
        else:
            assert dims[0][1:] == [3, 64, 64]


@pytest.mark.parametrize("batch", [1, 37])
def test_fp32_graphs_equal_pytorch(exported, batch):
    model, out, images, captions = exported
    enc = OnnxEncoder(out)
    with torch.inference_mode():
        ref_i = model.encode_image(images[:batch]).numpy()
        ids, mask = model.tokenizer(captions[:batch], max_length=model.config.context_length)
        ref_t = model.encode_text(ids, mask).numpy()
    np.testing.assert_allclose(enc.encode_image(images[:batch].numpy()), ref_i, atol=ATOL, rtol=0)
    np.testing.assert_allclose(enc.encode_text(ids.numpy(), mask.numpy()), ref_t, atol=ATOL, rtol=0)
    np.testing.assert_allclose(enc.encode_texts(captions[:batch]), ref_t, atol=ATOL, rtol=0)


def test_text_graph_handles_every_length_and_padding(exported):
    model, out, _, _ = exported
    enc = OnnxEncoder(out)
    texts = ["a", "red apple", "a smiling face with heart eyes and a red apple on a plate " * 3]
    for max_length in (3, 7, model.config.context_length):
        ids, mask = model.tokenizer(texts, max_length=max_length)
        with torch.inference_mode():
            ref = model.encode_text(ids, mask).numpy()
        np.testing.assert_allclose(enc.encode_text(ids.numpy(), mask.numpy()), ref, atol=ATOL, rtol=0)
    # padding is masked: a text alone equals the same text padded in a batch
    alone = enc.encode_texts(["a"])
    np.testing.assert_allclose(alone[0], enc.encode_texts(texts)[0], atol=ATOL, rtol=0)


def test_int8_graphs_are_close_and_smaller(exported):
    model, out, images, captions = exported
    enc = OnnxEncoder(out, int8=True)
    with torch.inference_mode():
        ref_i = model.encode_image(images).numpy()
        ref_t = model.encode_texts(captions).numpy()
    assert (enc.encode_image(images.numpy()) * ref_i).sum(-1).min() > COSINE_MIN
    assert (enc.encode_texts(captions) * ref_t).sum(-1).min() > COSINE_MIN
    for name in ("image", "text"):
        assert (out / f"{name}.int8.onnx").stat().st_size < 0.4 * (out / f"{name}.onnx").stat().st_size


def test_export_refuses_what_it_cannot_export(exported, tmp_path):
    model, out, _, _ = exported
    with pytest.raises(ValueError, match="float model"):
        export_onnx(quantize_int8(model), tmp_path / "x")
    sparse = MMFormer(model.config, model.tokenizer)
    sparse.set_text_attention("local", window=2)
    with pytest.raises(ValueError, match="dense text attention"):
        export_onnx(sparse, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="missing"):
        OnnxEncoder(tmp_path)
    with pytest.raises(SystemExit, match="--ckpt"):
        main(["export", "--onnx", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--model needs --onnx"):
        main(["export", "--model", str(out)])


def test_export_from_a_lightning_checkpoint(tmp_path):
    import lightning as L

    from mmformer.training.module import MMFormerModule

    module = MMFormerModule(preset="tiny", model_config=dict(width=32, depth=1, heads=2, embed_dim=16))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--onnx", str(tmp_path / "onnx"), "--no-int8"]) == 0
    assert not (tmp_path / "onnx" / "image.int8.onnx").exists()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = module.model.eval().encode_image(x).numpy()
    np.testing.assert_allclose(OnnxEncoder(tmp_path / "onnx").encode_image(x.numpy()), ref, atol=ATOL, rtol=0)
