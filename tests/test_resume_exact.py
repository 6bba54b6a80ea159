"""Exact resume for every data source ``mmformer fit`` reads: a run SIGKILLed mid-epoch and
resumed from its last checkpoint has the losses and weights of an uninterrupted run, for the
bundled emoji data (batch augmentation, random captions), a manifest (per-sample torchvision
augmentation) and WebDataset shards.

Augmentation draws from a generator seeded by (seed, epoch, sample index), never from the global
RNG, whose state a resumed process does not share with the killed one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
STEPS, KILL_AT, BATCH = 7, 3, 8  # the epoch (16 samples / 8) ends at step 2, so the kill is mid-epoch 1

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = r"""
import json, os, signal, sys
import lightning as L
import torch
torch.set_num_threads(1)
from lightning.pytorch.callbacks import ModelCheckpoint
from mmformer.training.datamodule import ImageTextDataModule
from mmformer.training.module import MMFormerModule

root, source, data, kill_at, ckpt = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] or None
STEPS, BATCH = int(sys.argv[6]), int(sys.argv[7])

class Record(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(os.path.join(root, "losses.txt"), "a") as f:
            f.write(f"{trainer.global_step} {float(trainer.callback_metrics['train/loss'])!r}\n")
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if kill_at and trainer.global_step >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

L.seed_everything(0, verbose=False)
kw = dict(image_size=32, batch_size=BATCH, max_length=8, num_workers=0, seed=5)
if source == "emoji":
    dm = ImageTextDataModule(data_dir=data, caption_mode="name+keywords", **kw)
elif source == "manifest":
    dm = ImageTextDataModule(train_manifest=data, **kw)
else:
    dm = ImageTextDataModule(shards=data, shard_epoch_size=16, shuffle_buffer=8, **kw)
module = MMFormerModule(preset="tiny", lr=1e-3, warmup_steps=1, model_config=dict(
    width=32, depth=1, heads=2, image_size=32, patch_size=8, embed_dim=16, context_length=8))
torch.manual_seed(int(os.environ.get("GLOBAL_SEED", "0")))  # the global RNG differs between runs
import random; random.seed(int(os.environ.get("GLOBAL_SEED", "0")))
trainer = L.Trainer(max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, accelerator="cpu",
                    callbacks=[Record(), ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=1,
                                                         save_last=True)])
trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
torch.save({k: v.detach() for k, v in module.model.state_dict().items()}, os.path.join(root, "final.pt"))
"""


def _run(root: Path, source: str, data: Path, kill_at: int = 0, ckpt: str = "", global_seed: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GLOBAL_SEED": str(global_seed), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", RUN, str(root), source, str(data), str(kill_at), ckpt, str(STEPS), str(BATCH)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(root: Path) -> dict[int, float]:
    return {int(a): float(b) for a, b in (line.split() for line in (root / "losses.txt").read_text().splitlines())}


def _check_exact(tmp_path: Path, source: str, data: Path) -> None:
    full = _run(tmp_path / "full", source, data)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(tmp_path / "killed", source, data, kill_at=KILL_AT, global_seed=1)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _run(
        tmp_path / "killed", source, data, ckpt=str(tmp_path / "killed" / "ckpt" / "last.ckpt"), global_seed=2
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-6, abs=1e-7)
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"im{i}.png")
        rows.append({"image": f"im{i}.png", "caption": f"picture number {i} of {['a', 'b', 'c', 'd'][i % 4]}"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_manifest_resume_is_exact(tmp_path, images):
    _check_exact(tmp_path, "manifest", images / "m.jsonl")


def test_bundled_emoji_resume_is_exact(tmp_path):
    data = HERE.parent / "data" / "emoji"
    if not (data / "manifest.jsonl").is_file():
        pytest.skip("bundled emoji data not in this checkout")
    _check_exact(tmp_path, "emoji", data)


def test_shards_resume_is_exact(tmp_path, images):
    from mmformer.data.shards import write_shards

    rows = [json.loads(line) for line in (images / "m.jsonl").read_text().splitlines()]
    paths = write_shards(
        ({"image": images / r["image"], "caption": [r["caption"], r["caption"].upper()]} for r in rows),
        str(tmp_path / "shard-%03d.tar"),
        maxcount=5,
        caption_format="json",
    )
    assert len(paths) == 4
    _check_exact(tmp_path / "run", "shards", tmp_path / "shard-{000..003}.tar")
