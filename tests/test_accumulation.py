"""Contrastive-correct gradient accumulation: k micro-batches of b == one batch of k*b (fp32)."""

import pytest
import torch
from train_helpers import LossRecorder, make_loader, make_module, trainer

from mmformer.losses import clip_loss, contrastive_accumulation

K, B = 4, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _encode(module):
    return lambda b: module(b["images"], b["input_ids"], b["attention_mask"])


def test_k_micro_batches_give_the_gradients_of_one_big_batch():
    module = make_module()
    big = next(iter(make_loader(K * B)))
    micro = [{k: v[i * B : (i + 1) * B] for k, v in big.items()} for i in range(K)]

    out = _encode(module)(big)
    ref = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], big["concepts"])
    ref.backward()
    ref_grads = _grads(module.model)
    module.model.zero_grad(set_to_none=True)

    calls = []
    loss, _ = contrastive_accumulation(
        _encode(module), micro, lambda loss, last: (calls.append(last), loss.backward()), big["concepts"]
    )
    assert calls == [False] * (K - 1) + [True]
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    grads = _grads(module.model)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")

    # sensitivity: averaging per-micro-batch losses (what accumulate_grad_batches does) differs
    module.model.zero_grad(set_to_none=True)
    for b in micro:
        o = _encode(module)(b)
        (clip_loss(o["image_embeds"], o["text_embeds"], o["logit_scale"], b["concepts"]) / K).backward()
    naive = _grads(module.model)
    assert not torch.allclose(naive["blocks.0.attn.qkv.weight"], ref_grads["blocks.0.attn.qkv.weight"], atol=1e-4)


def test_non_finite_loss_skips_every_backward():
    module = make_module()
    big = next(iter(make_loader(2 * B)))
    micro = [{k: v[i * B : (i + 1) * B] for k, v in big.items()} for i in range(2)]
    calls = []
    loss, _ = contrastive_accumulation(
        _encode(module), micro, lambda loss, last: calls.append(last), is_finite=lambda v: False
    )
    assert loss is None and calls == []


def test_lightning_accumulation_steps_equal_big_batch_steps(tmp_path):
    """3 optimizer steps with contrastive_accum=4 over batches of 4 == 3 steps over batches of 16."""
    rec_acc, rec_big = LossRecorder(), LossRecorder()
    acc = make_module(contrastive_accum=K)
    trainer(tmp_path / "a", 3, [rec_acc]).fit(acc, make_loader(B))
    big = make_module()
    trainer(tmp_path / "b", 3, [rec_big]).fit(big, make_loader(K * B))
    assert len(rec_acc.losses) == 3
    assert rec_acc.losses == pytest.approx(rec_big.losses, rel=1e-5)
    big_params = dict(big.model.named_parameters())
    for name, p in acc.model.named_parameters():
        if name.endswith("attn.qkv.bias"):  # key bias: zero true gradient, Adam amplifies rounding noise
            d = p.shape[0] // 3
            p, q = torch.cat([p[:d], p[2 * d :]]), torch.cat([big_params[name][:d], big_params[name][2 * d :]])
        else:
            q = big_params[name]
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="contrastive_accum=0"):
        make_module(contrastive_accum=0)
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        make_module(nonfinite="ignore")


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """``compile=True`` (torch.compile per block, inductor on CPU: slow to build) changes nothing numerically."""
    eager, compiled = make_module(), make_module(compile=True)
    compiled.configure_model()
    batch = next(iter(make_loader(8)))
    for m in (eager, compiled):
        o = _encode(m)(batch)
        m._loss = clip_loss(o["image_embeds"], o["text_embeds"], o["logit_scale"], batch["concepts"])
        m._loss.backward()
    assert compiled._loss.item() == pytest.approx(eager._loss.item(), rel=1e-5)
    ref = _grads(eager.model)
    for name, g in _grads(compiled.model).items():
        torch.testing.assert_close(g, ref[name], atol=1e-5, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
