"""CLIP InfoNCE: value against a plain reference, concept masking, and gathering across ranks."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from train_helpers import free_port

from mmformer.losses import clip_loss


def reference_loss(img, txt, scale, positives=None):
    """Symmetric cross-entropy written out with explicit sums, float64."""
    img, txt = img.double(), txt.double()
    n = img.shape[0]
    logits = scale * img @ txt.T
    total = 0.0
    for direction in (logits, logits.T):
        for i in range(n):
            allowed = [j for j in range(n) if positives is None or j == i or positives[i] != positives[j]]
            denom = sum(math.exp(direction[i, j]) for j in allowed)
            total += -(direction[i, i].item() - math.log(denom))
    return total / (2 * n)


def test_clip_loss_matches_reference():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    got = clip_loss(img, txt, torch.tensor(10.0))
    assert got.item() == pytest.approx(reference_loss(img, txt, 10.0), rel=1e-5)


def test_same_concept_pairs_are_not_negatives():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    concepts = torch.tensor([0, 1, 0, 2, 1, 3])
    got = clip_loss(img, txt, torch.tensor(10.0), positives=concepts)
    assert got.item() == pytest.approx(reference_loss(img, txt, 10.0, concepts.tolist()), rel=1e-5)
    assert got.item() < clip_loss(img, txt, torch.tensor(10.0)).item()


def _worker(rank, world, port, img, txt, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = img.shape[0] // world
        mine_img = img[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        mine_txt = txt[rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss = clip_loss(mine_img, mine_txt, torch.tensor(10.0))
        loss.backward()
        # gradients summed over ranks (what DDP averages into every replica, times world)
        grads = torch.cat([mine_img.grad, mine_txt.grad])
        out[rank] = (loss.detach(), grads)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_sees_every_ranks_negatives_and_routes_gradients():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 4), dim=-1), F.normalize(torch.randn(8, 4), dim=-1)
    full_img, full_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    full = clip_loss(full_img, full_txt, torch.tensor(10.0))
    full.backward()

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), img, txt, out), nprocs=2, join=True)
    for rank in range(2):
        loss, grads = out[rank]
        # every rank computes the loss of the whole global batch (negatives from both ranks)
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)
        # each rank's local embeddings get world * the global gradient; DDP's mean undoes the factor
        n = 4
        expect = torch.cat([full_img.grad[rank * n : (rank + 1) * n], full_txt.grad[rank * n : (rank + 1) * n]])
        torch.testing.assert_close(grads / 2, expect, atol=1e-6, rtol=1e-5)
