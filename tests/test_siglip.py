"""SigLIP's pairwise sigmoid loss: value against an explicit float64 reference, the bias gets its
gradient, the same loss and gradients on 1 and 2 processes, and contrastive accumulation over k
micro-batches equals one batch of k*B."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from train_helpers import free_port

from mmformer.losses import contrastive_accumulation, siglip_loss, siglip_loss_fn


def reference(img, txt, scale, bias, positives=None):
    """-sum over pairs of log sigmoid(label * (t <x_i, y_j> + b)) / N, written out in float64."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            same = i == j if positives is None else positives[i] == positives[j]
            z = scale * float(img[i].double() @ txt[j].double()) + bias
            total += math.log1p(math.exp(-(1 if same else -1) * z))  # -log sigmoid(label * z)
    return total / n


def _pairs(n=6, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g), dim=-1), F.normalize(torch.randn(n, e, generator=g), dim=-1)


def test_siglip_matches_reference():
    img, txt = _pairs()
    got = siglip_loss(img, txt, torch.tensor(10.0), torch.tensor(-math.log(6)))
    assert got.item() == pytest.approx(reference(img, txt, 10.0, -math.log(6)), rel=1e-6)


def test_same_group_pairs_are_positives():
    img, txt = _pairs()
    concepts = torch.tensor([0, 1, 0, 2, 1, 3])
    got = siglip_loss(img, txt, torch.tensor(10.0), torch.tensor(-2.0), positives=concepts)
    assert got.item() == pytest.approx(reference(img, txt, 10.0, -2.0, concepts.tolist()), rel=1e-6)
    assert got.item() != pytest.approx(siglip_loss(img, txt, torch.tensor(10.0), torch.tensor(-2.0)).item(), rel=1e-3)


def test_gradient_reaches_the_bias_and_scale():
    img, txt = _pairs()
    bias = torch.tensor(-math.log(6), requires_grad=True)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    siglip_loss(img, txt, log_scale.exp(), bias).backward()
    # d/db of -sum log sigmoid(l * z) / n = -sum l * sigmoid(-l * z) / n
    z = 10.0 * img @ txt.T - math.log(6)
    labels = torch.eye(6) * 2 - 1
    expect = -(labels * torch.sigmoid(-labels * z)).sum() / 6
    assert bias.grad is not None and bias.grad.item() == pytest.approx(expect.item(), rel=1e-5)
    assert log_scale.grad is not None and log_scale.grad.abs().item() > 0


def _worker(rank, world, port, img, txt, groups, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = img.shape[0] // world
        mine_img = img[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        mine_txt = txt[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        bias = torch.tensor(-1.5, requires_grad=True)
        loss = siglip_loss(mine_img, mine_txt, torch.tensor(10.0), bias, groups[rank * n : (rank + 1) * n])
        loss.backward()
        out[rank] = (loss.detach(), torch.cat([mine_img.grad, mine_txt.grad]), bias.grad)
    finally:
        dist.destroy_process_group()


def test_same_loss_and_gradients_on_one_and_two_processes():
    img, txt = _pairs(8, 4)
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5])
    full_img, full_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    bias = torch.tensor(-1.5, requires_grad=True)
    full = siglip_loss(full_img, full_txt, torch.tensor(10.0), bias, groups)
    full.backward()

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), img, txt, groups, out), nprocs=2, join=True)
    for rank in range(2):
        loss, grads, bias_grad = out[rank]
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)
        # as for clip_loss: local rows get world x the global gradient, which DDP's mean undoes
        expect = torch.cat([full_img.grad[rank * 4 : (rank + 1) * 4], full_txt.grad[rank * 4 : (rank + 1) * 4]])
        torch.testing.assert_close(grads / 2, expect, atol=1e-6, rtol=1e-5)
        assert bias_grad.item() == pytest.approx(bias.grad.item(), rel=1e-5)


class _Toy(torch.nn.Module):
    """Two linear 'encoders' with a SigLIP scale and bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(5, 4)
        self.txt = torch.nn.Linear(3, 4)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-math.log(12.0)))

    def forward(self, b):
        return {
            "image_embeds": F.normalize(self.img(b["x"]), dim=-1),
            "text_embeds": F.normalize(self.txt(b["y"]), dim=-1),
            "logit_scale": self.log_scale.exp(),
            "logit_bias": self.bias,
        }


def test_contrastive_accumulation_with_siglip_equals_one_big_batch():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g)
    groups = torch.tensor([0, 1, 2, 3, 0, 4, 5, 6, 1, 7, 8, 9])
    ref = _Toy()
    out = ref({"x": x, "y": y})
    loss = siglip_loss_fn(out["image_embeds"], out["text_embeds"], out, groups)
    loss.backward()

    acc = _Toy()
    micro = [{"x": x[i : i + 4], "y": y[i : i + 4]} for i in range(0, 12, 4)]
    got, _ = contrastive_accumulation(acc, micro, lambda loss, last: loss.backward(), groups, loss_fn=siglip_loss_fn)
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), q in zip(ref.named_parameters(), acc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- the module: `loss: siglip` ------------------------------------------------------------------
def test_module_with_siglip_starts_at_scale_10_and_bias_log_1_over_b_and_trains_the_bias(tmp_path):
    from train_helpers import LossRecorder, make_loader, make_module, trainer

    module = make_module(loss="siglip")
    assert module.model.logit_scale.exp().item() == pytest.approx(10.0)
    assert module.logit_bias is not None and not module.logit_bias_ready
    no_decay = module.optimizer_groups()[1]["params"]
    assert any(p is module.logit_bias for p in no_decay)  # the bias takes no weight decay
    batch = next(iter(make_loader(8)))
    loss, logs = module.training_loss(batch)
    assert module.logit_bias.item() == pytest.approx(-math.log(8)) and module.logit_bias_ready
    out = module(batch["images"], batch["input_ids"], batch["attention_mask"])
    ref = siglip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"], batch["concepts"])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert logs["logit_bias"].item() == pytest.approx(-math.log(8))

    rec = LossRecorder()
    fresh = make_module(loss="siglip")
    trainer(tmp_path, 3, [rec]).fit(fresh, make_loader(8))
    assert len(rec.losses) == 3 and all(math.isfinite(v) for v in rec.losses)
    assert fresh.logit_bias.item() != pytest.approx(-math.log(8), abs=1e-7)  # the bias trained
    checkpoint = {}
    fresh.on_save_checkpoint(checkpoint)
    again = make_module(loss="siglip")
    again.on_load_checkpoint(checkpoint)
    assert again.logit_bias_ready  # a resumed run keeps the trained bias, not log(1/B) again


def test_siglip_with_contrastive_accumulation_equals_one_big_batch(tmp_path):
    from train_helpers import LossRecorder, make_loader, make_module, trainer

    rec_acc, rec_big = LossRecorder(), LossRecorder()
    acc = make_module(loss="siglip", contrastive_accum=2)
    trainer(tmp_path / "a", 2, [rec_acc]).fit(acc, make_loader(8))
    big = make_module(loss="siglip")
    trainer(tmp_path / "b", 2, [rec_big]).fit(big, make_loader(16))
    assert rec_acc.losses == pytest.approx(rec_big.losses, rel=1e-5)
    assert acc.logit_bias.item() == pytest.approx(big.logit_bias.item(), rel=1e-5)


def test_unknown_loss_is_refused():
    from train_helpers import make_module

    with pytest.raises(ValueError, match=r"loss='sigmoid' must be one of \('clip', 'siglip'\)"):
        make_module(loss="sigmoid")
