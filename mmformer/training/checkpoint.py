"""Checkpoints that are safe to kill and exact to resume.

- :func:`check_checkpoint`: a Lightning checkpoint file or a sharded (distributed checkpoint)
  folder is readable and complete, else a ``CheckpointError`` that names the file and the fault.
- :class:`AtomicCheckpointIO`: single-file checkpoints written to a temp file in the target's
  folder, fsynced, then renamed (a kill never leaves a truncated ``last.ckpt``); loads are checked.
- :class:`ResumableSampler` / :class:`ResumableDataLoader`: a seeded, rank-sharded training order
  that a checkpoint can continue in the middle of an epoch (Lightning saves and restores the
  loader's ``state_dict``).
- :class:`ExactResume`: the callback that tracks the loader's progress; it and
  ``MMFormerModule.setup`` call :func:`guard_fit` (atomic writer, ``ckpt_path`` checked before
  anything is loaded).
- :func:`load_checkpoint_state_dict` / :func:`export_checkpoint`: a Lightning checkpoint, sharded
  or not, -> the model's full state dict -> a ``save_pretrained`` folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmformer.config import ModelConfig
from mmformer.data.sampler import ResumableDataLoader
from mmformer.files import atomic_path
from mmformer.model import MMFormer
from mmformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

META_NAME = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or of the wrong kind."""


def check_checkpoint(path: str | os.PathLike) -> Path:
    """Raise :class:`CheckpointError` unless ``path`` is a complete Lightning checkpoint.

    A file must load (``torch.load``, memory-mapped) into a dict with ``state_dict``; a folder
    must hold ``meta.pt`` and a distributed-checkpoint index whose every shard file exists and
    is long enough for the byte ranges the index points into.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        _check_sharded(path)
        return path
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted write? "
                              "Delete it and resume from an earlier checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                              "delete it and resume from an earlier checkpoint") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return path


def _check_sharded(path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / DCP_METADATA).is_file():
        raise CheckpointError(f"{path} is a folder but not a sharded checkpoint: no {DCP_METADATA} index "
                              "(an interrupted save leaves a '.NAME.tmp-*' folder instead)")
    if not (path / META_NAME).is_file():
        raise CheckpointError(f"sharded checkpoint {path} has no {META_NAME} (Lightning's loop/optimizer state)")
    try:
        meta = torch.load(path / META_NAME, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path / META_NAME} is corrupt or truncated ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_NAME} is not a Lightning checkpoint dict")
    try:
        index = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path / DCP_METADATA} is corrupt or truncated ({type(e).__name__}: {e})") from e
    needed: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"sharded checkpoint {path}: shard file {name} is missing")
        if f.stat().st_size < end:
            raise CheckpointError(f"sharded checkpoint {path}: shard file {name} is truncated "
                                  f"({f.stat().st_size} bytes, the index needs {end})")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, with same-folder temp file + fsync + rename, and checked loads.

    (Lightning's default writes through an fsspec transaction whose temp file may live on another
    file system, where the final move is a copy that a kill can leave half done.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        check_checkpoint(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


class ExactResume(pl.Callback):
    """Make checkpoints safe and resumption exact.

    - ``setup``: checks the checkpoint about to be resumed (``trainer.ckpt_path``) and raises a
      :class:`CheckpointError` naming the file if it is missing, truncated or corrupt (never a
      silent fresh start); replaces Lightning's default checkpoint writer by
      :class:`AtomicCheckpointIO` (strategies with their own writer, e.g. FSDP, keep it).
    - after each training batch: records the position of every :class:`ResumableDataLoader`.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            guard_fit(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        for loader in _train_loaders(trainer):
            loader.batches_done = batch_idx + 1


def guard_fit(trainer: pl.Trainer) -> None:
    """Before a fit loads anything: use :class:`AtomicCheckpointIO` where Lightning's default
    writer would be used, and check ``trainer.ckpt_path`` (:func:`check_checkpoint`). Called by
    :class:`ExactResume` and by ``MMFormerModule.setup``; idempotent."""
    strategy = trainer.strategy
    io = getattr(strategy, "_checkpoint_io", None)
    if io is None or type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    if trainer.ckpt_path is not None:
        check_checkpoint(trainer.ckpt_path)


def _train_loaders(trainer: pl.Trainer) -> list[ResumableDataLoader]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    flat = loaders if isinstance(loaders, (list, tuple)) else \
        list(loaders.values()) if isinstance(loaders, dict) else [loaders]
    return [dl for dl in flat if isinstance(dl, ResumableDataLoader)]


# ---- conversion to save_pretrained -----------------------------------------------------------------
def load_checkpoint_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the LightningModule's full state dict, the rest of the checkpoint without optimizer
    states) of a checkpoint file or folder.

    A sharded folder is read on one process, without a process group: every shard is assembled
    into full tensors (needs the whole model in host memory).
    """
    path = check_checkpoint(path)
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        index = FileSystemReader(str(path)).read_metadata()
        keys = [k for k in index.state_dict_metadata if k.startswith("state_dict.")] or None
        sd: dict[str, Any] = {}
        _load_state_dict(sd, storage_reader=FileSystemReader(str(path)),
                         planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
        meta = torch.load(path / META_NAME, map_location="cpu", weights_only=False)
        state = sd.get("state_dict", {})
    else:
        meta = torch.load(path, map_location="cpu", weights_only=False)
        state = meta["state_dict"]
    if not state:
        raise CheckpointError(f"{path}: no model weights in the checkpoint")
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
    rest = {k: v for k, v in meta.items() if k not in ("state_dict", "optimizer_states")}
    return state, rest


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A Lightning checkpoint (file, or sharded folder from :class:`~mmformer.training.distributed.ShardedStrategy`)
    -> a ``save_pretrained`` folder (config.json, model.safetensors, tokenizer.model).

    The model's config and tokenizer come from the ``mmformer`` entry that
    :class:`~mmformer.training.module.MMFormerModule` writes into every checkpoint.
    """
    state, extra = load_checkpoint_state_dict(path)
    info = extra.get("mmformer")
    if isinstance(info, dict) and "config" in info:
        tok = Tokenizer(info["tokenizer"]) if info.get("tokenizer") else None
        model = MMFormer(ModelConfig.from_dict(info["config"]), tok)
    else:
        raise CheckpointError(f"{path}: no 'mmformer' entry (model config and tokenizer) in the checkpoint; "
                              "was it written by mmformer.training.module.MMFormerModule?")
    prefix = "model."
    model_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict_checked(model_state, source=str(path))
    return model.save_pretrained(out)
