"""Datasets (manifest, WebDataset shards, bundled emoji data), collation and the DataModule.

Names are imported lazily, so ``import mmformer.data.errors`` (used by ``mmformer.transforms``)
does not pull in Lightning or webdataset, and there is no import cycle with transforms.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CorruptSample": "errors", "Skipped": "errors",
    "ImageTextManifest": "manifest", "ManifestError": "manifest", "read_manifest_rows": "manifest",
    "ImageTextCollator": "collate", "SkipCorrupt": "collate", "SkipStats": "collate",
    "is_empty_batch": "collate",
    "ShardDataset": "shards", "write_shards": "shards", "expand_shards": "shards",
    "EmojiData": "emoji", "InMemoryImageText": "emoji", "default_data_dir": "emoji",
    "read_concepts": "emoji",
    "ImageTextDataModule": "datamodule", "SkippedSamplesCallback": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import ``mmformer.data.<module>`` on first access to one of its exported names."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmformer.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
