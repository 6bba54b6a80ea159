"""`mmformer eval`, `export` and `tokenizer` end to end on small files."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmformer.cli import main
from mmformer.config import ModelConfig
from mmformer.data.transforms import build_transforms, load_image
from mmformer.model import MMFormer
from mmformer.tokenizer import Tokenizer

WORDS = ["red", "green", "blue", "yellow", "black", "white"]


@pytest.fixture()
def gallery(tmp_path):
    """Six solid-colour images with two captions each, a JSONL manifest and a saved tiny model."""
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 0, 0), (255, 255, 255)]
    rows = []
    for word, rgb in zip(WORDS, colors):
        Image.new("RGB", (20, 20), rgb).save(tmp_path / f"{word}.png")
        rows += [
            {"image": f"{word}.png", "caption": f"a {word} square"},
            {"image": f"{word}.png", "caption": f"{word}"},
        ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    tok = Tokenizer.train([r["caption"] for r in rows] * 5, vocab_size=40)
    cfg = ModelConfig(
        width=32, depth=2, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16
    )
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
    i2t_ranks = [
        min(1 + int((sims[:, j] > sims[i, j]).sum()) for i in range(len(rows)) if owner[i] == j) for j in range(6)
    ]
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
    rows = [
        {"name": "red apple", "keywords": ["fruit", "red"], "split": "train"},
        {"name": "secret", "keywords": ["hidden"], "split": "val"},
    ] * 20
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(
        [
            "tokenizer",
            "--input",
            str(tmp_path / "c.jsonl"),
            "--fields",
            "name,keywords",
            "--split",
            "train",
            "--vocab-size",
            "30",
            "--out",
            str(tmp_path / "t.model"),
        ]
    )
    tok = Tokenizer.load(tmp_path / "t.model")
    assert tok.decode(tok.encode("red apple fruit")) == "red apple fruit"
    pieces = set(tok.sp.id_to_piece(i) for i in range(tok.vocab_size))
    assert "▁secret" not in pieces and "▁hidden" not in pieces  # val rows were left out
    with pytest.raises(ValueError, match="has no field"):
        main(["tokenizer", "--input", str(tmp_path / "c.jsonl"), "--fields", "caption", "--out", "x"])


def test_export_writes_a_loadable_directory(tmp_path):
    from mmformer.training.module import MMFormerModule
    from mmformer.training.trainer import make_trainer

    module = MMFormerModule(preset="tiny", model_config=dict(width=32, depth=1, heads=2, embed_dim=16))
    trainer = make_trainer(max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "out")]) == 0
    loaded = MMFormer.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.encode_image(x), module.model.eval().encode_image(x))


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def longdoc_setup(tmp_path):
    """A saved small model (16 px images, 12-token windows) with a tokenizer trained here, a tiny
    emoji layout and a prose file."""
    from test_data import CONCEPTS, make_emoji_layout

    prose = "In the beginning God created the heaven and the earth. And the earth was without form, and void. "
    (tmp_path / "prose.txt").write_text(prose * 20, encoding="utf-8")
    make_emoji_layout(tmp_path / "emoji")
    torch.manual_seed(0)
    tok = Tokenizer.train([prose] * 5 + [c["name"] for c in CONCEPTS] * 5, vocab_size=60)
    cfg = ModelConfig(
        width=32,
        depth=2,
        heads=4,
        image_size=16,
        patch_size=8,
        context_length=12,
        embed_dim=24,
        vocab_size=tok.vocab_size,
    )
    MMFormer(cfg, tok).save_pretrained(tmp_path / "base")
    return tmp_path


def longdoc_args(tmp: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "train" / "longdoc-stage1.yaml"),
        "--trainer.max_steps",
        "3",
        "--trainer.max_time",
        "null",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp / "run"),
        "--model.pretrained",
        str(tmp / "base"),
        "--model.export_dir",
        str(tmp / "out"),
        "--model.fusion_latents",
        "4",
        "--data.root",
        str(tmp / "emoji"),
        "--data.prose",
        str(tmp / "prose.txt"),
        "--data.lengths",
        "[1, 40]",
        "--data.val_length",
        "40",
        "--data.batch_size",
        "4",
        *extra,
    ]


def test_fit_runs_the_long_document_recipe_with_clean_output(longdoc_setup):
    """`mmformer fit --config train/longdoc-stage1.yaml` (the long-document stage on the one command
    line) trains and exports; the data module got the model's 16 px images through the link (the
    recipe says nothing about sizes); every printed line appears once, with no third-party tips or
    warnings."""
    import subprocess
    import sys

    tmp = longdoc_setup
    proc = subprocess.run(
        [sys.executable, "-m", "mmformer.cli", "fit", *longdoc_args(tmp)],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    out_model = MMFormer.from_pretrained(tmp / "out")
    assert out_model.config.document_expert and out_model.config.chunk_stride == 7  # the recipe's
    assert out_model.config.fusion_latents == 4 and out_model.config.image_size == 16
    metrics = (tmp / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/samples_per_s" in metrics.splitlines()[0] and "train/distill" in metrics.splitlines()[0]
    # nothing printed twice (rules of dashes repeat inside Lightning's model summary table)
    lines = [line for line in out.splitlines() if line.strip() and set(line.strip()) != {"-"}]
    assert lines and len(lines) == len(set(lines)), out
    assert "Tip" not in out and "litlogger" not in out, out
    assert "site-packages" not in out, out  # no third-party warnings (they name their file)


def test_linked_data_settings_come_from_the_model_and_refuse_other_values(longdoc_setup):
    from mmformer.training.datamodule import ImageTextDataModule, NeedleDataModule
    from mmformer.training.longdoc import LongDocModule
    from mmformer.training.recipes import RecipeCLI

    tmp = longdoc_setup
    cli = RecipeCLI(
        ["--config", str(REPO / "train" / "longdoc-stage1.yaml"), "--model.pretrained", str(tmp / "base")], run=False
    )
    assert isinstance(cli.model, LongDocModule) and isinstance(cli.datamodule, NeedleDataModule)
    assert cli.datamodule.hparams.image_size == 16 and cli.model.hparams.lr == 1e-3
    with pytest.raises(ValueError, match=r"data.image_size=32 but the model has 16: image_size is linked"):
        RecipeCLI(
            [
                "--config",
                str(REPO / "train" / "longdoc-stage1.yaml"),
                "--model.pretrained",
                str(tmp / "base"),
                "--data.image_size",
                "32",
            ],
            run=False,
        )
    # the image-text recipe by its shipped name, with a model override: the data follows the model
    cli = RecipeCLI(
        [
            "--config",
            "tiny-cpu",
            "--model.model_config",
            "{image_size: 32, context_length: 8}",
            "--model.model_config.width",
            "32",
        ],
        run=False,
    )
    assert isinstance(cli.datamodule, ImageTextDataModule)
    hp = cli.datamodule.hparams
    assert (hp.image_size, hp.max_length, tuple(hp.image_mean)) == (32, 8, (0.5, 0.5, 0.5))


def test_recipes_written_without_class_path_still_load(tmp_path):
    """A recipe in the format before subclass mode (init arguments directly under model/data,
    sizes repeated) loads with MMFormerModule and ImageTextDataModule."""
    from mmformer.training.datamodule import ImageTextDataModule
    from mmformer.training.module import MMFormerModule
    from mmformer.training.recipes import RecipeCLI

    (tmp_path / "old.yaml").write_text(
        "model:\n  preset: tiny\n  lr: 3.0e-3\n  model_config: {width: 32, depth: 1, "
        "heads: 2, embed_dim: 16}\ndata:\n  image_size: 64\n  batch_size: 8\n"
        "  max_length: 16\n"
    )
    cli = RecipeCLI(["--config", str(tmp_path / "old.yaml")], run=False)
    assert type(cli.model) is MMFormerModule and type(cli.datamodule) is ImageTextDataModule
    assert cli.model.hparams.lr == 3e-3 and cli.datamodule.hparams.batch_size == 8
