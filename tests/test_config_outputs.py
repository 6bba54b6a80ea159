"""Old configs compute what they computed before the CLIP fields existed.

``tests/fixtures/outputs-224696d.pt`` holds, for a few small configs, the seeded model's state-dict
keys and its image and text embeddings on seeded inputs, computed by the code at 224696d (before
the per-modality mask, position, pooling, activation and bias fields). Regenerate only on purpose:
``python tests/test_config_outputs.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmformer.config import ModelConfig
from mmformer.model import MMFormer

FIXTURE = Path(__file__).parent / "fixtures" / "outputs-224696d.pt"
BASE = dict(width=32, depth=2, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16)
CASES = {
    "qkv": {},
    "none": dict(share="none"),
    "all-learned-mean": dict(share="all", image_pos="learned", image_pool="mean", text_pool="mean"),
    "attention-cls-nopre": dict(share="attention", image_pre_norm=False, text_pool="cls", qkv_bias=False),
}


def reference(case: str) -> dict:
    """The seeded model of ``case`` and its embeddings on seeded inputs (one padded text row)."""
    cfg = ModelConfig(**{**BASE, **CASES[case]})
    torch.manual_seed(0)
    model = MMFormer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 16, 16, generator=g)
    ids = torch.randint(4, 64, (3, 8), generator=g)
    ids[1, 5:] = 0  # padding
    with torch.no_grad():
        return {
            "keys": sorted(model.state_dict()),
            "image": model.encode_image(images),
            "text": model.encode_text(ids),
            "config": cfg.to_dict(),
        }


@pytest.mark.parametrize("case", sorted(CASES))
def test_old_configs_build_and_compute_the_same(case):
    saved = torch.load(FIXTURE, weights_only=True)[case]
    now = reference(case)
    assert now["keys"] == saved["keys"]
    assert ModelConfig.from_dict(saved["config"]) == ModelConfig(**{**BASE, **CASES[case]})
    torch.testing.assert_close(now["image"], saved["image"], rtol=0, atol=1e-6)
    torch.testing.assert_close(now["text"], saved["text"], rtol=0, atol=1e-6)


if __name__ == "__main__":
    torch.save({case: reference(case) for case in CASES}, FIXTURE)
