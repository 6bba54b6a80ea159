"""A user's first hour with their own pictures: a folder of images and a CSV / JSONL manifest ->
``mmformer fit --config own-data`` (a validation split held out, the model folder written) -> ``eval``
-> ``index build`` -> ``search`` -> ``serve``, each through the command line, at tiny size; and the
held-out split and the few-batches warning of the data module on their own."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mmformer.cli import main
from mmformer.model import MMFormer, model_fingerprint
from mmformer.retrieval import retrieval_metrics
from mmformer.tokenizer import Tokenizer, default_tokenizer_path
from mmformer.training.datamodule import MIN_BATCHES_PER_EPOCH, ImageTextDataModule

REPO = Path(__file__).resolve().parent.parent
COLORS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (240, 230, 20),
    "purple": (140, 30, 160),
    "orange": (250, 140, 10),
}
SHAPES = ("square", "circle")


def write_pictures(root: Path) -> list[dict[str, str]]:
    """24 PNGs (6 colours x 2 shapes x 2 variants, of two sizes) under root/pictures, and their rows."""
    rows = []
    (root / "pictures").mkdir(parents=True)
    for name, rgb in COLORS.items():
        for shape in SHAPES:
            for v in range(2):
                im = Image.new("RGB", (48 + 16 * v, 48), "white")
                box = (6 + 4 * v, 6, 40 + 4 * v, 40)
                (ImageDraw.Draw(im).rectangle if shape == "square" else ImageDraw.Draw(im).ellipse)(box, fill=rgb)
                rel = f"pictures/{name}-{shape}-{v}.png"
                im.save(root / rel)
                rows.append({"image": rel, "caption": f"a {name} {shape}", "concept": f"{name} {shape}"})
    return rows


def write_manifests(root: Path, rows: list[dict[str, str]]) -> tuple[Path, Path]:
    """m.csv (image, caption, concept) and m.jsonl (image, caption)."""
    with open(root / "m.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "concept"])
        w.writeheader()
        w.writerows(rows)
    (root / "m.jsonl").write_text(
        "".join(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n" for r in rows), encoding="utf-8"
    )
    return root / "m.csv", root / "m.jsonl"


FAST = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--data.num_workers",
    "0",
    "--data.batch_size",
    "8",
    "--trainer.val_check_interval",
    "2",
    "--trainer.log_every_n_steps",
    "1",
]


def test_own_pictures_from_manifest_to_served_index(tmp_path, capsys, caplog):
    rows = write_pictures(tmp_path)
    csv_path, jsonl_path = write_manifests(tmp_path, rows)
    run = tmp_path / "run"

    # fit from scratch on the CSV: a tenth of the concepts held out, the few-batches warning, and at
    # the end the model folder, the checkpoints and the log under default_root_dir, printed
    with caplog.at_level(logging.WARNING, logger="mmformer"):
        assert (
            main(
                [
                    "fit",
                    "--config",
                    "own-data",
                    "--data.train_manifest",
                    str(csv_path),
                    "--trainer.default_root_dir",
                    str(run),
                    "--trainer.max_steps",
                    "4",
                    *FAST,
                ]
            )
            == 0
        )
    out, err = capsys.readouterr()
    assert "validation: 1 of 12 concepts (2 of 24 captions)" in err, err
    assert "by its 'concept' column" in err
    warned = [r.getMessage() for r in caplog.records if "batch(es) an epoch" in r.getMessage()]
    assert warned and "22 training samples at data.batch_size=8 make 2 batch(es) an epoch" in warned[0], warned
    assert "--data.batch_size 2" in warned[0]
    model_dir = run / "model"
    assert f"model: {model_dir} (config.json, model.safetensors, tokenizer.model)" in out, out
    assert f"checkpoints: last {run / 'logs' / 'version_0' / 'checkpoints' / 'last.ckpt'}" in out
    assert f"metrics: {run / 'logs' / 'version_0' / 'metrics.csv'}" in out
    with open(run / "logs" / "version_0" / "metrics.csv", encoding="utf-8") as f:
        logged = list(csv.DictReader(f))
    r1 = [float(r["val/t2i_R@1"]) for r in logged if r.get("val/t2i_R@1")]
    assert len(r1) == 2 and all(0 <= v <= 100 for v in r1)  # validated after steps 2 and 4: the monitor watched
    model = MMFormer.from_pretrained(model_dir).eval()
    assert model.config.depth == 2 and model.tokenizer is not None

    # from the saved model, on the JSONL (no concept column: whole images held out); no step taken,
    # so the folder written at the end holds the saved weights exactly
    # (the logs put elsewhere with --trainer.logger.init_args.save_dir alone, as before the recipes
    # stopped naming their logger)
    run2 = tmp_path / "run2"
    assert (
        main(
            [
                "fit",
                "--config",
                "own-data",
                "--data.train_manifest",
                str(jsonl_path),
                "--model.pretrained",
                str(model_dir),
                "--trainer.default_root_dir",
                str(run2),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "logs2"),
                "--trainer.max_steps",
                "0",
                *FAST,
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "validation: 2 of 24 images (2 of 24 captions)" in err, err
    assert f"metrics: {tmp_path / 'logs2' / 'logs' / 'version_0' / 'metrics.csv'}" in out, out
    assert model_fingerprint(MMFormer.from_pretrained(run2 / "model")) == model_fingerprint(model)

    # eval: the same numbers as the Python API on the same pictures (paths straight into encode_image)
    assert main(["eval", "--model", str(model_dir), "--data", str(csv_path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    images = model.encode_image([str(tmp_path / r["image"]) for r in rows])
    texts = model.encode_text([r["caption"] for r in rows])
    want = retrieval_metrics(images, texts, list(range(len(rows))))
    for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "t2i_mean_rank"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key

    # index build + search: the top hits are the Python API's
    index = tmp_path / "index"
    assert main(["index", "build", "--model", str(model_dir), "--images", str(csv_path), "--out", str(index)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["search", str(index), "a red square", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    scores = (model.encode_text("a red square") @ images.T)[0]
    assert [h["id"] for h in hits] == [rows[i]["image"] for i in scores.topk(3).indices.tolist()]
    assert [h["score"] for h in hits] == pytest.approx(scores.topk(3).values.tolist(), abs=1e-5)

    # serve: one HTTP search on 127.0.0.1 answers the same hits
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("grpc")
    from serve_helpers import free_port

    gport, hport = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MMFORMER_API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmformer.cli",
            "serve",
            "--model",
            str(model_dir),
            "--index",
            f"own={index}",
            "--grpc-port",
            str(gport),
            "--http-port",
            str(hport),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{hport}"
    try:
        end = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "mmformer serve did not become ready"
            time.sleep(0.2)
        answer = httpx.post(base + "/v1/search", json={"text": "a red square", "k": 3, "index": "own"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert [h["id"] for h in answer.json()["hits"]] == [h["id"] for h in hits]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the data module on its own ------------------------------------------------------------------
def data_module(manifest: Path, **kw) -> ImageTextDataModule:
    dm = ImageTextDataModule(train_manifest=str(manifest), image_size=16, max_length=8, **kw)
    dm.set_tokenizer(Tokenizer.load(default_tokenizer_path()))
    dm.setup("fit")
    return dm


def items(dataset) -> list[int]:
    return [int(i) for i in dataset.indices]


def test_validation_is_held_out_by_concept_or_by_image_and_never_overlaps(tmp_path):
    rows = write_pictures(tmp_path)
    csv_path, jsonl_path = write_manifests(tmp_path, rows)
    dm = data_module(csv_path, val_fraction=0.25)
    train, val = items(dm.train_dataset), items(dm.val_dataset)
    assert sorted(train + val) == list(range(24)) and len(val) == 6  # 3 of 12 concepts, 2 pictures each
    held = {rows[i]["concept"] for i in val}
    assert len(held) == 3 and not held & {rows[i]["concept"] for i in train}
    assert data_module(csv_path, val_fraction=0.25).val_dataset.indices == dm.val_dataset.indices  # seeded
    assert items(data_module(csv_path, val_fraction=0.25, seed=1).val_dataset) != val
    by_image = data_module(jsonl_path, val_fraction=0.25)  # no concept column: whole images
    val_images = {rows[i]["image"] for i in items(by_image.val_dataset)}
    assert len(val_images) == 6 and not val_images & {rows[i]["image"] for i in items(by_image.train_dataset)}
    batch = next(iter(dm.val_dataloader()))  # eval transform, pair ids for the retrieval metrics
    assert batch["images"].shape == (6, 3, 16, 16) and sorted(batch["image_ids"].tolist()) == sorted(
        dm.val_dataset.dataset.caption_to_image[val].tolist()
    )
    assert data_module(csv_path).val_dataset is None  # the data module's default: no split (the recipes set 0.1)
    assert data_module(csv_path, val_manifest=str(jsonl_path)).train_dataset.__class__.__name__ == "ImageTextManifest"
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1"):
        ImageTextDataModule(train_manifest=str(csv_path), val_fraction=1)


def test_a_single_concept_is_not_split_and_few_batches_are_warned_about(tmp_path, caplog):
    rows = write_pictures(tmp_path)
    one = tmp_path / "one.csv"
    with open(one, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "concept"])
        w.writeheader()
        w.writerows([{**r, "concept": "shapes"} for r in rows])
    with caplog.at_level(logging.WARNING, logger="mmformer.training.datamodule"):
        dm = data_module(one, val_fraction=0.1)
        assert dm.val_dataset is None and len(dm.train_dataset) == 24
        assert "one concept only, no validation set held out" in caplog.text
        caplog.clear()
        dm.train_dataloader()
    want = f"24 training samples at data.batch_size=128 make 1 batch(es) an epoch (fewer than {MIN_BATCHES_PER_EPOCH})"
    assert want in caplog.text and "--data.batch_size 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmformer.training.datamodule"):
        data_module(one, batch_size=2).train_dataloader()  # 12 batches: nothing to say
    assert "an epoch" not in caplog.text


def test_the_all_extra_installs_every_optional_dependency_the_commands_use():
    """``pip install -e '.[all]'`` (the README's line) brings serve, onnx, int8 and timm."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert sorted(extras["all"]) == sorted({*extras["serve"], *extras["onnx"], *extras["int8"], *extras["timm"]})
