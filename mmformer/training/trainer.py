"""``make_trainer``: a Lightning ``Trainer`` with the project's defaults for runs made from Python
(``mmformer demo``, notebooks, tests); ``mmformer fit`` builds its Trainer from the recipe."""

from __future__ import annotations

from typing import Any

import lightning as L

#: What every programmatic run starts from: one CPU device, nothing written or printed unless asked.
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def make_trainer(**overrides: Any) -> L.Trainer:
    """``L.Trainer(**{**TRAINER_DEFAULTS, **overrides})``: any ``Trainer`` argument overrides a default
    (e.g. ``logger=CSVLogger(...)``, ``callbacks=[...]``, ``enable_progress_bar=True``)."""
    return L.Trainer(**{**TRAINER_DEFAULTS, **overrides})
