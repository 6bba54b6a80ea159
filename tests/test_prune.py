"""Head pruning (mmformer.compress.prune, mmformer.training.prune, ``mmformer prune``): removing
nothing is the same model bit for bit; removing a head equals gating it to zero on every route
(shared or per-modality weights, the document expert, sparse text kernels); importance against an
autograd identity, a float64 finite difference and a hand computation; the pruned config and model
round-trip through save_pretrained; recovery through the Trainer against the loss and schedule by
hand; bad inputs are clear errors; the command runs end to end, on the bundled data and on a
user's manifest, and its result loads in the service engine and quantizes to int8."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_data import save_png, write_csv
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader

from mmformer.cli import build_parser, main, run
from mmformer.compress import quantize_int8
from mmformer.compress.prune import (
    head_gates,
    head_importance,
    magnitude_importance,
    normalize_per_block,
    prune_heads,
    select_heads,
)
from mmformer.config import ModelConfig, check_field_types
from mmformer.layers.multiway import MultiwayAttention, each
from mmformer.losses import affinity_distill_loss, clip_loss
from mmformer.model import MMFormer, model_fingerprint
from mmformer.tokenizer import Tokenizer, default_tokenizer_path
from mmformer.training import prune as training_prune
from mmformer.training.distill import DistillModule
from mmformer.training.precision import autocast_for, cache_key
from mmformer.training.prune import pruning_datamodule, recover, scoring_batches

TINY = dict(width=32, depth=3, heads=4, image_size=16, patch_size=8, vocab_size=64, context_length=8, embed_dim=16)
GATE_TOL = 1e-6  # removing a head vs gating it to zero: only the summation order differs


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def tiny(share: str = "qkv", seed: int = 0, **overrides) -> MMFormer:
    torch.manual_seed(seed)
    model = MMFormer(ModelConfig(**{**TINY, "share": share, **overrides})).eval()
    with torch.no_grad():  # biases and norms away from their init, so that slicing them wrongly shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(seed: int = 1, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 16, 16, generator=g)
    ids = torch.randint(4, 64, (b, 8), generator=g)
    mask = torch.ones(b, 8, dtype=torch.bool)
    mask[0, 5:] = False  # one padded caption
    return images, ids, mask


def batch(seed: int = 1, b: int = 4) -> dict:
    images, ids, mask = inputs(seed, b)
    return {"images": images, "input_ids": ids, "attention_mask": mask}


def encode(model: MMFormer, x) -> tuple[torch.Tensor, torch.Tensor]:
    images, ids, mask = x
    with torch.no_grad():
        return model.encode_image(images, normalize=False), model.encode_text(ids, mask, normalize=False)


def gated(model: MMFormer, remove: list[list[int]]):
    """The unpruned model with the heads ``remove`` gated to zero (on every route)."""
    for block, r in zip(model.blocks, remove):
        gate = torch.ones(block.attn.heads)
        gate[r] = 0.0
        block.attn.head_gate = gate
    return model


def ungate(model: MMFormer) -> None:
    for block in model.blocks:
        block.attn.head_gate = None


# ---- config ------------------------------------------------------------------------------------------
def test_block_heads_round_trips_and_old_configs_load(tmp_path):
    c = ModelConfig(**TINY, block_heads=(4, 1, 3))
    assert c.block_heads == [4, 1, 3] and c.heads_per_block == [4, 1, 3] and c.head_dim == 8
    c.to_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["block_heads"] == [4, 1, 3]
    assert ModelConfig.from_json(tmp_path / "c.json") == c
    assert ModelConfig(**TINY).heads_per_block == [4, 4, 4]
    old = json.loads((Path(__file__).parent / "fixtures" / "config-227686d.json").read_text())
    assert "block_heads" not in old and ModelConfig.from_dict(old).block_heads is None


@pytest.mark.parametrize(
    "value, message",
    [
        ([4, 4], r"one entry per block \(depth=3\), got 2"),
        ([4, 0, 4], r"every block keeps 1..heads=4 heads \(blocks \[1\] do not\)"),
        ([4, 5, 4], r"blocks \[1\] do not"),
        ([4, 2.0, 4], "must be a list of ints"),
    ],
)
def test_bad_block_heads_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**TINY, block_heads=value)


@pytest.mark.parametrize("value", ["4,4,4", [4, "4", 4], [True, 4, 4], 4])
def test_block_heads_of_the_wrong_json_type_are_refused(value):
    with pytest.raises(ValueError, match=r"cfg.json: 'block_heads' must be list\[int\] or null"):
        check_field_types({"block_heads": value}, "cfg.json")


def test_unpruned_fingerprint_does_not_hash_block_heads():
    m = tiny()
    d = {k: v for k, v in m.config.to_dict().items() if k != "block_heads"}
    assert "block_heads" in m.config.to_dict()
    twin = tiny()
    twin.config = ModelConfig(**d)
    assert model_fingerprint(m) == model_fingerprint(twin)
    assert model_fingerprint(prune_heads(m, [[], [1], []])) != model_fingerprint(m)


# ---- layers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", ["qkv", "none"])
def test_attention_with_an_inner_width_below_the_model_width(share):
    """3 heads of 8 in a width-32 block: qkv 32 -> 72, proj 24 -> 32, equal to a per-head loop."""
    torch.manual_seed(0)
    attn = MultiwayAttention(32, 3, share, ("image", "text"), head_dim=8)
    for qkv in each(attn.qkv):
        assert tuple(qkv.weight.shape) == (72, 32)
    for proj in each(attn.proj):
        assert tuple(proj.weight.shape) == (32, 24)
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    for modality in ("image", "text"):
        w = attn.qkv[modality] if share == "none" else attn.qkv
        qkv = w(x)
        heads = []
        for h in range(3):
            q, k, v = (qkv[..., part * 24 + h * 8 : part * 24 + (h + 1) * 8] for part in range(3))
            s = q @ k.transpose(1, 2) / 8**0.5
            s = s.masked_fill(~mask[:, None, :], float("-inf"))
            heads.append(s.softmax(-1) @ v)
        want = attn.proj[modality](torch.cat(heads, -1))
        torch.testing.assert_close(attn(x, modality, mask), want, atol=1e-6, rtol=1e-5)


# ---- removing heads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("share", ["qkv", "attention", "all", "none"])
def test_removing_no_heads_is_the_same_model_bit_for_bit(share):
    model = tiny(share)
    for pruned in (prune_heads(model, [[], [], []]), prune_heads(model, 0.0)):
        assert pruned.config == model.config and pruned.config.block_heads is None
        x = inputs()
        for a, b in zip(encode(model, x), encode(pruned, x)):
            assert torch.equal(a, b)
        assert model_fingerprint(pruned) == model_fingerprint(model)


@pytest.mark.parametrize("share", ["qkv", "none", "attention"])
def test_removing_a_head_equals_gating_it_to_zero(share):
    model = tiny(share)
    remove = [[1], [0, 3], []]
    pruned = prune_heads(model, remove)
    assert pruned.config.block_heads == [3, 2, 4]
    assert [b.attn.heads for b in pruned.blocks] == [3, 2, 4]
    assert pruned.num_parameters() < model.num_parameters()
    x = inputs()
    want = encode(gated(model, remove), x)
    ungate(model)
    got = encode(pruned, x)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= GATE_TOL
    # and the gate matters: without it the outputs differ
    assert (encode(model, x)[0] - got[0]).abs().max() > 1e-3


def test_every_route_is_sliced_the_same_way_document_expert_and_sparse_kernels():
    model = tiny("qkv", fusion_latents=2)
    model.enable_document_expert()
    with torch.no_grad():  # the document route's own parts differ from the text route's
        for block in model.blocks:
            block.attn.proj["document"].weight.mul_(1.5)
    remove = [[2], [], [0, 1, 3]]
    pruned = prune_heads(model, remove)
    _, ids, mask = inputs()
    for kind, opts in (("dense", {}), ("local", {"window": 1, "n_global": 1}), ("compressed", {"compression": 2})):
        model.set_text_attention(kind, **opts)
        pruned.set_text_attention(kind, **opts)
        for modality in ("text", "document"):
            with torch.no_grad():
                got = pruned.forward_text_features(ids, mask, modality)
                want = gated(model, remove).forward_text_features(ids, mask, modality)
                ungate(model)
            assert (got - want)[mask].abs().max() <= GATE_TOL, (kind, modality)


@pytest.mark.parametrize(
    "remove, message",
    [
        (1.0, r"fraction of heads to remove must be a number in \[0, 1\), got 1.0"),
        (-0.1, r"must be a number in \[0, 1\)"),
        (0.9, r"removing 0.9 of the heads is 11 of 12, but each of the 3 blocks keeps at least one head: at most 9"),
        ([[0, 1, 2, 3], [], []], r"block 0: removing \[0, 1, 2, 3\] would remove all 4 of its heads"),
        ([[4], [], []], r"block 0 has heads 0..3; cannot remove \[4\]"),
        ([[1, 1], [], []], "listed twice"),
        ([[1], []], r"one list per block \(3 blocks\)"),
    ],
)
def test_bad_removals_are_clear_errors(remove, message):
    with pytest.raises(ValueError, match=message):
        prune_heads(tiny(), remove)


def test_select_heads_ranks_globally_and_keeps_a_head_per_block():
    imp = torch.tensor([[0.1, 0.2, 5.0, 0.3], [9.0, 8.0, 7.0, 6.0], [0.05, 4.0, 4.0, 4.0]])
    # the 4 lowest over all blocks: 0.05 (2,0), 0.1 (0,0), 0.2 (0,1), 0.3 (0,3)
    assert select_heads(imp, 4 / 12, [4, 4, 4]) == [[0, 1, 3], [], [0]]
    # 5 heads: block 0 would be emptied by 5.0, so the next lowest elsewhere (4.0 of block 2) goes
    assert select_heads(imp, 6 / 12, [4, 4, 4]) == [[0, 1, 3], [], [0, 1, 2]]
    pruned_imp = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 0.5, 0.7]])
    assert select_heads(pruned_imp, 0.4, [2, 3]) == [[], [1, 2]]


def test_per_block_normalisation_by_hand_and_its_effect_on_the_ranking():
    nan = float("nan")
    imp = torch.tensor([[3.0, 4.0, nan], [0.0, 0.0, 0.0], [0.01, 0.02, 0.03]])
    got = normalize_per_block(imp)
    assert torch.allclose(got[0, :2], torch.tensor([0.6, 0.8])) and got[0, 2].isnan()
    assert torch.equal(got[1], torch.zeros(3))  # an all-zero block stays zero, no NaN
    assert torch.allclose(got[2], imp[2] / (0.01**2 + 0.02**2 + 0.03**2) ** 0.5)
    # raw scores take both heads from the block whose scores are small overall; normalised, the
    # relatively weakest heads of each block go
    imp = torch.tensor([[1.0, 4.0, 8.0], [0.01, 0.02, 0.03]])
    assert select_heads(imp, 2 / 6, [3, 3]) == [[], [0, 1]]
    assert select_heads(normalize_per_block(imp), 2 / 6, [3, 3]) == [[0], [0]]
    with pytest.raises(ValueError, match=r"\(depth, heads\)"):
        normalize_per_block(torch.ones(3))


def test_a_pruned_model_prunes_again():
    model = tiny()
    once = prune_heads(model, [[0], [1, 2], []])
    imp = magnitude_importance(once)
    assert imp.shape == (3, 4) and imp[0, 3].isnan() and imp[1, 2:].isnan().all() and not imp[2].isnan().any()
    twice = prune_heads(once, 0.25)  # 2 of the 9 heads left
    assert sum(twice.config.block_heads) == 7
    x = inputs()
    assert all(torch.isfinite(t).all() for t in encode(twice, x))


# ---- importance --------------------------------------------------------------------------------------
@pytest.mark.parametrize("share", ["qkv", "none"])
def test_gradient_importance_equals_an_autograd_identity(share):
    """Gate g_h scales head h's columns of every proj Linear, so dL/dg_h = sum over the block's proj
    Linears of <W[:, cols_h], dL/dW[:, cols_h]>: computed here from ordinary weight gradients,
    without any gate, per batch, then |.| averaged over batches."""
    model = tiny(share)
    batches = [batch(1), batch(2)]
    got = head_importance(model, batches, "gradient")
    assert all(p.grad is None for p in model.parameters())  # weight gradients untouched
    want = torch.zeros(3, 4, dtype=torch.float64)
    for b in batches:
        model.zero_grad()
        out = model(b["images"], b["input_ids"], b["attention_mask"])
        clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], gather=False).backward()
        for i, block in enumerate(model.blocks):
            for h in range(4):
                d = sum(
                    (p.weight[:, h * 8 : (h + 1) * 8] * p.weight.grad[:, h * 8 : (h + 1) * 8]).sum()
                    for p in each(block.attn.proj)
                )
                want[i, h] += abs(float(d.detach())) / len(batches)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    assert float(want.min()) > 0


def test_gradient_importance_equals_a_float64_finite_difference():
    model = tiny().double()
    b = {k: v.double() if v.is_floating_point() else v for k, v in batch(3).items()}
    got = head_importance(model, [b], "gradient").double()
    eps = 1e-4

    def loss_at(i: int, h: int, g: float) -> float:
        gates = [torch.ones(blk.attn.heads, dtype=torch.float64) for blk in model.blocks]
        gates[i][h] = g
        for blk, gate in zip(model.blocks, gates):
            blk.attn.head_gate = gate
        with torch.no_grad():
            out = model(b["images"], b["input_ids"], b["attention_mask"])
            logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T  # float64 CLIP loss
            labels = torch.arange(logits.shape[0])
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        ungate(model)
        return float(loss)

    for i, h in ((0, 0), (1, 2), (2, 3)):
        fd = (loss_at(i, h, 1 + eps) - loss_at(i, h, 1 - eps)) / (2 * eps)
        assert got[i, h] == pytest.approx(abs(fd), rel=1e-4, abs=1e-9)


def test_gradient_importance_needs_batches_and_a_known_criterion():
    with pytest.raises(ValueError, match="the gradient criterion needs batches"):
        head_importance(tiny(), None, "gradient")
    with pytest.raises(ValueError, match=r"criterion='taylor' must be one of \('gradient', 'magnitude'\)"):
        head_importance(tiny(), [batch()], "taylor")
    with pytest.raises(ValueError, match="at least 2 pairs"):
        head_importance(tiny(), [batch(b=1)], "gradient")


def test_head_gates_are_removed_afterwards_even_on_error():
    model = tiny()
    with pytest.raises(RuntimeError, match="boom"), head_gates(model) as gates:
        assert all(b.attn.head_gate is g for b, g in zip(model.blocks, gates))
        raise RuntimeError("boom")
    assert all(b.attn.head_gate is None for b in model.blocks)


@pytest.mark.parametrize("share", ["qkv", "none"])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_magnitude_importance_by_hand(share, p):
    model = tiny(share)
    got = head_importance(model, criterion="magnitude", p=p)
    for i, block in enumerate(model.blocks):
        for h in range(4):
            total = 0.0
            for qkv in each(block.attn.qkv):
                rows = [part * 32 + h * 8 + j for part in range(3) for j in range(8)]
                total += sum(abs(float(w)) ** p for w in qkv.weight[rows].flatten()) ** (1 / p)
            for proj in each(block.attn.proj):
                total += sum(abs(float(w)) ** p for w in proj.weight[:, h * 8 : (h + 1) * 8].flatten()) ** (1 / p)
            assert float(got[i, h]) == pytest.approx(total, rel=1e-5)


# ---- saving, recovery --------------------------------------------------------------------------------
def test_a_pruned_model_round_trips_through_save_pretrained(tmp_path):
    pruned = prune_heads(tiny(), [[3], [0, 1, 2], [1]])
    pruned.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["block_heads"] == [3, 1, 3]
    loaded = MMFormer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == pruned.config and model_fingerprint(loaded) == model_fingerprint(pruned)
    x = inputs()
    for a, b in zip(encode(pruned, x), encode(loaded, x)):
        assert torch.equal(a, b)
    # a config.json whose block_heads do not fit the weights is refused, naming the shapes
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["block_heads"] = None
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors does not fit this model: .*blocks.0.attn.qkv.weight"):
        MMFormer.from_pretrained(tmp_path / "m")


class Batches(L.LightningDataModule):
    """The given batches as the training data, in order, epoch after epoch."""

    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)  # each item is a batch already


def by_hand_loss(student: MMFormer, teacher: MMFormer, b: dict) -> torch.Tensor:
    """CLIP loss + affinity distillation of one batch, the teacher's embeddings as DistillModule
    takes them (float32, normalised)."""
    s = student(b["images"], b["input_ids"], b["attention_mask"])
    with torch.no_grad():
        t_img = F.normalize(teacher.encode_image(b["images"]).float(), dim=-1)
        t_txt = F.normalize(teacher.encode_text(b["input_ids"], b["attention_mask"]).float(), dim=-1)
        t_scale = teacher.logit_scale.float().exp().clamp(max=teacher.config.logit_scale_max)
    return clip_loss(s["image_embeds"], s["text_embeds"], s["logit_scale"], gather=False) + affinity_distill_loss(
        s["image_embeds"], s["text_embeds"], s["logit_scale"], t_img, t_txt, t_scale, gather=False
    )


def test_recover_distills_from_the_frozen_teacher():
    teacher = tiny()
    student = prune_heads(teacher, [[0], [1], [2]])
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_state = {k: v.clone() for k, v in student.state_dict().items()}
    batches = [batch(1), batch(2)]
    with torch.no_grad():
        want = by_hand_loss(student, teacher, batches[0])
    seen = []
    got = recover(student, teacher, Batches(batches), 3, lr=1e-3, on_step=lambda step, loss: seen.append((step, loss)))
    assert got is student and [s for s, _ in seen] == [1, 2, 3]
    assert seen[0][1] == pytest.approx(float(want), rel=1e-5)
    assert all(math.isfinite(loss) for _, loss in seen)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert not teacher.training and not student.training  # modes kept
    assert all(p.requires_grad for p in teacher.parameters())  # given back as it came
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in student_state.items())
    assert all(p.grad is None for p in student.parameters())
    assert recover(student, teacher, Batches(batches), 0) is student
    with pytest.raises(ValueError, match="recovery ran 0 of 2 steps: the training data gave no batches"):
        recover(student, teacher, Batches([]), 2)
    with pytest.raises(ValueError, match=r"precision 'fp16' must be one of \['auto', '32-true', 'bf16-mixed'\]"):
        recover(student, teacher, Batches(batches), 1, precision="fp16")
    with pytest.raises(ValueError, match="recovery steps must be an int >= 0, got -1"):
        recover(student, teacher, Batches(batches), -1)


def test_recover_decays_the_learning_rate_on_a_cosine_and_clips():
    """Each step's learning rate, read from the optimizer inside the step: lr (1 + cos(pi k / n)) / 2
    for the default cosine, lr throughout with min_lr_ratio=1; the AdamW groups are the project's
    (decay on weight matrices only); gradients are clipped to max_grad_norm."""
    teacher = tiny()
    for kw, want in (
        ({}, [1e-3 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]),
        ({"min_lr_ratio": 1.0}, [1e-3] * 4),
    ):
        student = prune_heads(teacher, [[0], [], []])
        seen, norms = [], []

        def pre_step(opt, args, kwargs, seen=seen):
            seen.append(opt.param_groups[0]["lr"])
            assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
            assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])

        class GradNorm(L.Callback):  # after the step: the gradients it used, clipped
            def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx, norms=norms):
                norms.append(
                    float(
                        torch.linalg.vector_norm(
                            torch.stack([p.grad.norm() for p in pl_module.parameters() if p.grad is not None])
                        )
                    )
                )

        hook = register_optimizer_step_pre_hook(pre_step)
        try:
            recover(student, teacher, Batches([batch(1)]), 4, lr=1e-3, max_grad_norm=0.01, callbacks=[GradNorm()], **kw)
        finally:
            hook.remove()
        assert seen == pytest.approx(want, rel=1e-12), kw
        assert len(norms) == 4 and max(norms) <= 0.01 * (1 + 1e-4)


def test_recover_under_bf16_mixed_keeps_fp32_weights():
    """The first step's loss equals the same forward computed by hand under bf16 autocast (the
    teacher too); the weights stay fp32, the teacher is untouched."""
    teacher = tiny()
    student = prune_heads(teacher, [[0], [], [3]])
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    b = batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # with gradients, as in training (attention's kernel)
        want = by_hand_loss(student, teacher, b)
    with torch.no_grad():
        fp32 = by_hand_loss(student, teacher, b)
    assert float(want) != pytest.approx(float(fp32), rel=1e-6)  # the reference really is bf16
    seen, norms = [], []

    class GradNorm(L.Callback):  # Lightning refuses to clip for a fused optimizer under mixed precision
        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            norms.append(
                float(
                    torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in pl_module.parameters() if p.grad is not None])
                    )
                )
            )

    recover(
        student,
        teacher,
        Batches([b]),
        2,
        lr=1e-3,
        precision="bf16-mixed",
        max_grad_norm=0.01,
        on_step=lambda step, loss: seen.append(loss),
        callbacks=[GradNorm()],
    )
    assert seen[0] == pytest.approx(float(want), rel=1e-5)
    assert len(norms) == 2 and max(norms) <= 0.01 * (1 + 1e-3)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_the_recovery_precision_names_and_auto(tmp_path, monkeypatch):
    """``autocast_for``: the named precisions map to their autocast dtype; ``auto`` times the
    model on the batch (here: a measurement already cached for this CPU, model and batch size)."""
    monkeypatch.setenv("MMFORMER_CACHE", str(tmp_path))
    model, b = tiny(), batch(1)
    assert autocast_for("32-true") == (None, None)
    assert autocast_for("bf16-mixed") == (torch.bfloat16, None)
    with pytest.raises(ValueError, match="precision 'fp16' must be auto or one of"):
        autocast_for("fp16")
    with pytest.raises(ValueError, match="auto needs the model and one image-text batch"):
        autocast_for("auto", model)
    key = cache_key(model, b["images"].shape[0])
    for times, want in (
        ({"32-true": 0.05, "bf16-mixed": 0.01}, torch.bfloat16),
        ({"32-true": 0.01, "bf16-mixed": 0.05}, None),
    ):
        (tmp_path / "precision.json").write_text(json.dumps({key: times}))
        dtype, choice = autocast_for("auto", model, b)
        assert dtype == want and choice.cached and choice.seconds_per_step == times


# ---- the command, the service, int8 --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = Tokenizer.load(default_tokenizer_path())
    torch.manual_seed(0)
    model = MMFormer(ModelConfig(**{**TINY, "vocab_size": tok.vocab_size}), tok).eval()
    path = tmp_path_factory.mktemp("prune") / "model"
    model.save_pretrained(path)
    return path


def test_the_prune_command_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = [
        "prune",
        "--model",
        str(tiny_dir),
        "--heads",
        "0.25",
        "--out",
        str(out),
        "--batches",
        "1",
        "--batch-size",
        "8",
        "--recover",
        "2",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"loaded {tiny_dir}: ") and "heads per block [4, 4, 4]" in lines[0]
    assert any(line.startswith("data: 1 batches of 8 pairs from the emoji training split in ") for line in lines)
    assert "scored 12 heads by gradient on 1 batches, normalised per block" in lines
    removed = [line for line in lines if line.startswith("block ")]
    assert len(removed) == 3
    assert any(line.startswith("parameters: ") and "fewer" in line for line in lines)
    # the recovery's precision was measured (auto, the default) and said in one line
    assert len([line for line in lines if line.startswith("recovery precision auto -> ")]) == 1
    # one summary line for the recovery (the per-step progress is a bar on stderr)
    summary = [line for line in lines if line.startswith("recovery: loss ")]
    assert len(summary) == 1, summary
    assert "at step 2 (1 epoch of 760 batches from the emoji training split" in summary[0]
    assert lines[-1].startswith(f"wrote {out}")
    pruned = MMFormer.from_pretrained(out)
    assert sum(pruned.config.heads_per_block) == 9 and pruned.tokenizer is not None
    # an existing folder is refused without --overwrite; bad fractions are one line, before any work
    assert run(args) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    for frac in ("1.5", "0.9"):
        assert (
            run(
                [
                    "prune",
                    "--model",
                    str(tiny_dir),
                    "--heads",
                    frac,
                    "--out",
                    str(tmp_path / "x"),
                    "--criterion",
                    "magnitude",
                ]
            )
            == 1
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmformer prune: ") and ("[0, 1)" in err[0] or "at most 9" in err[0])
    assert not (tmp_path / "x").exists()
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_dir),
                "--heads",
                "0.5",
                "--out",
                str(out),
                "--overwrite",
                "--criterion",
                "magnitude",
            ]
        )
        == 0
    )
    assert sum(MMFormer.from_pretrained(out).config.heads_per_block) == 6


COLOURS = {
    "red": (220, 30, 30, 255),
    "green": (30, 200, 60, 255),
    "blue": (40, 60, 230, 255),
    "yellow": (240, 220, 40, 255),
    "black": (10, 10, 10, 255),
    "white": (250, 250, 250, 255),
}


@pytest.fixture
def colour_manifest(tmp_path) -> tuple[Path, list[str]]:
    """A user's CSV manifest: six solid-colour PNGs (relative paths) with captions, in columns
    named ``file`` and ``text``."""
    captions = [f"a {name} square" for name in COLOURS]
    for name, colour in COLOURS.items():
        save_png(tmp_path / "pics" / f"{name}.png", colour, size=(20, 20))
    rows = [[f"pics/{name}.png", caption] for name, caption in zip(COLOURS, captions)]
    return write_csv(tmp_path / "pairs.csv", ["file", "text"], rows), captions


def test_the_prune_command_on_a_user_manifest(tiny_dir, colour_manifest, tmp_path, capsys, monkeypatch):
    """``mmformer prune --data MANIFEST``: the heads are scored and the recovery trains on the
    manifest's pairs (every caption the recovery sees is one of the manifest's, all of them are
    seen), the result has fewer heads and loads."""
    manifest, captions = colour_manifest
    seen: list[str] = []
    training_loss = DistillModule.training_loss

    def record(self, batch):
        seen.extend(batch["captions"])
        return training_loss(self, batch)

    monkeypatch.setattr(DistillModule, "training_loss", record)
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_dir),
                "--heads",
                "0.25",
                "--out",
                str(out),
                "--data",
                str(manifest),
                "--image-col",
                "file",
                "--caption-col",
                "text",
                "--batches",
                "4",
                "--batch-size",
                "3",
                "--recover",
                "5",
                "--precision",
                "32-true",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert f"data: 2 batches of 3 pairs from the manifest {manifest}" in lines  # 6 pairs: 2 batches, not 4
    summary = [line for line in lines if line.startswith("recovery: loss ")]
    assert len(summary) == 1 and summary[0].endswith(f"at step 5 (3 epochs of 2 batches from the manifest {manifest})")
    first, last = (float(x) for x in re.findall(r"loss (\S+) at step 1, (\S+) at step 5", summary[0])[0])
    assert math.isfinite(first) and math.isfinite(last)
    assert len(seen) == 5 * 3 and set(seen) == set(captions)
    pruned = MMFormer.from_pretrained(out)
    assert sum(pruned.config.heads_per_block) == 9
    assert all(torch.isfinite(t).all() for t in encode(pruned.eval(), inputs()))


def test_prune_data_flags_are_exact_and_exclusive(tiny_dir, colour_manifest, tmp_path, capsys):
    manifest, _ = colour_manifest
    parser = build_parser("prune")  # the table declares the flags of the verb it is given
    with pytest.raises(SystemExit):  # no abbreviations: --data-d is not --data-dir, --shard not --shards
        parser.parse_args(["prune", "--model", "m", "--heads", "0.1", "--out", "o", "--shard", "x.tar"])
    assert capsys.readouterr().err.strip().endswith("unrecognized arguments: --shard x.tar")
    args = parser.parse_args(["prune", "--model", "m", "--heads", "0.1", "--out", "o", "--data", "x.csv"])
    assert args.data == "x.csv" and args.data_dir is None
    base = ["prune", "--model", str(tiny_dir), "--heads", "0.25", "--out", str(tmp_path / "o")]
    for extra, message in (
        (["--data", str(manifest), "--shards", "s-{0..1}.tar"], "two sources of training pairs"),
        (["--data", str(manifest), "--data-dir", str(tmp_path)], "--data MANIFEST replaces"),
        (["--data", str(tmp_path / "missing.csv")], "missing.csv"),
    ):
        assert run(base + extra) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmformer prune: ") and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_scoring_batches_come_from_the_data_module(tiny_dir):
    model = MMFormer.from_pretrained(tiny_dir)
    dm = pruning_datamodule(model, batch_size=8)
    state = torch.random.get_rng_state()
    batches = scoring_batches(dm, 2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(batches) == 2 and batches[0]["images"].shape == (8, 3, 16, 16)
    assert batches[0]["input_ids"].shape[1] <= 8 and "concepts" in batches[0]
    # the training loader's first batches, in its seeded order, the same on every call
    first = next(iter(dm.train_dataloader()))
    assert torch.equal(batches[0]["indices"], first["indices"])
    assert torch.equal(scoring_batches(dm, 1)[0]["indices"], first["indices"])
    assert not torch.equal(batches[0]["indices"], batches[1]["indices"])
    with pytest.raises(ValueError, match=r"need batch_size >= 2 \(contrastive pairs\), got 1"):
        pruning_datamodule(model, batch_size=1)
    with pytest.raises(ValueError, match="need n_batches >= 1, got 0"):
        scoring_batches(dm, 0)
    with pytest.raises(ValueError, match="a manifest .* or shards .*, not both"):
        pruning_datamodule(model, data="a.csv", shards="b.tar")
    assert training_prune.PRECISIONS == ("auto", "32-true", "bf16-mixed")


def test_the_service_engine_and_int8_take_a_pruned_model(tiny_dir, tmp_path):
    from mmformer.serve.engine import Engine

    pruned = prune_heads(MMFormer.from_pretrained(tiny_dir), [[0, 1], [], [3]])
    pruned.save_pretrained(tmp_path / "p")
    engine = Engine.load(tmp_path / "p")
    images, ids, mask = inputs()
    ids = ids.clamp(max=pruned.config.vocab_size - 1)
    texts = ["a red apple", "dog face"]
    got = engine.encode_text_batch([engine.prepare_text(t, "text") for t in texts])
    with torch.no_grad():
        for t, z in zip(texts, got):
            assert torch.allclose(torch.from_numpy(z), pruned.encode_texts([t])[0], atol=1e-6)
        img = torch.from_numpy(engine.encode_image_batch(list(images))[0])
        assert torch.allclose(img, pruned.encode_image(images[:1])[0], atol=1e-6)
    q = quantize_int8(pruned.eval())
    with torch.no_grad():
        cos_i = F.cosine_similarity(q.encode_image(images), pruned.encode_image(images))
        cos_t = F.cosine_similarity(q.encode_text(ids, mask), pruned.encode_text(ids, mask))
    assert float(cos_i.min()) > 0.98 and float(cos_t.min()) > 0.98
    assert model_fingerprint(q) == model_fingerprint(pruned)
