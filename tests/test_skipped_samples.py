"""Skipped samples are counted once: by the one SkippedSamplesCallback, which MMFormerModule adds
to a Trainer that has none (so a Trainer that has one does not count, warn or log twice)."""

import logging

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from mmformer.training.datamodule import ImageTextDataModule, SkippedSamplesCallback
from mmformer.training.module import MMFormerModule

MODEL = dict(width=32, depth=1, heads=2, embed_dim=16, image_size=16, patch_size=8)


@pytest.fixture()
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for name, rgb in (("red", (230, 20, 20)), ("green", (20, 200, 40)), ("blue", (20, 40, 230))):
        Image.fromarray(np.full((16, 16, 3), rgb, dtype=np.uint8)).save(tmp_path / f"{name}.png")
        rows.append(f"{name}.png,{name} square")
    (tmp_path / "noise.png").write_bytes(rng.bytes(300))  # undecodable
    rows += ["noise.png,noise", "red.png,   "]  # a corrupt image and an empty caption
    path = tmp_path / "m.csv"
    path.write_text("image,caption\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("trainer_has_callback", [False, True])
def test_skips_are_counted_warned_and_logged_once_per_epoch(manifest, tmp_path, caplog, trainer_has_callback):
    torch.manual_seed(0)
    module = MMFormerModule(preset="tiny", model_config=MODEL, warmup_steps=1)
    dm = ImageTextDataModule(train_manifest=str(manifest), image_size=16, batch_size=2, max_length=16)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[SkippedSamplesCallback()] if trainer_has_callback else [],
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.WARNING):
        trainer.fit(module, datamodule=dm)
    assert sum(isinstance(c, SkippedSamplesCallback) for c in trainer.callbacks) == 1
    assert dm.skip_stats["train"].total == 4  # 2 bad rows, 2 epochs
    assert trainer.callback_metrics["train/skipped_samples"].item() == 4.0
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one per epoch, from one counter
    assert warnings[0].startswith("train epoch 0 (rank 0): skipped 2 corrupt samples (e.g. ")
    assert warnings[1].startswith("train epoch 1 (rank 0): skipped 2 corrupt samples (e.g. ")
    assert dm.skipped_summary().startswith("train: skipped 4 corrupt samples")
