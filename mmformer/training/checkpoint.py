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

import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmformer.config import ModelConfig
from mmformer.data.sampler import ResumableDataLoader
from mmformer.data.shards import ResumableShardLoader
from mmformer.files import atomic_dir, atomic_path, remove_stale_temps
from mmformer.model import MMFormer
from mmformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

META_NAME = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or of the wrong kind."""


# ---- loading without running code from the file ------------------------------------------------
# Every torch.load here is ``weights_only=True`` (tensors, numbers, strings and plain containers;
# mmformer's own checkpoints hold nothing else). The distributed-checkpoint index ``.metadata`` is
# a plain pickle that torch reads with ``pickle.load``: it is read with :class:`_MetadataUnpickler`,
# which resolves only the classes that index is made of.
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed-checkpoint ``.metadata`` index: only the classes listed in
    ``_DCP_METADATA_CLASSES`` and torch dtypes can be named; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (not part of a checkpoint index)")


def read_dcp_metadata(path: str | os.PathLike):
    """The ``.metadata`` index of a sharded checkpoint folder, read without running code from it."""
    f = Path(path) / DCP_METADATA
    try:
        with open(f, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(
            f"{f} is corrupt, truncated or not a checkpoint index ({type(e).__name__}: {e}); "
            "mmformer only loads checkpoints that hold tensors and plain data"
        ) from e
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{f} is not a distributed-checkpoint index (it holds a {type(metadata).__name__})")
    return metadata


def safe_torch_load(source: Any, name: str | os.PathLike, **kw: Any) -> Any:
    """``torch.load(source, weights_only=True)``; any failure is a :class:`CheckpointError` naming
    ``name``. A file holding other Python objects (which a plain unpickler would construct or
    call) is refused, never executed."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{name} holds Python objects other than tensors and plain data; mmformer loads "
            f"checkpoints with weights_only=True and refuses it ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{name} is corrupt or truncated ({type(e).__name__}: {e}); delete it and resume from an earlier checkpoint"
        ) from e


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / DCP_METADATA).is_file()


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
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes): an interrupted write? "
            "Delete it and resume from an earlier checkpoint"
        )
    ckpt = safe_torch_load(path, f"checkpoint {path}", mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return path


def _check_sharded(path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    if not (path / DCP_METADATA).is_file():
        raise CheckpointError(
            f"{path} is a folder but not a sharded checkpoint: no {DCP_METADATA} index "
            "(an interrupted save leaves a '.NAME.tmp-*' folder instead)"
        )
    if not (path / META_NAME).is_file():
        raise CheckpointError(f"sharded checkpoint {path} has no {META_NAME} (Lightning's loop/optimizer state)")
    meta = safe_torch_load(path / META_NAME, path / META_NAME)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_NAME} is not a Lightning checkpoint dict")
    index = read_dcp_metadata(path)
    needed: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        rel = str(info.relative_path)
        if Path(rel).name != rel or rel.startswith("."):
            raise CheckpointError(f"{path / DCP_METADATA}: shard file name {rel!r} points outside the folder")
        needed[rel] = max(needed.get(rel, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"sharded checkpoint {path}: shard file {name} is missing")
        if f.stat().st_size < end:
            raise CheckpointError(
                f"sharded checkpoint {path}: shard file {name} is truncated "
                f"({f.stat().st_size} bytes, the index needs {end})"
            )
    # non-tensor entries (optimizer hyper-parameters...) are torch.save'd bytes that torch's
    # distributed loader reads with weights_only=False: each must load with weights_only=True
    for key, info in (index.storage_data or {}).items():
        if not isinstance(index.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
            continue
        if info.transform_descriptors:
            raise CheckpointError(
                f"sharded checkpoint {path}: entry {key.fqn!r} is stored with transforms "
                f"{list(info.transform_descriptors)}, which mmformer does not read"
            )
        with open(path / str(info.relative_path), "rb") as fh:
            fh.seek(info.offset)
            raw = fh.read(info.length)
        safe_torch_load(io.BytesIO(raw), f"sharded checkpoint {path}: entry {key.fqn!r} in {info.relative_path}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, with same-folder temp file + fsync + rename, and checked loads.

    (Lightning's default writes through an fsspec transaction whose temp file may live on another
    file system, where the final move is a copy that a kill can leave half done.)
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if Path(path).parent not in self._cleaned:  # temp files of a killed run's checkpoint writes
            self._cleaned.add(Path(path).parent)
            remove_stale_temps(Path(path).parent, "*.ckpt")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Checked, and always ``weights_only=True`` (a request for False is refused: the file
        could run code)."""
        check_checkpoint(path)
        if weights_only is False:
            raise CheckpointError(f"{path}: mmformer loads checkpoints with weights_only=True only")
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


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

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for loader in _train_loaders(trainer):
            if isinstance(loader, ResumableShardLoader):
                loader.set_epoch(trainer.current_epoch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for loader in _train_loaders(trainer):
            loader.batches_done = batch_idx + 1


def guard_fit(trainer: pl.Trainer) -> None:
    """Before a fit loads anything: add :class:`ExactResume` when the trainer has none, use
    :class:`AtomicCheckpointIO` where Lightning's default writer would be used, and check
    ``trainer.ckpt_path`` (:func:`check_checkpoint`). Called by :class:`ExactResume` and by
    ``MMFormerModule.setup``; idempotent."""
    strategy = trainer.strategy
    if not any(isinstance(c, ExactResume) for c in trainer.callbacks):
        trainer.callbacks.insert(0, ExactResume())  # before ModelCheckpoint: positions are saved up to date
    io = getattr(strategy, "_checkpoint_io", None)
    if io is None or type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    if trainer.ckpt_path is not None:
        check_checkpoint(trainer.ckpt_path)


def _train_loaders(trainer: pl.Trainer) -> list[ResumableDataLoader | ResumableShardLoader]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    flat = (
        loaders
        if isinstance(loaders, (list, tuple))
        else list(loaders.values())
        if isinstance(loaders, dict)
        else [loaders]
    )
    return [dl for dl in flat if isinstance(dl, (ResumableDataLoader, ResumableShardLoader))]


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
        from torch.distributed.checkpoint._traverse import set_element
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        class SafeReader(FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any):
                return read_dcp_metadata(path)

        class SafePlanner(_EmptyStateDictLoadPlanner):
            def load_bytes(self, read_item, value) -> None:
                obj = safe_torch_load(value, f"{path}: {read_item.dest_index.fqn}")
                if self.flatten_state_dict:
                    set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
                else:
                    self.state_dict[read_item.dest_index.fqn] = obj

        index = read_dcp_metadata(path)
        keys = [k for k in index.state_dict_metadata if k.startswith("state_dict.")] or None
        sd: dict[str, Any] = {}
        _load_state_dict(sd, storage_reader=SafeReader(str(path)), planner=SafePlanner(keys=keys), no_dist=True)
        meta = safe_torch_load(path / META_NAME, path / META_NAME)
        state = sd.get("state_dict", {})
    else:
        meta = safe_torch_load(path, path)
        state = meta["state_dict"]
    if not state:
        raise CheckpointError(f"{path}: no model weights in the checkpoint")
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
    rest = {k: v for k, v in meta.items() if k not in ("state_dict", "optimizer_states")}
    return state, rest


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """A Lightning checkpoint (file, or sharded folder from :class:`~mmformer.training.distributed.ShardedStrategy`)
    -> a ``save_pretrained`` folder (config.json, model.safetensors, tokenizer.model).

    The model's config and tokenizer come from the ``mmformer`` entry that
    :class:`~mmformer.training.module.MMFormerModule` writes into every checkpoint. An existing
    non-empty ``out`` is refused unless ``overwrite``; the new folder is written beside it and
    swapped in only once complete (a failed or killed export leaves the old one as it was).
    """
    out = Path(out)
    if not overwrite and (out.is_file() or out.is_dir() and any(out.iterdir())):
        raise CheckpointError(
            f"{out} already exists and is not empty (a model folder?); pass overwrite=True "
            "(--overwrite) to replace it, or choose another --out"
        )
    state, extra = load_checkpoint_state_dict(path)
    info = extra.get("mmformer")
    if isinstance(info, dict) and "config" in info:
        tok = Tokenizer(info["tokenizer"]) if info.get("tokenizer") else None
        model = MMFormer(ModelConfig.from_dict(info["config"], source=f"{path}: mmformer.config"), tok)
    else:
        raise CheckpointError(
            f"{path}: no 'mmformer' entry (model config and tokenizer) in the checkpoint; "
            "was it written by mmformer.training.module.MMFormerModule?"
        )
    prefix = "model."
    model_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict_checked(model_state, source=str(path))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    return out
