"""Callbacks of the Lightning layer: those the modules register themselves
(:meth:`~mmformer.training.module.MMFormerModule.configure_callbacks`) and :class:`ExportModel`,
which recipes name to write the trained model as a ``save_pretrained`` folder."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from mmformer.files import atomic_dir

log = logging.getLogger(__name__)


class ScheduleClock(L.Callback):
    """Starts the clock of wall-clock learning-rate schedules when training starts.

    A :class:`~mmformer.training.optim.TimeCosine` factor starts its clock when its scheduler is
    made (``configure_optimizers``); work between that and the first step (a module's
    ``on_fit_start``, e.g. a state cache) must not eat the budget, so every scheduler with a
    ``restart_clock`` method restarts here, where Trainer ``max_time`` counts from too. A run
    resumed past step 0 keeps its clock.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != 0:
            return
        for config in trainer.lr_scheduler_configs:
            restart = getattr(config.scheduler, "restart_clock", None)
            if callable(restart):
                restart()


class ExportModel(L.Callback):
    """Writes the module's model as a ``save_pretrained`` folder (config, safetensors, tokenizer)
    when fit ends, also when it ends on the Trainer's ``max_time``: the weights of the last step.

    Args:
        directory: the folder to write; None = ``model`` inside the Trainer's ``default_root_dir``
            (a recipe with ``default_root_dir: runs/teacher`` writes ``runs/teacher/model``).
            An existing folder is replaced only once the new one is complete.

    Needs a module with ``export(directory)`` (:class:`~mmformer.training.module.MMFormerModule`);
    written by rank 0. A model split over ranks (``ShardedStrategy``, ``PipelineStrategy``) is
    refused when training starts: export its checkpoint with ``mmformer export --ckpt``.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory

    def target(self, trainer: L.Trainer) -> Path:
        """The folder the model will be written to."""
        return Path(self.directory) if self.directory else Path(trainer.default_root_dir) / "model"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "export", None)):
            raise TypeError(f"ExportModel needs a module with export(directory); {type(pl_module).__name__} has none")
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise RuntimeError(
                f"ExportModel writes the model of one process; under {type(trainer.strategy).__name__} "
                "each rank holds a part of it: drop the callback and export the checkpoint instead "
                "(mmformer export --ckpt CKPT --out DIR)"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = self.target(trainer)
        with atomic_dir(path) as tmp:
            pl_module.export(tmp)
        log.info("wrote the trained model to %s (step %d)", path, trainer.global_step)
