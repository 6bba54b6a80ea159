"""mmformer: image-text transformers with attention shared across modalities.

>>> from mmformer import MMFormer, get_config
>>> model = MMFormer(get_config("tiny"))
"""

from mmformer.config import ModelConfig, get_config
from mmformer.model import MMFormer
from mmformer.tokenizer import Tokenizer

__all__ = ["MMFormer", "ModelConfig", "Tokenizer", "get_config"]
__version__ = "0.1.0"
