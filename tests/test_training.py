"""A short Lightning run on a slice of the bundled emoji data learns: held-out-family recall
far above chance. Also the optimizer groups and schedule."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmformer.data.collate import ImageTextCollator
from mmformer.data.emoji import EmojiData, InMemoryImageText, default_data_dir
from mmformer.retrieval import embed_images, embed_texts, retrieval_metrics
from mmformer.retrieval.metrics import concept_retrieval_metrics
from mmformer.training.module import MMFormerModule
from mmformer.training.optim import parameter_groups, warmup_cosine
from mmformer.training.trainer import make_trainer

N_CONCEPTS = 150
SIZE = 32


@pytest.fixture(scope="module")
def emoji_slice():
    try:
        root = default_data_dir()
    except FileNotFoundError:
        pytest.skip("bundled emoji data not present")
    train = EmojiData.load(root, "train", SIZE)
    test = EmojiData.load(root, "test", SIZE)
    keep = set(train.concept_hexcodes[:N_CONCEPTS])
    train = train.subset([i for i, h in enumerate(train.hexcodes) if h in keep])
    test = test.subset([i for i, h in enumerate(test.hexcodes) if h in keep])
    return train, test


def test_short_run_reaches_recall_far_above_chance(emoji_slice, tmp_path):
    train, test = emoji_slice
    L.seed_everything(0, verbose=False)
    module = MMFormerModule(
        preset="tiny",
        lr=2e-3,
        warmup_steps=20,
        model_config=dict(width=128, depth=3, heads=4, image_size=SIZE, patch_size=8, embed_dim=128),
    )
    train_ds = InMemoryImageText(train, train=True)
    collate = ImageTextCollator(module.tokenizer, max_length=16, batch_transform=train_ds.batch_transform)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, drop_last=True, collate_fn=collate)
    trainer = make_trainer(max_steps=200, default_root_dir=tmp_path)
    trainer.fit(module, loader)

    model = module.model.eval()
    ds = InMemoryImageText(test, train=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    m = retrieval_metrics(
        embed_images(model, images), embed_texts(model, model.tokenizer, ds.captions), ds.caption_to_image
    )
    chance = m["t2i_chance_R@1"]
    assert chance == pytest.approx(100 / len(test))
    # measured: 63% t2i R@1 on this slice (chance 0.67%); require ten times chance
    assert m["t2i_R@1"] > 10 * chance, m
    assert m["i2t_R@1"] > 10 * chance, m


def test_concept_metrics_count_any_image_of_the_concept():
    # two concepts, 3 images: concept 0 has images 0 and 2
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    image = torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    m = concept_retrieval_metrics(image, text, torch.tensor([0, 1, 0]))
    assert m["n_texts"] == 2 and m["n_images"] == 3
    assert m["t2i_R@1"] == 100.0  # "concept 0" finds image 2 first, which counts
    assert m["i2t_R@1"] == pytest.approx(100 * 2 / 3)  # image 0 is closer to concept 1's caption


def test_parameter_groups_exempt_norms_biases_embeddings_and_scale():
    module = MMFormerModule(preset="tiny", model_config=dict(width=32, depth=1, heads=2, embed_dim=16))
    decay, no_decay = parameter_groups(module.model)
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay)
    exempt = {names[id(p)] for p in no_decay}
    assert {"logit_scale", "token_embed.weight", "cls_token"} <= exempt
    assert "blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay}
    assert len(decay) + len(no_decay) == len(list(module.model.parameters()))


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(200, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(warmup_cosine(10, 10, 100), 1.0)


def test_time_budget_schedule_follows_the_clock(monkeypatch):
    import mmformer.training.optim as mod

    now = [100.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    factor = mod.TimeCosine(warmup=2, budget_s=60.0)
    assert factor(0) == pytest.approx(0.5)  # warmup by steps; the clock starts here
    now[0] += 30.0
    assert factor(10) == pytest.approx(0.5)  # half the budget: half-way down the cosine
    now[0] += 30.0
    assert factor(20) == pytest.approx(0.0, abs=1e-12)
    now[0] += 30.0
    assert factor(30) == pytest.approx(0.0, abs=1e-12)  # past the budget: stays at the floor


def test_time_budget_clock_restarts_when_training_starts(monkeypatch):
    """Work between configure_optimizers and training (a state cache built in on_fit_start)
    must not eat the wall-clock budget: the clock restarts when training starts (the module's
    own ScheduleClock callback), as Trainer's max_time does, but not when resuming past step 0."""
    from types import SimpleNamespace

    import mmformer.training.optim as mod
    from mmformer.training.callbacks import ScheduleClock

    now = [100.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    module = MMFormerModule(
        preset="tiny", model_config=dict(width=32, depth=1, heads=2, embed_dim=16), time_budget_s=60.0, warmup_steps=1
    )
    clocks = [c for c in module.configure_callbacks() if isinstance(c, ScheduleClock)]
    assert len(clocks) == 1  # the module registers it itself
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]  # the clock starts at 100
    trainer = SimpleNamespace(global_step=0, lr_scheduler_configs=[SimpleNamespace(scheduler=sched)])
    now[0] += 45.0  # e.g. on_fit_start builds a cache
    clocks[0].on_train_start(trainer, module)
    now[0] += 30.0
    assert sched.lr_lambdas[0](5) == pytest.approx(0.5)  # restarted at 145: half the budget gone at 175
    trainer.global_step = 7  # resumed: leave the clock alone
    clocks[0].on_train_start(trainer, module)
    now[0] += 30.0
    assert sched.lr_lambdas[0](8) == pytest.approx(0.0, abs=1e-12)


def test_adamw_is_fused_for_plain_cpu_parameters_and_updates_as_the_default():
    from mmformer.training.optim import fused_supported, make_adamw

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    groups = [{"params": list(a.parameters()), "weight_decay": 0.1}]
    fused = make_adamw(groups, lr=1e-2)
    plain = torch.optim.AdamW([{"params": list(b.parameters()), "weight_decay": 0.1}], lr=1e-2)
    assert fused.defaults["fused"] and fused_supported(groups)
    for _ in range(3):
        x = torch.randn(5, 8)
        for m, opt in ((a, fused), (b, plain)):
            m(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert not fused_supported(
        [{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)]}]
    )
