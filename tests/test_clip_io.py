"""``mmformer import`` / ``mmformer export --open-clip``: CLIP checkpoints in and out from the command line."""

from __future__ import annotations

import pytest
import torch

from mmformer.cli import run
from mmformer.model import MMFormer

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def peer_file(tmp_path_factory):
    torch.manual_seed(0)
    peer = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("peer") / "vit-b-32.pt"
    torch.save(peer.state_dict(), path)
    return peer, path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_import_then_export_round_trips_through_open_clip(peer_file, tmp_path, capsys, suffix):
    peer, weights = peer_file
    assert run(["import", "--open-clip", "ViT-B-32", "--weights", str(weights), "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'm'}"
    model = MMFormer.from_pretrained(tmp_path / "m").eval()
    out = tmp_path / f"back{suffix}"
    assert run(["export", "--model", str(tmp_path / "m"), "--open-clip", str(out)]) == 0
    back = open_clip.create_model("ViT-B-32", pretrained=str(out)).eval()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 224, 224)
    texts = ["a photo of a cat", "a diagram"]
    ids = open_clip.get_tokenizer("ViT-B-32")(texts)
    with torch.no_grad():
        for a, b in (
            (back.encode_image(images, normalize=True), peer.encode_image(images, normalize=True)),
            (back.encode_text(ids, normalize=True), peer.encode_text(ids, normalize=True)),
            (model.encode_texts(texts), peer.encode_text(ids, normalize=True)),
        ):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    own, other = peer.state_dict(), back.state_dict()
    assert all(torch.equal(own[k], other[k]) for k in own)


def test_import_errors_are_one_line(peer_file, tmp_path, capsys):
    _, weights = peer_file
    assert run(["import", "--open-clip", "ViT-B-32", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "mmformer import: open_clip ViT-B-32: needs the weights file (--weights FILE)"
    assert run(["import", "--open-clip", "ViT-B-16", "--weights", str(weights), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmformer import: {weights} does not fit this model") and "\n" not in err
    assert not (tmp_path / "m").exists()  # nothing half-written
    assert run(["import", "--hf-clip", str(tmp_path), "--out", str(tmp_path / "m")]) == 1
    assert "expected a Hugging Face CLIP directory" in capsys.readouterr().err


def test_export_refuses_a_model_open_clip_cannot_hold(tmp_path, capsys):
    from mmformer.config import ModelConfig

    MMFormer(
        ModelConfig(
            width=32, depth=1, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16
        )
    ).save_pretrained(tmp_path / "m")
    assert run(["export", "--model", str(tmp_path / "m"), "--open-clip", str(tmp_path / "x.pt")]) == 1
    assert "open_clip export needs a CLIP-shaped model (share='none'" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_hf_clip_directory_imports_from_the_command_line(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=8,
            eos_token_id=99,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    peer = transformers.CLIPModel(cfg).eval()
    peer.save_pretrained(tmp_path / "hf")
    assert run(["import", "--hf-clip", str(tmp_path / "hf"), "--out", str(tmp_path / "m")]) == 0
    model = MMFormer.from_pretrained(tmp_path / "m").eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = peer.get_image_features(pixel_values=images)
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
        torch.testing.assert_close(
            model.encode_image(images), torch.nn.functional.normalize(want, dim=-1), atol=1e-5, rtol=0
        )
    assert model.tokenizer is None  # not CLIP's vocabulary: no tokenizer is attached
