"""Datasets (manifest, WebDataset shards, bundled emoji data), transforms, collation and the
resumable sampler. No Lightning here: the data module is :mod:`mmformer.training.datamodule`."""

from mmformer.data.collate import ImageTextCollator, SkipCorrupt, SkipStats, is_empty_batch
from mmformer.data.emoji import EmojiData, InMemoryImageText, default_data_dir, read_concepts
from mmformer.data.errors import CorruptSample, Skipped
from mmformer.data.manifest import ImageTextManifest, ManifestError, read_manifest_rows
from mmformer.data.shards import ShardDataset, expand_shards, write_shards

__all__ = [
    "CorruptSample",
    "EmojiData",
    "ImageTextCollator",
    "ImageTextManifest",
    "InMemoryImageText",
    "ManifestError",
    "ShardDataset",
    "SkipCorrupt",
    "SkipStats",
    "Skipped",
    "default_data_dir",
    "expand_shards",
    "is_empty_batch",
    "read_concepts",
    "read_manifest_rows",
    "write_shards",
]
