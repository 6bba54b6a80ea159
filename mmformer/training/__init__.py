"""The Lightning layer: the training module and its long-document subclass, optimizer groups and
schedules, callbacks, checkpoints (atomic IO, resume, export), the FSDP2 strategy, CPU settings,
``make_trainer`` and the recipes with the one command that runs them (``recipes.py``)."""
