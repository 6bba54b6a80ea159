"""Shared pieces of the scale-out tests (FSDP, accumulation, resume): a tiny model, a fixed
synthetic image-text set, a seeded resumable loader and a loss recorder. Not a test file."""

from __future__ import annotations

import os
import socket

import lightning as L
import torch

from mmformer.data.sampler import ResumableDataLoader, ResumableSampler
from mmformer.training.module import MMFormerModule

TINY = dict(width=32, depth=2, heads=2, image_size=32, patch_size=8, embed_dim=32, context_length=8)
N_SAMPLES = 64
T = 8


class PairSet(torch.utils.data.Dataset):
    """N fixed random (image, ids) pairs; 4 pairs per concept so concept masking is exercised."""

    def __init__(self, n: int = N_SAMPLES, seed: int = 0, vocab: int = 2000) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, TINY["image_size"], TINY["image_size"], generator=g)
        self.ids = torch.randint(3, vocab, (n, T), generator=g)
        lengths = torch.randint(2, T + 1, (n,), generator=g)
        self.mask = torch.arange(T)[None, :] < lengths[:, None]  # (N, T) True = real token
        self.ids[~self.mask] = 0
        self.concepts = torch.arange(n) // 4

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "images": self.images[i],
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "concepts": self.concepts[i],
            "indices": torch.tensor(i),
        }


def make_module(model_config_extra: dict | None = None, **kw) -> MMFormerModule:
    L.seed_everything(0, verbose=False)
    kw.setdefault("lr", 1e-3)
    kw.setdefault("warmup_steps", 2)
    return MMFormerModule(preset="tiny", model_config={**TINY, **(model_config_extra or {})}, **kw)


def make_loader(batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> ResumableDataLoader:
    ds = PairSet()
    sampler = ResumableSampler(ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    return ResumableDataLoader(ds, sampler=sampler, batch_size=batch_size, drop_last=True)


class LossRecorder(L.Callback):
    """Records ``train/loss`` after every optimizer step (``path``: also appended to a file, flushed)."""

    def __init__(self, path: str | None = None) -> None:
        self.losses: list[float] = []
        self.path = path
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # accumulating: no step taken
            return
        self._last_step = trainer.global_step
        v = float(trainer.callback_metrics["train/loss"])
        self.losses.append(v)
        if self.path and trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step} {v!r}\n")
                f.flush()
                os.fsync(f.fileno())


class StopAt(L.Callback):
    """Stop training after optimizer step ``step`` (the schedule still spans ``max_steps``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def trainer(root, max_steps: int, callbacks=(), **kw) -> L.Trainer:
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("devices", 1)
    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        **kw,
    )


def full_params(module: MMFormerModule) -> dict[str, torch.Tensor]:
    """Every parameter as a full tensor (a collective under FSDP: call it on every rank)."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in module.model.named_parameters()
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank_env(rank: int, port: int) -> None:
    """Environment for Lightning to treat this process as rank ``rank`` of an external launch."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", GLOBAL_RANK=str(rank)
    )
    torch.set_num_threads(1)


class KillAt(L.Callback):
    """SIGKILL this process at the start of the batch after optimizer step ``step`` (mid-epoch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


RESUME_BATCH = 8  # 64 samples -> 8 batches an epoch
RESUME_STEPS = 12  # crosses the epoch boundary at step 8


def resume_run(root, callbacks=(), ckpt_path=None, **module_kw) -> tuple[MMFormerModule, LossRecorder]:
    """The run of tests/test_resume.py: seeded, shuffled, checkpoint after every step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mmformer.training.checkpoint import ExactResume

    os.makedirs(root, exist_ok=True)
    rec = LossRecorder(os.path.join(str(root), "losses.txt"))
    module = make_module(**module_kw)
    ckpt = ModelCheckpoint(dirpath=os.path.join(str(root), "ckpt"), every_n_train_steps=1, save_last=True)
    tr = trainer(root, RESUME_STEPS, [rec, ExactResume(), *callbacks, ckpt])
    tr.fit(module, make_loader(RESUME_BATCH), ckpt_path=ckpt_path)
    return module, rec


if __name__ == "__main__":  # the run that gets killed: python train_helpers.py ROOT KILL_AT_STEP
    import sys

    torch.set_num_threads(1)
    resume_run(sys.argv[1], [KillAt(int(sys.argv[2]))])
    raise SystemExit("not killed")
