"""`mmformer eval`, `export` and `tokenizer` end to end on small files."""

import json

import pytest
import torch
from PIL import Image

from mmformer.cli import main
from mmformer.config import ModelConfig
from mmformer.model import MMFormer
from mmformer.tokenizer import Tokenizer
from mmformer.data.transforms import build_transforms, load_image

WORDS = ["red", "green", "blue", "yellow", "black", "white"]


@pytest.fixture()
def gallery(tmp_path):
    """Six solid-colour images with two captions each, a JSONL manifest and a saved tiny model."""
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 0, 0), (255, 255, 255)]
    rows = []
    for word, rgb in zip(WORDS, colors):
        Image.new("RGB", (20, 20), rgb).save(tmp_path / f"{word}.png")
        rows += [{"image": f"{word}.png", "caption": f"a {word} square"},
                 {"image": f"{word}.png", "caption": f"{word}"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    tok = Tokenizer.train([r["caption"] for r in rows] * 5, vocab_size=40)
    cfg = ModelConfig(width=32, depth=2, heads=4, image_size=16, patch_size=8, vocab_size=64,
                      context_length=8, embed_dim=16)
    MMFormer(cfg, tok).save_pretrained(tmp_path / "model")
    return tmp_path, rows


def test_eval_prints_the_brute_force_numbers(gallery, capsys):
    tmp, rows = gallery
    assert main(["eval", "--model", str(tmp / "model"), "--data", str(tmp / "m.jsonl"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # brute force: embed each image and caption one at a time, rank by hand
    model = MMFormer.from_pretrained(tmp / "model").eval()
    tf = build_transforms(16, train=False)
    with torch.no_grad():
        img = torch.cat([model.encode_image(tf(load_image(tmp / f"{w}.png"))[None]) for w in WORDS])
        txt = torch.cat([model.encode_texts([r["caption"]]) for r in rows])
    sims = txt @ img.T  # (12 captions, 6 images)
    owner = [WORDS.index(r["image"][:-4]) for r in rows]
    t2i_ranks = [1 + int((sims[i] > sims[i, owner[i]]).sum()) for i in range(len(rows))]
    i2t_ranks = [min(1 + int((sims[:, j] > sims[i, j]).sum()) for i in range(len(rows)) if owner[i] == j)
                 for j in range(6)]
    for k in (1, 5, 10):
        assert got[f"t2i_R@{k}"] == pytest.approx(100 * sum(r <= k for r in t2i_ranks) / 12)
        assert got[f"i2t_R@{k}"] == pytest.approx(100 * sum(r <= k for r in i2t_ranks) / 6)
    assert got["t2i_mean_rank"] == pytest.approx(sum(t2i_ranks) / 12)
    assert got["n_images"] == 6 and got["n_texts"] == 12


def test_eval_table_and_missing_model(gallery, capsys):
    tmp, _ = gallery
    main(["eval", "--model", str(tmp / "model"), "--data", str(tmp / "m.jsonl")])
    out = capsys.readouterr().out
    assert "text->image" in out and "image->text" in out and "chance R@1" in out
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        main(["eval", "--model", str(tmp), "--data", str(tmp / "m.jsonl")])


def test_tokenizer_command_reads_jsonl_fields(tmp_path, capsys):
    rows = [{"name": "red apple", "keywords": ["fruit", "red"], "split": "train"},
            {"name": "secret", "keywords": ["hidden"], "split": "val"}] * 20
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["tokenizer", "--input", str(tmp_path / "c.jsonl"), "--fields", "name,keywords",
          "--split", "train", "--vocab-size", "30", "--out", str(tmp_path / "t.model")])
    tok = Tokenizer.load(tmp_path / "t.model")
    assert tok.decode(tok.encode("red apple fruit")) == "red apple fruit"
    pieces = set(tok.sp.id_to_piece(i) for i in range(tok.vocab_size))
    assert "▁secret" not in pieces and "▁hidden" not in pieces  # val rows were left out
    with pytest.raises(SystemExit, match="has no field"):
        main(["tokenizer", "--input", str(tmp_path / "c.jsonl"), "--fields", "caption", "--out", "x"])


def test_export_writes_a_loadable_directory(tmp_path):
    import lightning as L

    from mmformer.training.module import MMFormerModule

    module = MMFormerModule(preset="tiny", model_config=dict(width=32, depth=1, heads=2, embed_dim=16))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "out")]) == 0
    loaded = MMFormer.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.encode_image(x), module.model.eval().encode_image(x))
