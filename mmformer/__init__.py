"""mmformer: image-text transformers with attention shared across modalities.

>>> from mmformer import MMFormer, get_config
>>> model = MMFormer(get_config("tiny"))

The names below are imported on first use, so that ``import mmformer.cli`` (``mmformer --help``)
does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and the API reference; at run time, __getattr__ below
    from mmformer.config import ModelConfig, get_config
    from mmformer.model import MMFormer
    from mmformer.tokenizer import Tokenizer

__all__ = ["MMFormer", "ModelConfig", "Tokenizer", "get_config"]
__version__ = "0.1.0"

_HOMES = {
    "MMFormer": "mmformer.model",
    "ModelConfig": "mmformer.config",
    "get_config": "mmformer.config",
    "Tokenizer": "mmformer.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'mmformer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
