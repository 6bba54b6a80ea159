"""The bundled line-icon dataset (``data/icons``), a fine-tuning domain the emoji models never saw.

800 Tabler outline icons (MIT), 64x64 RGBA PNG, captioned with their names; the human-written
tags are the ``keywords`` in ``concepts.jsonl``. ``data/build_icons.py`` rebuilds it; see
``data/README.md``. It has the emoji data's layout, so :class:`~mmformer.data.emoji.EmojiData`
and :class:`~mmformer.training.datamodule.ImageTextDataModule` (``data_dir=icons_data_dir()``) read
it as they are: splits ``train`` and ``val`` (held-out icons), one concept per icon.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmformer.data.bundled import bundled_dir

__all__ = ["icons_data_dir"]


def icons_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The icon dataset directory (the one holding ``manifest.jsonl``).

    ``explicit`` (the icons folder, or a folder holding ``icons/``), else ``$MMFORMER_DATA/icons``
    (the same variable that locates the emoji data), else the repository checkout's ``data/icons``,
    else the copy inside an installed wheel: see :mod:`mmformer.data.bundled`.

    Raises:
        BundledDataNotFound: a ``FileNotFoundError`` naming the places looked at and how to get the data.
    """
    return bundled_dir("icons", explicit)
