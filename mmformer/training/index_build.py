"""Index builds across devices and nodes: :func:`build_index` embeds the parts of an index with
``trainer.predict`` (one part per step, each rank writing its own parts) and assembles the same
files as :func:`mmformer.retrieval.index.build_index`, which runs in one process."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn

from mmformer.retrieval import index as index_files
from mmformer.retrieval.index import Index, embed_part, finish_build, plan_build


class EmbedParts(L.LightningModule):
    """``predict_step``: one part -> its (n, E) float32 embeddings, in sub-batches of ``batch_size``."""

    def __init__(self, model: nn.Module, kind: str, batch_size: int) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.batch_size = batch_size

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        return embed_part(self.model, batch, self.kind, self.batch_size)


class PartWriter(BasePredictionWriter):
    """Writes each finished part as ``part-NNNNNN.npy`` + ``.json`` under ``parts_dir`` (the json,
    written last, marks the part done); nothing is kept in memory."""

    def __init__(self, parts_dir: Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.parts_dir = parts_dir

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        index_files.write_part(self.parts_dir, prediction)


def build_index(
    model: nn.Module,
    source: str | os.PathLike | Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    kind: str = "image",
    backend: str = "auto",
    backend_params: dict[str, Any] | None = None,
    dtype: str = "float32",
    batch_size: int = 256,
    part_size: int = 1024,
    num_workers: int = 0,
    precision: str = "32-true",
    accelerator: str = "cpu",
    devices: int | str = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    model_path: str | None = None,
    image_col: str = "image",
    caption_col: str = "caption",
    split: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    shard: tuple[int, int] | None = None,
) -> Index | None:
    """:func:`mmformer.retrieval.index.build_index` with the embedding run by a Lightning Trainer:
    ``precision``, ``accelerator``, ``devices``, ``strategy`` and ``num_nodes`` go to the Trainer
    (a launch by ``torchrun`` or SLURM is read from the environment, as for ``fit``). Rank 0
    assembles the index and returns it; the other ranks return None. ``shard=(i, n)`` builds the
    i-th of n shards (see :func:`mmformer.retrieval.index.build_index`)."""
    int8 = bool(getattr(model, "is_int8", False))
    if int8 and accelerator not in ("cpu", "auto"):
        raise ValueError("int8 (dynamically quantized) models run on the CPU only; use accelerator='cpu'")
    writer = PartWriter()  # told the parts folder once the build is planned
    trainer = L.Trainer(
        accelerator="cpu" if int8 else accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        precision=precision,
        logger=False,
        callbacks=[writer],
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        inference_mode=True,
    )
    plan_args = dict(
        kind=kind,
        backend=backend,
        backend_params=backend_params,
        dtype=dtype,
        part_size=part_size,
        model_path=model_path,
        image_col=image_col,
        caption_col=caption_col,
        split=split,
        overwrite=overwrite,
        seed=seed,
        root=root,
        shard=shard,
    )
    if _launched_externally(trainer):
        trainer.strategy.setup_environment()  # joins the process group (Lightning's predict reuses it)
        plan = _plan_rank_zero_first(trainer, lambda: plan_build(model, source, out_dir, **plan_args))
    else:
        plan = plan_build(model, source, out_dir, **plan_args)
    if isinstance(plan, Index):
        return plan
    t0 = time.perf_counter()
    if plan.todo:
        writer.parts_dir = plan.parts_dir
        with warnings.catch_warnings():  # parts are whole batches: there are no sampler batch indices
            warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
            trainer.predict(
                EmbedParts(model, kind, batch_size), dataloaders=plan.loader(num_workers), return_predictions=False
            )
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return None  # rank 0 assembles the index
    elif not trainer.is_global_zero:
        return None
    return finish_build(plan, time.perf_counter() - t0)


def _plan_rank_zero_first(trainer: L.Trainer, plan: Callable[[], Any]) -> Any:
    """``plan()`` on rank 0, then on the other ranks. Every process of a torchrun or SLURM launch
    starts at once: rank 0 alone creates, resumes or replaces the output folder, and the others
    read what it left, so all list the same parts to embed. An error on any rank stops every rank
    (raised where it happened, named on the others) instead of leaving them waiting."""
    result, error = None, None
    if trainer.is_global_zero:
        try:
            result = plan()
        except Exception as e:  # re-raised below, once the other ranks know
            error = e
    message = trainer.strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(f"rank 0 stopped the index build: {message}")
    if not trainer.is_global_zero:
        try:
            result = plan()
        except Exception as e:
            error = e
    if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
        if error is not None:
            raise error
        raise ValueError("another rank could not plan the index build; its output says why")
    return result


def _launched_externally(trainer: L.Trainer) -> bool:
    """True for a process of a multi-process launch made outside Lightning (torchrun, SLURM's
    srun, ...): every rank runs :func:`build_index` from the start, at the same time. False for
    one process, and for the processes Lightning starts itself (``devices`` > 1 on one machine:
    the first one plans before it starts the others)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return (
        env is not None
        and env.creates_processes_externally
        and not isinstance(env, LightningEnvironment)
        and env.world_size() > 1
    )
