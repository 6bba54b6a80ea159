"""Hardening: files a user is given never run code, never cost unbounded memory, and never make
mmformer delete the user's files; errors are one line naming the file.

Each test here failed on the code before these fixes (see the issue of this name)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from mmformer.cli import run
from mmformer.training.checkpoint import CheckpointError, check_checkpoint, export_checkpoint


# ---- 1. checkpoints never execute code ------------------------------------------------------------
class Payload:
    """Unpickling this creates ``flag`` (what an attacker's os.system call would do)."""

    def __init__(self, flag: Path) -> None:
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _tiny_module():
    from mmformer.training.module import MMFormerModule

    return MMFormerModule(preset="tiny", model_config=dict(width=32, depth=1, heads=2, embed_dim=16,
                                                           image_size=32, patch_size=8, context_length=8))


def _ckpt_file_with_payload(path: Path, flag: Path) -> Path:
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "mmformer": {"config": {}, "x": Payload(flag)}}, path)
    return path


def _sharded_with_payload(folder: Path, flag: Path, where: str) -> Path:
    """A folder shaped like a sharded (FSDP) checkpoint, written by torch.distributed.checkpoint
    in one process, with the payload in ``meta.pt``, in ``.metadata`` or in a bytes entry."""
    import pickle

    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"model.w": torch.ones(2)},
             "optimizer_0": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]}}
    if where == "entry":
        state["state_dict"]["model.extra"] = Payload(flag)
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"epoch": 0, "global_step": 1}, folder / "meta.pt")
    if where == "meta":
        torch.save({"epoch": 0, "x": Payload(flag)}, folder / "meta.pt")
    if where == "metadata":
        with open(folder / ".metadata", "rb") as f:
            md = pickle.load(f)  # our own file, written just above
        md.planner_data = Payload(flag)
        with open(folder / ".metadata", "wb") as f:
            pickle.dump(md, f)
    return folder


def test_a_clean_single_process_sharded_folder_is_readable(tmp_path):
    folder = _sharded_with_payload(tmp_path / "ok.ckpt", tmp_path / "flag", where="none")
    assert check_checkpoint(folder) == folder  # .metadata and the bytes entries load safely


@pytest.mark.parametrize("where", ["meta", "metadata", "entry"])
def test_export_of_a_sharded_folder_never_runs_its_payload(tmp_path, where, capsys):
    flag = tmp_path / "pwned"
    folder = _sharded_with_payload(tmp_path / "evil.ckpt", flag, where)
    with pytest.raises(CheckpointError, match=r"weights_only|not part of a checkpoint index|refused"):
        check_checkpoint(folder)
    assert not flag.exists()
    assert run(["export", "--ckpt", str(folder), "--out", str(tmp_path / "out")]) != 0
    assert not flag.exists()
    err = capsys.readouterr().err
    assert err.startswith("mmformer export: ") and str(folder) in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError):
        export_checkpoint(folder, tmp_path / "out")
    assert not flag.exists() and not (tmp_path / "out").exists()


def test_export_of_a_file_never_runs_its_payload(tmp_path, capsys):
    flag = tmp_path / "pwned"
    ckpt = _ckpt_file_with_payload(tmp_path / "evil.ckpt", flag)
    for _ in range(2):
        assert run(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")]) != 0
        assert not flag.exists()
    err = capsys.readouterr().err
    assert f"{ckpt} holds Python objects other than tensors" in err
    assert not (tmp_path / "out").exists()


def test_trainer_fit_with_a_payload_checkpoint_refuses_before_running_it(tmp_path):
    import lightning as L

    flag = tmp_path / "pwned"
    loader = torch.utils.data.DataLoader(_Pairs(), batch_size=4)
    for ckpt in (_ckpt_file_with_payload(tmp_path / "evil.ckpt", flag),
                 _sharded_with_payload(tmp_path / "evil-dir.ckpt", flag, "meta"),
                 _sharded_with_payload(tmp_path / "evil-dir2.ckpt", flag, "metadata")):
        tr = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp_path)
        with pytest.raises(CheckpointError, match=str(ckpt)):
            tr.fit(_tiny_module(), loader, ckpt_path=str(ckpt))
        assert not flag.exists()


def test_fit_command_with_a_payload_folder_refuses_before_running_it(tmp_path, capsys):
    flag = tmp_path / "pwned"
    folder = _sharded_with_payload(tmp_path / "evil.ckpt", flag, "meta")
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(_FIT_YAML.format(root=tmp_path))
    rc = run(["fit", "--config", str(cfg), "--ckpt_path", str(folder)])
    assert rc != 0 and not flag.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmformer fit: ") and str(folder) in err[-1]


_FIT_YAML = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {root}
model:
  preset: tiny
  model_config: {{width: 32, depth: 1, heads: 2, embed_dim: 16, image_size: 32, patch_size: 8, context_length: 8}}
data:
  image_size: 32
  batch_size: 8
  max_length: 8
  num_workers: 0
"""


class _Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return {"images": torch.randn(3, 32, 32, generator=g), "input_ids": torch.randint(3, 100, (8,), generator=g),
                "attention_mask": torch.ones(8, dtype=torch.bool)}


# ---- 2. no user file is ever deleted ----------------------------------------------------------------
COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (20, 40, 230), "black": (5, 5, 5)}


@pytest.fixture(scope="module")
def tiny_model():
    from mmformer.config import ModelConfig
    from mmformer.model import MMFormer
    from mmformer.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train([f"a {c} square" for c in COLORS] * 10, vocab_size=30)
    cfg = ModelConfig(width=32, depth=1, heads=4, image_size=16, patch_size=8, vocab_size=64,
                      context_length=8, embed_dim=16)
    return MMFormer(cfg, tok).eval()


@pytest.fixture()
def images(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    for name, rgb in COLORS.items():
        Image.new("RGB", (20, 20), rgb).save(d / f"{name}.png")
    return d


def _user_folder(path: Path) -> Path:
    (path / "parts").mkdir(parents=True)
    (path / "parts" / "important.txt").write_text("my notes")
    (path / "metadata.jsonl").write_text('{"mine": 1}\n')
    return path


def test_index_build_refuses_a_folder_that_is_not_an_index(tiny_model, images, tmp_path, capsys):
    from mmformer.retrieval import InvalidIndexError, build_index

    out = _user_folder(tmp_path / "user")
    with pytest.raises(InvalidIndexError, match=r"not empty and is not an mmformer index.*--overwrite"):
        build_index(tiny_model, images, out, progress=False)
    tiny_model.save_pretrained(tmp_path / "model")
    rc = run(["index", "build", "--model", str(tmp_path / "model"), "--images", str(images), "--out", str(out)])
    assert rc == 1 and capsys.readouterr().err.startswith(f"mmformer index build: {out} is not empty")
    assert (out / "parts" / "important.txt").read_text() == "my notes"
    assert (out / "metadata.jsonl").read_text() == '{"mine": 1}\n'
    assert sorted(p.name for p in out.rglob("*")) == ["important.txt", "metadata.jsonl", "parts"]
    # an empty folder is fine; --overwrite replaces the folder only once the new index is complete
    idx = build_index(tiny_model, images, out, overwrite=True, progress=False)
    assert len(idx) == len(COLORS) and not (out / "parts").exists()
    assert not list(tmp_path.glob(".user*"))  # no staging folder left behind
    assert len(build_index(tiny_model, images, tmp_path / "empty", progress=False)) == len(COLORS)


def test_failed_overwrite_rebuild_leaves_the_old_index_working(tiny_model, images, tmp_path, monkeypatch):
    import mmformer.retrieval.index as ix
    from mmformer.retrieval import Index, build_index

    out = tmp_path / "index"
    build_index(tiny_model, images, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (images / "extra.png").write_bytes((images / "red.png").read_bytes())

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ix, "_assemble", fail)
    with pytest.raises(OSError, match="disk full"):
        build_index(tiny_model, images, out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(Index.open(out, verify=True)) == len(COLORS)
    monkeypatch.undo()
    # a rerun finishes the rebuild (its parts are reused) and swaps it in
    assert len(build_index(tiny_model, images, out, overwrite=True, progress=False)) == len(COLORS) + 1
    assert not list(tmp_path.glob(".index*"))


def test_export_refuses_an_existing_model_folder_unless_overwrite(tmp_path, capsys):
    import lightning as L

    from mmformer.model import MMFormer

    module = _tiny_module()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "trained"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"my trained weights")
    assert run(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(out)]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"my trained weights"
    assert run(["export", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(out), "--overwrite"]) == 0
    MMFormer.from_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
