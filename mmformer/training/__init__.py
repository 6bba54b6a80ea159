"""The Lightning layer: the training module and its long-document subclass, optimizer groups and
schedules, checkpoints (atomic IO, resume, export), the FSDP2 strategy and CPU settings."""
