"""Patch dropout (``ModelConfig.patch_dropout``): training drops a random subset of each image's
patch tokens after the positions are added; evaluation sees every patch."""

import pytest
import torch

from mmformer.config import ModelConfig, get_config
from mmformer.model import MMFormer, drop_patches, model_fingerprint


def test_drop_patches_keeps_the_class_token_and_a_subset_in_order():
    torch.manual_seed(0)
    x = torch.randn(5, 1 + 16, 8)
    g = torch.Generator().manual_seed(3)
    out = drop_patches(x, 0.25, generator=g)
    assert out.shape == (5, 1 + 12, 8)
    assert torch.equal(out[:, 0], x[:, 0])
    for b in range(5):  # each kept token is one of this image's patches, in increasing position, no repeats
        idx = [next(i for i in range(16) if torch.equal(x[b, 1 + i], tok)) for tok in out[b, 1:]]
        assert idx == sorted(set(idx)) and len(idx) == 12
    kept = [tuple(int(torch.nonzero((x[b, 1:] == out[b, 1 + j]).all(-1))[0]) for j in range(12)) for b in range(5)]
    assert len(set(kept)) > 1  # a different subset per image
    # the same generator state gives the same subset
    assert torch.equal(drop_patches(x, 0.25, generator=torch.Generator().manual_seed(3)), out)
    assert drop_patches(x, 0.0) is x
    assert drop_patches(x, 0.99).shape == (5, 2, 8)  # at least one patch stays


def test_training_drops_patches_and_evaluation_sees_them_all():
    torch.manual_seed(0)
    ref = MMFormer(get_config("tiny", vocab_size=64)).eval()
    model = MMFormer(get_config("tiny", vocab_size=64, patch_dropout=0.5))
    model.load_state_dict(ref.state_dict())
    images = torch.randn(3, 3, 64, 64)
    model.eval()
    assert torch.equal(model.encode_image(images), ref.encode_image(images))  # bit for bit
    model.train()
    assert model.patch_tokens(images).shape == (3, 1 + 8, 128)
    # training-mode embedding = the full embedding with the same random patches kept
    torch.manual_seed(7)
    got = model.patch_tokens(images)
    full = torch.cat([model.cls_token.expand(3, -1, -1), model.patch_embed(images)], dim=1) + model.pos_embed
    torch.manual_seed(7)
    want = model.norm_pre(drop_patches(full, 0.5))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    out = model(images, torch.randint(3, 64, (3, 6)), torch.ones(3, 6, dtype=torch.bool))
    out["image_embeds"].sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_patch_dropout_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match=r"patch_dropout=.* must be in \[0, 1\)"):
        ModelConfig(patch_dropout=bad)


def test_patch_dropout_round_trips_through_save_pretrained(tmp_path):
    model = MMFormer(get_config("tiny", vocab_size=64, patch_dropout=0.25))
    model.save_pretrained(tmp_path / "m")
    assert MMFormer.from_pretrained(tmp_path / "m").config.patch_dropout == 0.25


def test_patch_dropout_leaves_the_model_fingerprint_alone():
    """Indexes record the fingerprint; a training-only field must not invalidate them."""
    torch.manual_seed(0)
    a = MMFormer(get_config("tiny", vocab_size=64))
    b = MMFormer(get_config("tiny", vocab_size=64, patch_dropout=0.5))
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
