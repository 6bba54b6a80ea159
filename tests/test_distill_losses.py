"""Distillation terms against explicit float64 references (loops over rows and columns), their
gradients (the teacher gets none), the projection for different widths, and the same loss and
gradients on one and two processes."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmformer.losses import FeatureProjection, affinity_distill_loss, feature_distill_loss, interactive_contrastive_loss


def _unit(n, e, g):
    return F.normalize(torch.randn(n, e, generator=g), dim=-1)


def _batch(n=6, e=8, et=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _unit(n, e, g), _unit(n, e, g), _unit(n, et, g), _unit(n, et, g)


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a.double(), b.double()))


def _log_softmax_row(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def ref_affinity(img, txt, s, t_img, t_txt, t):
    n = img.shape[0]
    S = [[s * _dot(img[i], txt[j]) for j in range(n)] for i in range(n)]
    T = [[t * _dot(t_img[i], t_txt[j]) for j in range(n)] for i in range(n)]

    def soft_ce(teacher, student):
        total = 0.0
        for i in range(n):
            p = [math.exp(v) for v in _log_softmax_row(teacher[i])]
            q = _log_softmax_row(student[i])
            total -= sum(pj * qj for pj, qj in zip(p, q))
        return total / n

    transpose = lambda m: [[m[j][i] for j in range(n)] for i in range(n)]  # noqa: E731
    return (soft_ce(T, S) + soft_ce(transpose(T), transpose(S))) / 2


def ref_feature(x, y):
    total = 0.0
    for i in range(x.shape[0]):
        nx, ny = math.sqrt(_dot(x[i], x[i])), math.sqrt(_dot(y[i], y[i]))
        total += sum((float(a) / nx - float(b) / ny) ** 2 for a, b in zip(x[i].double(), y[i].double()))
    return total / x.shape[0]


def ref_interactive(img, txt, t_img, t_txt, s, groups=None):
    n = img.shape[0]

    def ce(queries, keys):
        total = 0.0
        for i in range(n):
            z = [s * _dot(queries[i], keys[j]) for j in range(n) if j == i or groups is None or groups[i] != groups[j]]
            pos = [j for j in range(n) if j == i or groups is None or groups[i] != groups[j]].index(i)
            total -= _log_softmax_row(z)[pos]
        return total / n

    return (ce(img, t_txt) + ce(txt, t_img)) / 2


def test_affinity_distillation_matches_reference_and_is_minimal_at_the_teacher():
    img, txt, t_img, t_txt = _batch(et=5)  # teacher width differs: only similarities are compared
    got = affinity_distill_loss(img, txt, torch.tensor(12.0), t_img, t_txt, torch.tensor(20.0))
    assert got.item() == pytest.approx(ref_affinity(img, txt, 12.0, t_img, t_txt, 20.0), rel=1e-6)
    # a student that reproduces the teacher's logits scores the teacher's own entropy, the minimum
    same = affinity_distill_loss(t_img, t_txt, torch.tensor(20.0), t_img, t_txt, torch.tensor(20.0))
    assert same.item() == pytest.approx(ref_affinity(t_img, t_txt, 20.0, t_img, t_txt, 20.0), rel=1e-6)
    assert same.item() < got.item()


def test_affinity_gradient_reaches_the_student_only():
    img, txt, t_img, t_txt = _batch()
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    t_img, t_txt = t_img.clone().requires_grad_(True), t_txt.clone().requires_grad_(True)
    log_s = torch.tensor(math.log(10.0), requires_grad=True)
    affinity_distill_loss(img, txt, log_s.exp(), t_img, t_txt, torch.tensor(10.0)).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0 and log_s.grad.abs() > 0
    assert t_img.grad is None and t_txt.grad is None


def test_feature_distillation_matches_reference_with_and_without_projection():
    img, _, t_img, _ = _batch(e=8, et=8)
    raw = 3.0 * img  # unnormalised input: the loss normalises
    assert feature_distill_loss(raw, t_img).item() == pytest.approx(ref_feature(raw, t_img), rel=1e-6)
    assert feature_distill_loss(t_img * 2, t_img).item() == pytest.approx(0.0, abs=1e-6)
    s_img, _, t_img, _ = _batch(e=6, et=10, seed=1)
    proj = FeatureProjection(6, 10)
    got = feature_distill_loss(s_img, t_img, proj)
    with torch.no_grad():
        projected = proj(s_img)
    assert got.item() == pytest.approx(ref_feature(projected, t_img), rel=1e-6)
    got.backward()
    assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0
    # orthogonal init keeps the student's angles: cosines between rows are unchanged
    torch.testing.assert_close(
        F.normalize(projected, dim=-1) @ F.normalize(projected, dim=-1).T, s_img @ s_img.T, atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="FeatureProjection"):
        feature_distill_loss(s_img, t_img)


def test_interactive_contrastive_matches_reference():
    img, txt, t_img, t_txt = _batch()
    got = interactive_contrastive_loss(img, txt, t_img, t_txt, torch.tensor(15.0))
    assert got.item() == pytest.approx(ref_interactive(img, txt, t_img, t_txt, 15.0), rel=1e-6)
    groups = torch.tensor([0, 1, 0, 2, 1, 3])
    got_g = interactive_contrastive_loss(img, txt, t_img, t_txt, torch.tensor(15.0), positives=groups)
    assert got_g.item() == pytest.approx(ref_interactive(img, txt, t_img, t_txt, 15.0, groups.tolist()), rel=1e-6)
    assert got_g.item() != pytest.approx(got.item(), rel=1e-3)
    with pytest.raises(ValueError, match="FeatureProjection"):
        interactive_contrastive_loss(img, txt, *_batch(et=5)[2:], torch.tensor(15.0))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terms(img, txt, t_img, t_txt, groups):
    return affinity_distill_loss(
        img, txt, torch.tensor(10.0), t_img, t_txt, torch.tensor(14.0)
    ) + interactive_contrastive_loss(img, txt, t_img, t_txt, torch.tensor(10.0), positives=groups)


def _worker(rank, world, port, img, txt, t_img, t_txt, groups, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = img.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        mine_img, mine_txt = img[sl].clone().requires_grad_(True), txt[sl].clone().requires_grad_(True)
        loss = _terms(mine_img, mine_txt, t_img[sl], t_txt[sl], groups[sl])
        loss.backward()
        out[rank] = (loss.detach(), torch.cat([mine_img.grad, mine_txt.grad]))
    finally:
        dist.destroy_process_group()


def test_gathered_terms_equal_the_single_process_loss_on_two_processes():
    img, txt, t_img, t_txt = _batch(8, 4, 4)
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5])
    full_img, full_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    full = _terms(full_img, full_txt, t_img, t_txt, groups)
    full.backward()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), img, txt, t_img, t_txt, groups, out), nprocs=2, join=True)
    for rank in range(2):
        loss, grads = out[rank]
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)
        # as for clip_loss: every rank computes the global loss, so its rows get world x the
        # gradient, which DDP's mean over ranks undoes
        expect = torch.cat([full_img.grad[rank * 4 : (rank + 1) * 4], full_txt.grad[rank * 4 : (rank + 1) * 4]])
        torch.testing.assert_close(grads / 2, expect, atol=1e-6, rtol=1e-5)
