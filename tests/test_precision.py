"""``--precision auto`` decides by measurement: the decision logic with a fake timer, the cache,
and one real measurement on the tiny model."""

import pytest
import torch
import yaml

from mmformer.config import get_config
from mmformer.model import MMFormer
from mmformer.training.precision import (
    PrecisionChoice,
    choose_precision,
    pick_fastest,
    time_steps,
    train_step,
    training_step,
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_steps(clock, seconds, calls):
    """make_step stand-in: each step of precision p advances the clock by seconds[p]."""

    def make_step(model, images, ids, mask, precision):
        calls.append(precision)

        def step():
            clock.now += seconds[precision]

        return step

    return make_step


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = MMFormer(get_config("tiny", vocab_size=64))
    images = torch.randn(4, 3, 64, 64)
    ids = torch.randint(3, 64, (4, 8))
    return model, images, ids, torch.ones_like(ids, dtype=torch.bool)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "seconds,expect",
    [
        ({"32-true": 0.010, "bf16-mixed": 0.017}, "32-true"),  # tiny on an AMX CPU
        ({"32-true": 0.040, "bf16-mixed": 0.021}, "bf16-mixed"),  # small on an AMX CPU
        ({"32-true": 0.020, "bf16-mixed": 0.020}, "32-true"),  # a tie keeps fp32
        ({"32-true": 0.020, "bf16-mixed": 0.0195}, "32-true"),  # within 5%: noise, keep fp32
    ],
)
def test_the_faster_measured_precision_wins(tiny, seconds, expect):
    clock, calls = FakeClock(), []
    choice = choose_precision(*tiny, steps=3, warmup=2, timer=clock, make_step=fake_steps(clock, seconds, calls))
    assert choice.precision == expect
    assert choice.seconds_per_step == pytest.approx(seconds)
    assert calls == ["32-true", "bf16-mixed"]
    assert choice.reason().startswith(f"precision auto -> {expect}: fastest training step on this CPU")


def test_choice_is_cached_per_config_and_batch(tiny, cache_dir):
    clock, calls = FakeClock(), []
    seconds = {"32-true": 0.03, "bf16-mixed": 0.01}
    first = choose_precision(*tiny, timer=clock, make_step=fake_steps(clock, seconds, calls))
    assert (cache_dir / "precision.json").is_file() and not first.cached
    again = choose_precision(
        *tiny, timer=clock, make_step=fake_steps(clock, {"32-true": 0.01, "bf16-mixed": 0.03}, calls)
    )
    assert again.cached and again.precision == "bf16-mixed" and len(calls) == 2  # nothing re-measured
    assert "(cached measurement)" in again.reason()
    model, images, ids, mask = tiny
    other = choose_precision(
        model,
        images[:2],
        ids[:2],
        mask[:2],
        timer=clock,
        make_step=fake_steps(clock, {"32-true": 0.01, "bf16-mixed": 0.03}, calls),
    )
    assert not other.cached and other.precision == "32-true"  # another batch size is measured anew
    fresh = choose_precision(
        *tiny, use_cache=False, timer=clock, make_step=fake_steps(clock, {"32-true": 0.01, "bf16-mixed": 0.03}, calls)
    )
    assert not fresh.cached and fresh.precision == "32-true"


def test_time_steps_takes_the_median_after_warmup():
    clock = FakeClock()
    durations = iter([5.0, 5.0, 0.1, 0.3, 0.2])  # two slow warm-up steps, then three timed

    def step():
        clock.now += next(durations)

    assert time_steps(step, steps=3, warmup=2, timer=clock) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        time_steps(step, steps=0, warmup=0)


def test_a_far_slower_candidate_is_stopped_after_two_slow_rounds(tiny):
    """Emulated bf16 on an AVX2-only CPU (18x fp32): timed for 3 rounds, not 8; fp32 still 8."""
    clock, made, stepped = FakeClock(), [], []
    seconds = {"32-true": 0.4, "bf16-mixed": 7.6}

    def make_step(model, images, ids, mask, precision):
        made.append(precision)

        def step():
            stepped.append(precision)
            clock.now += seconds[precision] * (3 if stepped.count(precision) == 1 else 1)  # slow first call

        return step

    choice = choose_precision(*tiny, steps=5, warmup=3, timer=clock, make_step=make_step)
    assert choice.precision == "32-true"
    assert stepped.count("bf16-mixed") == 3 and stepped.count("32-true") == 8
    assert choice.seconds_per_step == pytest.approx(seconds)  # the stopped one: its warm calls
    assert choice.stopped == ("bf16-mixed",)
    assert "bf16-mixed 7600 ms (stopped early: over 3x the fastest)" in choice.reason()
    cached = choose_precision(*tiny, steps=5, warmup=3, timer=clock, make_step=make_step)
    assert cached.cached and cached.stopped == ("bf16-mixed",) and "stopped early" in cached.reason()
    # within the factor (2x) both are timed to the end
    clock, stepped[:] = FakeClock(), []
    seconds.update({"bf16-mixed": 0.8})
    choice = choose_precision(*tiny, steps=5, warmup=3, use_cache=False, timer=clock, make_step=make_step)
    assert stepped.count("bf16-mixed") == 8 and choice.stopped == ()


def test_one_slow_warm_up_call_does_not_stop_a_candidate(tiny):
    """Seen on an AMX Xeon: fp32's second call took 398 ms (4.6x the bf16 step), its warm steps
    129 ms. The old one-slow-round rule stopped it there and reported 398 ms."""
    clock, stepped = FakeClock(), []
    calls = {"32-true": [0.2, 0.398] + [0.129] * 6, "bf16-mixed": [0.15] + [0.087] * 7}

    def make_step(model, images, ids, mask, precision):
        def step():
            stepped.append(precision)
            clock.now += calls[precision][stepped.count(precision) - 1]

        return step

    choice = choose_precision(*tiny, steps=5, warmup=3, use_cache=False, timer=clock, make_step=make_step)
    assert stepped.count("32-true") == 8 and choice.stopped == ()
    assert choice.seconds_per_step == pytest.approx({"32-true": 0.129, "bf16-mixed": 0.087})
    assert choice.precision == "bf16-mixed" and "32-true 129 ms" in choice.reason()


def test_time_interleaved_refuses_a_drop_factor_of_one_or_less():
    from mmformer.training.precision import time_interleaved

    with pytest.raises(ValueError, match="drop_slower must be > 1"):
        time_interleaved({"a": lambda: None}, steps=1, warmup=0, drop_slower=1.0)


def test_bad_candidates_and_empty_measurements_are_refused(tiny):
    with pytest.raises(ValueError, match=r"unknown precision\(s\) \['16-mixed'\]"):
        choose_precision(*tiny, candidates=("32-true", "16-mixed"))
    with pytest.raises(ValueError, match="no precision was measured"):
        pick_fastest({})


def test_a_real_step_trains_a_copy_and_leaves_the_model_alone(tiny):
    model, images, ids, mask = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = training_step(model, images, ids, mask, "32-true")
    step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    choice = choose_precision(model, images, ids, mask, steps=1, warmup=0, use_cache=False)
    assert isinstance(choice, PrecisionChoice) and set(choice.seconds_per_step) == {"32-true", "bf16-mixed"}
    assert choice.precision == pick_fastest(choice.seconds_per_step)
    assert all(s > 0 for s in choice.seconds_per_step.values())


def test_train_step_returns_the_loss_and_applies_one_optimizer_step():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(5, 3)
    step = train_step(lambda inputs, scale: scale * layer(inputs).pow(2).mean(), opt, "32-true")
    loss = step(x, 2.0)
    ref_w, ref_b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    ref_loss = 2.0 * torch.nn.functional.linear(x, ref_w, ref_b).pow(2).mean()
    ref_loss.backward()
    assert not loss.requires_grad and torch.allclose(loss, ref_loss.detach())
    assert torch.allclose(layer.weight, w0 - 0.1 * ref_w.grad) and torch.allclose(layer.bias, b0 - 0.1 * ref_b.grad)
    assert layer.weight.grad is None and layer.bias.grad is None  # cleared for the next step


def test_train_step_runs_the_loss_under_the_precision_autocast():
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    seen = []

    def loss_of(x):
        y = layer(x)
        seen.append(y.dtype)
        return y.float().sum()

    x = torch.randn(2, 4)
    train_step(loss_of, opt, "bf16-mixed")(x)
    train_step(loss_of, opt, "32-true")(x)
    assert seen == [torch.bfloat16, torch.float32]
    with pytest.raises(ValueError, match="precision 'fp16' is not one of"):
        train_step(loss_of, opt, "fp16")


def test_interleaved_timing_is_not_biased_by_a_machine_that_slows_down(tiny):
    """Two equally fast precisions on a machine that gets slower with every step (another process
    starting): timed one after the other the second would look 2x slower; interleaved they tie."""
    clock = FakeClock()
    n = {"steps": 0}

    def make_step(model, images, ids, mask, precision):
        def step():
            n["steps"] += 1
            clock.now += 0.01 * n["steps"]

        return step

    choice = choose_precision(*tiny, steps=5, warmup=3, use_cache=False, timer=clock, make_step=make_step)
    t = choice.seconds_per_step
    assert t["bf16-mixed"] / t["32-true"] == pytest.approx(1.0, abs=0.1)
    assert choice.precision == "32-true"


TINY_RECIPE = (
    "trainer:\n  precision: auto\n  max_steps: 3\n  logger: false\n  enable_checkpointing: false\n"
    "model:\n  preset: tiny\n  model_config: {width: 32, depth: 1, heads: 2, embed_dim: 16}\n"
    "data:\n  batch_size: 4\n"
)


@pytest.fixture
def measured(monkeypatch):
    """RecipeCLI's precision measurement replaced by a fake that records what it was given and
    answers bf16-mixed."""
    from mmformer.training import recipes

    calls = []

    def fake(module, datamodule):
        calls.append((module, datamodule))
        return PrecisionChoice("bf16-mixed", {"32-true": 0.02, "bf16-mixed": 0.01})

    monkeypatch.setattr(recipes, "auto_precision", fake)
    return calls


@pytest.mark.parametrize(
    "extra,auto",
    [
        ([], True),  # the recipe's auto
        (["--trainer.precision", "32-true"], False),  # a later value overrides it
        (["--trainer.precision=bf16-mixed", "--trainer.precision=auto"], True),  # the last one given counts
    ],
)
def test_recipe_precision_auto_is_measured_in_the_cli_hooks(tmp_path, measured, extra, auto):
    from mmformer.training.recipes import RecipeCLI

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE)
    lines = []
    cli = RecipeCLI(["--config", str(recipe), *extra], run=False, announce=lines.append)
    assert recipe.read_text() == TINY_RECIPE  # the user's file untouched, no copy written
    if auto:
        assert measured == [(cli.model, cli.datamodule)]  # measured on the built model and data
        assert cli.precision_choice.precision == "bf16-mixed" and cli.trainer.precision == "bf16-mixed"
        assert cli.config.trainer.precision == "bf16-mixed"  # what the saved config.yaml records
        assert lines and lines[0].startswith("precision auto -> bf16-mixed")
    else:
        assert measured == [] and cli.precision_choice is None and lines == []
        assert cli.trainer.precision == "32-true"


def test_a_trainer_built_directly_refuses_auto():
    from mmformer.training.recipes import RecipeTrainer

    with pytest.raises(ValueError, match="precision 'auto' is resolved by RecipeCLI"):
        RecipeTrainer(precision="auto")


def test_auto_precision_refuses_batches_that_are_not_image_text():
    from mmformer.training.precision import auto_precision

    class Docs:
        def setup(self, stage):
            pass

        def train_dataloader(self):
            return iter([{"chunks": torch.zeros(2, 4)}])

    with pytest.raises(ValueError, match=r"Docs's batches have no \['images', 'input_ids', 'attention_mask'\]"):
        auto_precision(object(), Docs())


def test_auto_precision_times_the_model_as_configured(tiny, monkeypatch):
    """The timed bf16 step runs the attention kernel the model's config names (``fused_cpu``:
    FusedQKVAttention; the default: never), and the two configs are cached apart."""
    from mmformer.layers import cpu_attention
    from mmformer.training.precision import cache_key

    calls = []
    apply = cpu_attention.FusedQKVAttention.apply
    monkeypatch.setattr(cpu_attention.FusedQKVAttention, "apply", lambda *a: calls.append(a[0].dtype) or apply(*a))
    model, images, ids, mask = tiny
    training_step(model, images, ids, mask, "bf16-mixed")()
    assert calls == []
    fused = MMFormer(get_config("tiny", vocab_size=64, attention_kernel="fused_cpu"))
    training_step(fused, images, ids, mask, "bf16-mixed")()
    assert calls and set(calls) == {torch.bfloat16}
    assert cache_key(fused, 4) != cache_key(model, 4)


@pytest.mark.parametrize("recipe", ["tiny-cpu", "teacher", "distill", "small-bf16"])
def test_recipes_that_train_bf16_on_the_cpu_name_the_fused_cpu_kernel(recipe):
    """The default kernel is the reference; the shipped recipes that train bf16 on the CPU (the demo
    trains with tiny-cpu's model settings) turn the fused CPU kernel on by the one config switch."""
    from pathlib import Path

    import mmformer
    from mmformer.layers.cpu_attention import attend_fused_cpu

    text = (Path(mmformer.__file__).parent / "recipes" / f"{recipe}.yaml").read_text()
    model_config = yaml.safe_load(text)["model"]["init_args"]["model_config"]
    assert model_config["attention_kernel"] == "fused_cpu"
    assert get_config("tiny").attention_kernel == "default"
    built = MMFormer(get_config("tiny", **{**model_config, "depth": 1}))
    assert all(b.attn.attend is attend_fused_cpu for b in built.blocks)
