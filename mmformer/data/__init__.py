"""Datasets (manifest, WebDataset shards, bundled emoji data), transforms, collation, the
resumable sampler and the DataModule."""

from mmformer.data.collate import ImageTextCollator, SkipCorrupt, SkipStats, is_empty_batch
from mmformer.data.datamodule import ImageTextDataModule, SkippedSamplesCallback
from mmformer.data.emoji import EmojiData, InMemoryImageText, default_data_dir, read_concepts
from mmformer.data.errors import CorruptSample, Skipped
from mmformer.data.manifest import ImageTextManifest, ManifestError, read_manifest_rows
from mmformer.data.shards import ShardDataset, expand_shards, write_shards

__all__ = [
    "CorruptSample", "EmojiData", "ImageTextCollator", "ImageTextDataModule", "ImageTextManifest",
    "InMemoryImageText", "ManifestError", "ShardDataset", "SkipCorrupt", "SkipStats", "Skipped",
    "SkippedSamplesCallback", "default_data_dir", "expand_shards", "is_empty_batch", "read_concepts",
    "read_manifest_rows", "write_shards",
]
