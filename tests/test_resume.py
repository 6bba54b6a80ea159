"""Faults: a run SIGKILLed mid-epoch resumes from its last checkpoint with the losses and
weights of an uninterrupted run; torn checkpoints are clear errors; non-finite losses follow
the configured policy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import RESUME_STEPS, LossRecorder, PairSet, make_loader, make_module, resume_run, trainer

from mmformer.model import MMFormer
from mmformer.training.checkpoint import AtomicCheckpointIO, CheckpointError, check_checkpoint, export_checkpoint

KILL_AT = 5  # mid-epoch: step 5 of 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("killed")
    helpers = Path(__file__).with_name("train_helpers.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(helpers.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(helpers), str(root), str(KILL_AT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed by SIGKILL, not finished or crashed
    return root


def test_resume_after_sigkill_continues_like_an_uninterrupted_run(killed_run, tmp_path):
    full, full_rec = resume_run(tmp_path / "full")
    before = [float(line.split()[1]) for line in (killed_run / "losses.txt").read_text().splitlines()]
    assert len(before) == KILL_AT
    resumed, rec = resume_run(killed_run, ckpt_path=str(killed_run / "ckpt" / "last.ckpt"))
    assert len(full_rec.losses) == RESUME_STEPS and len(rec.losses) == RESUME_STEPS - KILL_AT
    assert before + rec.losses == pytest.approx(full_rec.losses, rel=1e-6)
    other = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, other[name], atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # the single-file checkpoint exports too
    export_checkpoint(killed_run / "ckpt" / "last.ckpt", tmp_path / "model")
    model = MMFormer.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(model.logit_scale, resumed.model.logit_scale)


def test_truncated_or_empty_checkpoint_is_a_clear_error_not_a_fresh_start(killed_run, tmp_path):
    good = killed_run / "ckpt" / "last.ckpt"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{bad}.*corrupt or truncated"):
        trainer(tmp_path, 2, [LossRecorder()]).fit(make_module(), make_loader(8), ckpt_path=str(bad))
    # ExactResume runs the same check (before anything is loaded or trained)
    bad.write_bytes(b"")
    rec = LossRecorder()
    from mmformer.training.checkpoint import ExactResume

    with pytest.raises(CheckpointError, match="is empty"):
        trainer(tmp_path, 2, [rec, ExactResume()]).fit(make_module(), make_loader(8), ckpt_path=str(bad))
    assert rec.losses == []
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint(tmp_path / "nope.ckpt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


class _NaNAt(PairSet):
    """PairSet whose sample ``bad`` has NaN pixels."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.images[bad] = float("nan")


def _nan_loader(bad_batch: int):
    ds = _NaNAt(bad_batch * 8)
    return torch.utils.data.DataLoader(ds, batch_size=8)


def test_nonfinite_stop_names_the_step_and_batch(tmp_path):
    with pytest.raises(
        FloatingPointError, match=r"non-finite training loss \(nan\) at optimizer step 2, epoch 0, batch 2"
    ):
        trainer(tmp_path, 4, []).fit(make_module(nonfinite="stop"), _nan_loader(2))


@pytest.mark.parametrize("accum", [1, 2])
def test_nonfinite_skip_counts_and_goes_on(tmp_path, accum):
    module = make_module(nonfinite="skip", contrastive_accum=accum)
    init = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    rec = LossRecorder()
    trainer(tmp_path, 3, [rec]).fit(module, _nan_loader(1 if accum == 1 else 2))
    assert module.nonfinite_skipped == 1
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], module.model.blocks[0].attn.qkv.weight)
