"""The bundled line-icon dataset (``<repo>/data/icons``), a fine-tuning domain the emoji models never saw.

800 Tabler outline icons (MIT), 64x64 RGBA PNG, captioned with their names; the human-written
tags are the ``keywords`` in ``concepts.jsonl``. ``data/build_icons.py`` rebuilds it; see
``data/README.md``. It has the emoji data's layout, so :class:`~mmformer.data.emoji.EmojiData`
and :class:`~mmformer.data.datamodule.ImageTextDataModule` (``data_dir=icons_data_dir()``) read
it as they are: splits ``train`` and ``val`` (held-out icons), one concept per icon.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["icons_data_dir"]

ENV_VAR = "MMFORMER_DATA"
_REPO_ICONS = Path(__file__).resolve().parents[2] / "data" / "icons"  # mmformer/data/icons.py -> <repo>


def icons_data_dir() -> Path:
    """The icon dataset directory (the one holding ``manifest.jsonl``).

    ``$MMFORMER_DATA/icons`` wins when ``$MMFORMER_DATA`` is set (the same variable that locates
    the emoji data); otherwise ``<repo>/data/icons`` (the package is installed editable).

    Raises:
        FileNotFoundError: naming the place looked at.
    """
    env = os.environ.get(ENV_VAR)
    candidate = Path(env) / "icons" if env else _REPO_ICONS
    if (candidate / "manifest.jsonl").is_file():
        return candidate
    raise FileNotFoundError(f"icon dataset not found: no manifest.jsonl in {candidate}"
                            + (f" (from ${ENV_VAR}={env!r})" if env else "")
                            + "; rebuild it with 'python data/build_icons.py'")
