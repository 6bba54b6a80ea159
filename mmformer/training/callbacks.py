"""Callbacks of the Lightning layer that the modules register themselves
(:meth:`~mmformer.training.module.MMFormerModule.configure_callbacks`)."""

from __future__ import annotations

import lightning as L


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
