"""``--precision auto``: choose the training precision by timing a few real steps of each.

Which precision trains faster depends on the CPU and the model's size: on a CPU with AMX the
tiny preset can train slower in bf16 autocast than in fp32 while the small one trains faster; on
an AVX2-only CPU bf16 is emulated and far slower (see the benchmarks pages). A flag in
/proc/cpuinfo cannot tell, so :func:`choose_precision` times a few training steps (forward of
both towers, CLIP loss, backward, AdamW step) of a copy of the model on the real batch shape in
each candidate precision and keeps the fastest. The candidates' steps are interleaved (A B A B
...), warm-up included, so that a machine slowing down or speeding up during the
measurement (another process, clock boost) biases no candidate; a candidate 3x slower than the
fastest in two rounds in a row (from the second on) is stopped there rather than timed to the end. The choice is cached per CPU
model, torch version, cache version (:data:`PRECISION_CACHE_VERSION`), model config and batch size
(``~/.cache/mmformer/precision.json``, or ``$MMFORMER_CACHE``), so a second run of the same recipe
on the same machine decides at once.

``mmformer demo --precision auto`` and ``mmformer fit ... --trainer.precision auto`` (or
``precision: auto`` in a recipe) both decide through :func:`auto_precision`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmformer.files import write_text_atomic
from mmformer.losses import clip_loss
from mmformer.model import MMFormer
from mmformer.training.optim import make_adamw

log = logging.getLogger(__name__)

CANDIDATES = ("32-true", "bf16-mixed")
_AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16}
#: Version of the cached measurements: part of every cache key, so bumping it (when a change to the
#: training step's kernels, or to how they are timed, may change which precision is faster) makes
#: every cached choice be measured again.
PRECISION_CACHE_VERSION = 5
#: A candidate more than this many times slower than the fastest in two rounds in a row is not timed further.
DROP_SLOWER = 3.0


@dataclass(frozen=True)
class PrecisionChoice:
    """The chosen precision, the seconds per step measured for each candidate (median), whether
    the choice came from the cache, and the candidates that were stopped early for being far
    slower than the fastest (their time is from their few calls, not from a full measurement)."""

    precision: str
    seconds_per_step: dict[str, float]
    cached: bool = False
    stopped: tuple[str, ...] = ()

    def reason(self) -> str:
        """One line for the user: what was chosen and why."""
        times = ", ".join(
            f"{p} {s * 1e3:.0f} ms"
            + (f" (stopped early: over {DROP_SLOWER:g}x the fastest)" if p in self.stopped else "")
            for p, s in sorted(self.seconds_per_step.items(), key=lambda kv: kv[1])
        )
        others = [s for p, s in self.seconds_per_step.items() if p != self.precision]
        speed = f", {min(others) / self.seconds_per_step[self.precision]:.2f}x the next" if others else ""
        source = " (cached measurement)" if self.cached else ""
        return f"precision auto -> {self.precision}: fastest training step on this CPU ({times}{speed}){source}"


def pick_fastest(seconds_per_step: dict[str, float], margin: float = 0.05) -> str:
    """The candidate with the smallest time, except that fp32 (``CANDIDATES[0]``) is kept unless
    another precision is more than ``margin`` (5%) faster: within timing noise the full
    precision wins."""
    if not seconds_per_step:
        raise ValueError("no precision was measured")
    best = min(seconds_per_step, key=seconds_per_step.get)
    full = CANDIDATES[0]
    if best != full and full in seconds_per_step and seconds_per_step[full] <= seconds_per_step[best] * (1 + margin):
        return full
    return best


def time_steps(
    step: Callable[[], None], steps: int, warmup: int, timer: Callable[[], float] = time.perf_counter
) -> float:
    """Median seconds of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    return time_interleaved({"step": step}, steps, warmup, timer)[0]["step"]


def time_interleaved(
    steps_of: dict[str, Callable[[], None]],
    steps: int,
    warmup: int,
    timer: Callable[[], float] = time.perf_counter,
    drop_slower: float | None = None,
) -> tuple[dict[str, float], tuple[str, ...]]:
    """Median seconds per call of each closure in ``steps_of``: ``warmup`` untimed rounds, then
    ``steps`` timed rounds, each round calling every closure once, in turn. Returns the medians
    and the names of the closures that were not timed to the end (see ``drop_slower``).

    With ``drop_slower`` (a factor), a closure whose call took more than ``drop_slower`` times the
    fastest call of its round in two rounds in a row, from the second round on (the first carries
    one-off costs), is not called again: its time is then the median of its calls from the second
    round on. One slow call is not enough: a single late warm-up call can take several times a
    warm step, and a rule of one slow call would report that call. An emulated bf16 step on an
    AVX2-only CPU is over an order of magnitude slower than fp32, and timing all of its rounds
    would hold up a demo's start: it is stopped after three calls.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if drop_slower is not None and drop_slower <= 1:
        raise ValueError(f"drop_slower must be > 1 (a factor over the fastest call), got {drop_slower}")
    active = list(steps_of)
    calls: dict[str, list[float]] = {name: [] for name in steps_of}  # calls[name][r]: its call in round r
    slow_rounds = dict.fromkeys(steps_of, 0)  # consecutive rounds over the factor
    stopped: list[str] = []
    for r in range(warmup + steps):
        this_round = {}
        for name in active:
            t0 = timer()
            steps_of[name]()
            this_round[name] = timer() - t0
            calls[name].append(this_round[name])
        if drop_slower is not None and r >= 1 and len(active) > 1:
            fastest = min(this_round.values())
            for name in list(active):
                slow_rounds[name] = slow_rounds[name] + 1 if this_round[name] > drop_slower * fastest else 0
                if slow_rounds[name] == 2:
                    active.remove(name)
                    stopped.append(name)
                    log.info(
                        "precision timing: %s took over %.0fx the fastest step in two rounds; not timed further",
                        name,
                        drop_slower,
                    )
    medians = {
        name: statistics.median(calls[name][1:] if name in stopped else calls[name][warmup:]) for name in steps_of
    }
    return medians, tuple(stopped)


def train_step(
    loss_of: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, precision: str, device_type: str = "cpu"
) -> Callable[..., torch.Tensor]:
    """A closure running one training step: ``loss_of(*args)`` under ``precision``'s autocast
    (``32-true``: none), backward, ``optimizer.step()``, gradients cleared; it returns the loss,
    detached. The step :func:`training_step` times and the benchmarks in ``bench/`` run."""
    if precision not in _AUTOCAST:
        raise ValueError(f"precision {precision!r} is not one of {list(_AUTOCAST)}")
    dtype = _AUTOCAST[precision]

    def step(*args) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = loss_of(*args)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def training_step(
    model: MMFormer, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, precision: str
) -> Callable[[], torch.Tensor]:
    """A closure running one contrastive training step (:func:`train_step`) of ``model`` (a copy:
    the caller's model and optimizer are untouched) in ``precision``."""
    if precision not in _AUTOCAST:
        raise ValueError(f"precision {precision!r} is not one of {list(_AUTOCAST)}")
    work = copy.deepcopy(model).train()
    opt = make_adamw([{"params": [p for p in work.parameters() if p.requires_grad]}], lr=1e-4)

    def loss_of() -> torch.Tensor:
        out = work(images, input_ids, attention_mask)
        return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], gather=False)

    return train_step(loss_of, opt, precision, images.device.type)


def cache_key(model: MMFormer, batch_size: int, device: str = "cpu") -> str:
    config = json.dumps(model.config.to_dict(), sort_keys=True)
    parts = [
        cpu_name() if device == "cpu" else device,
        torch.__version__,
        f"kernels{PRECISION_CACHE_VERSION}",
        str(torch.get_num_threads()),
        str(batch_size),
        hashlib.sha256(config.encode()).hexdigest()[:16],
    ]
    return "|".join(parts)


#: /proc/cpuinfo flags of native bf16 matmuls (without them torch emulates bf16 on the CPU).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_lines() -> list[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux) and its bf16 flags."""
    lines = _cpuinfo_lines()
    if lines is None:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())
    flags = _cpu_flags(lines)
    return f"{name} [{' '.join(f for f in BF16_FLAGS if f in flags) or 'no bf16'}]"


def _cpu_flags(lines: list[str]) -> list[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo's ``lines`` ([] when there are none)."""
    return next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """True when ``device`` runs bf16 matmuls natively: a CUDA device that supports bf16, or a CPU
    whose /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (elsewhere bf16 on the CPU is emulated,
    one to two orders of magnitude slower than fp32). Whether bf16 is then also *faster* depends
    on the model's size (see the module docstring); this only says it is not emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = _cpu_flags(_cpuinfo_lines() or [])
    return any(f in flags for f in BF16_FLAGS)


def cache_path() -> Path:
    root = os.environ.get("MMFORMER_CACHE") or Path.home() / ".cache" / "mmformer"
    return Path(root) / "precision.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def choose_precision(
    model: MMFormer,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    candidates: Sequence[str] = CANDIDATES,
    steps: int = 5,
    warmup: int = 3,
    use_cache: bool = True,
    timer: Callable[[], float] = time.perf_counter,
    make_step: Callable[..., Callable[[], None]] = training_step,
) -> PrecisionChoice:
    """Time ``steps`` training steps (after ``warmup``) of each candidate precision on this
    batch, interleaved, and return the fastest. With ``use_cache``, a measurement made before for the same
    CPU, torch, cache version, thread count, model config and batch size is reused."""
    unknown = [c for c in candidates if c not in _AUTOCAST]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; auto chooses among {list(_AUTOCAST)}")
    key = cache_key(model, int(images.shape[0]), images.device.type)
    path = cache_path()
    if use_cache:
        hit = _read_cache(path).get(key)
        if (
            isinstance(hit, dict)
            and set(candidates) <= set(hit)
            and all(isinstance(hit[c], (int, float)) for c in candidates)
        ):
            times = {c: float(hit[c]) for c in candidates}
            stopped = tuple(c for c in hit.get("stopped", ()) if c in times)
            return PrecisionChoice(pick_fastest(times), times, cached=True, stopped=stopped)
    closures = {precision: make_step(model, images, input_ids, attention_mask, precision) for precision in candidates}
    times, stopped = time_interleaved(closures, steps, warmup, timer, drop_slower=DROP_SLOWER)
    del closures  # the model copies
    for precision, t in times.items():
        log.info("precision %s: %.1f ms per training step (batch %d)", precision, t * 1e3, images.shape[0])
    if use_cache:
        data = _read_cache(path)
        data[key] = {**times, "stopped": list(stopped)}
        try:
            write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError as e:  # a read-only home is no reason to fail training
            log.warning("could not cache the precision measurement in %s: %s", path, e)
    return PrecisionChoice(pick_fastest(times), times, stopped=stopped)


def auto_precision(module, datamodule, use_cache: bool = True) -> PrecisionChoice:
    """``--precision auto`` for a training run: :func:`choose_precision` on the module's model (or
    on ``module`` itself when it is an :class:`MMFormer`, as for a pruned model's recovery) and
    one real training batch of ``datamodule`` (set up for ``fit`` here; the global RNG is left as
    it was). The batch must be an image-text batch (``images``, ``input_ids``,
    ``attention_mask``); other recipes (long documents) must name their precision."""
    if hasattr(datamodule, "set_tokenizer") and getattr(datamodule, "tokenizer", None) is None:
        datamodule.set_tokenizer(module.tokenizer)  # as the module's setup would
    with torch.random.fork_rng():
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
    missing = [k for k in ("images", "input_ids", "attention_mask") if not isinstance(batch, dict) or k not in batch]
    if missing:
        raise ValueError(
            f"precision auto times image-text training steps, but {type(datamodule).__name__}'s "
            f"batches have no {missing}; set the precision (32-true, bf16-mixed) in the recipe"
        )
    model = module if isinstance(module, MMFormer) else module.model
    return autocast_for("auto", model, batch, use_cache)[1]


def autocast_for(
    precision: str,
    model: MMFormer | None = None,
    batch: Mapping[str, torch.Tensor] | None = None,
    use_cache: bool = True,
) -> tuple[torch.dtype | None, PrecisionChoice | None]:
    """The autocast dtype (None = full precision) of ``precision`` = ``32-true``, ``bf16-mixed`` or
    ``auto``; ``auto`` runs :func:`choose_precision` on ``model`` and one image-text ``batch`` and
    also returns the choice (whose :meth:`PrecisionChoice.reason` is the line to show), else None."""
    if precision == "auto":
        if model is None or batch is None:
            raise ValueError("precision auto needs the model and one image-text batch to time")
        with torch.random.fork_rng():
            choice = choose_precision(
                model, batch["images"], batch["input_ids"], batch["attention_mask"], use_cache=use_cache
            )
        return _AUTOCAST[choice.precision], choice
    if precision not in _AUTOCAST:
        raise ValueError(f"precision {precision!r} must be auto or one of {list(_AUTOCAST)}")
    return _AUTOCAST[precision], None
