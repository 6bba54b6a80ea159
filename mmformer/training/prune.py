"""Head pruning with recovery through the Trainer, and ``mmformer prune``.

:mod:`mmformer.compress.prune` holds the model transforms (head importance, selection, removal);
this module adds what needs training data and the Trainer:

- :func:`pruning_datamodule`: an :class:`~mmformer.training.datamodule.ImageTextDataModule` fitted
  to a model (image size, normalisation, context length, tokenizer) over the bundled emoji data, a
  CSV/TSV/JSONL manifest or WebDataset shards: what a recipe's ``data:`` can name;
- :func:`scoring_batches`: the first batches of its training loader, for the gradient criterion;
- :func:`recover`: fine-tunes a pruned model with :class:`~mmformer.training.distill.DistillModule`
  (CLIP loss + affinity distillation from the unpruned model, frozen) under a Lightning Trainer,
  with the project's AdamW groups and warmup-cosine schedule (:mod:`mmformer.training.optim`);
- :func:`prune_command`: the ``mmformer prune`` verb (score, remove, optionally recover, save).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from mmformer.compress.prune import CRITERIA, head_importance, normalize_per_block, prune_heads, select_heads
from mmformer.model import MMFormer
from mmformer.training.datamodule import ImageTextDataModule
from mmformer.training.distill import DistillModule
from mmformer.training.precision import auto_precision
from mmformer.training.trainer import make_trainer

log = logging.getLogger(__name__)

#: The recovery's Trainer precisions; ``auto`` times a few training steps of each on one batch.
PRECISIONS = ("auto", "32-true", "bf16-mixed")


# ---- data ----------------------------------------------------------------------------------------
def pruning_datamodule(
    model: MMFormer,
    data: str | None = None,
    shards: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    image_col: str = "image",
    caption_col: str = "caption",
    num_workers: int = 0,
) -> ImageTextDataModule:
    """Training batches for ``model``'s head scores and recovery, set up for ``fit``.

    Args:
        model: the model whose image size, normalisation, context length and tokenizer the
            batches follow (it needs a tokenizer).
        data: a CSV/TSV/JSONL manifest of image-caption pairs (relative image paths resolve
            against the manifest's folder).
        shards: a WebDataset shard pattern (brace pattern or ``::``-separated).
        data_dir: without ``data`` and ``shards``: the emoji-layout folder whose training split is
            used (None = the bundled data).
        batch_size: pairs per batch (>= 2).
        seed: the training order's and augmentation's seed.
        image_col, caption_col: the manifest's column names.
        num_workers: DataLoader worker processes.

    The training images are augmented as in a recipe's training (``augment: true``).
    """
    if data is not None and shards is not None:
        raise ValueError(
            f"give one source of training pairs: a manifest (data={data!r}) or shards (shards={shards!r}), not both"
        )
    if batch_size < 2:
        raise ValueError(f"need batch_size >= 2 (contrastive pairs), got {batch_size}")
    if model.tokenizer is None:
        raise ValueError(
            "the model has no tokenizer attached (tokenizer.model missing from its folder); "
            "it is needed to read the training captions"
        )
    c = model.config
    dm = ImageTextDataModule(
        data_dir=data_dir if data is None and shards is None else None,
        train_manifest=data,
        shards=shards,
        image_size=c.image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        max_length=c.context_length,
        caption_mode="name",
        image_col=image_col,
        caption_col=caption_col,
        image_mean=c.image_mean,
        image_std=c.image_std,
        seed=seed,
    )
    dm.set_tokenizer(model.tokenizer)
    dm.setup("fit")
    return dm


def scoring_batches(datamodule: L.LightningDataModule, n_batches: int) -> list[dict[str, Any]]:
    """The first ``n_batches`` batches (fewer if an epoch is shorter) of ``datamodule``'s training
    loader in its first epoch, as a list; the global RNG is left as it was. Empty batches (every
    sample corrupt) are left out."""
    if n_batches < 1:
        raise ValueError(f"need n_batches >= 1, got {n_batches}")
    with torch.random.fork_rng():
        loader = datamodule.train_dataloader()
        batches = [b for b in itertools.islice(iter(loader), n_batches) if b is not None and len(b["images"])]
    if not batches:
        raise ValueError("the training data gave no batches to score the heads on")
    if len(batches) < n_batches:
        log.info("the training data holds %d batches; scoring on those", len(batches))
    return batches


# ---- recovery ------------------------------------------------------------------------------------
class StepLosses(L.Callback):
    """Each optimizer step's training loss, in order (``losses``); ``on_step(step, loss)`` after
    each (1-based). Also counts the epochs begun and the batches per epoch the Trainer saw
    (``num_training_batches``: ``inf`` for a stream without a length)."""

    def __init__(self, on_step: Callable[[int, float], None] | None = None) -> None:
        self.on_step = on_step
        self.losses: list[float] = []
        self.epochs = 0
        self.batches_per_epoch: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self.epochs += 1
        self.batches_per_epoch = trainer.num_training_batches

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:  # noqa: D102
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # a skipped batch (all samples corrupt): no step
            return
        self.losses.append(float(loss.detach()))
        if self.on_step is not None:
            self.on_step(len(self.losses), self.losses[-1])


def recover(
    student: MMFormer,
    teacher: MMFormer,
    datamodule: L.LightningDataModule,
    steps: int,
    *,
    lr: float = 8e-4,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    distill_weight: float = 1.0,
    max_grad_norm: float | None = 1.0,
    precision: str = "32-true",
    on_step: Callable[[int, float], None] | None = None,
    callbacks: Sequence[L.Callback] = (),
    **trainer_args: Any,
) -> MMFormer:
    """Fine-tune the pruned ``student`` in place for ``steps`` optimizer steps; returns it.

    A :class:`~mmformer.training.distill.DistillModule` with ``teacher`` (the unpruned model) as
    its frozen teacher and ``student`` as its model trains under a Lightning Trainer on
    ``datamodule``'s training loader, epoch after epoch as long as the steps last (no validation).

    Args:
        student: the pruned model; trained in place, left on its device in the train/eval mode it
            came in.
        teacher: the unpruned model; run without gradient in eval mode and given back as it came
            (mode, ``requires_grad``, device), never changed.
        datamodule: any LightningDataModule whose training batches are image-text batches
            (``images``, ``input_ids``, ``attention_mask``; ``concepts`` as extra positives),
            e.g. :func:`pruning_datamodule`.
        steps: optimizer steps (>= 0; 0 returns ``student`` untouched).
        lr, weight_decay, betas, eps: AdamW (:func:`~mmformer.training.optim.parameter_groups`:
            no decay on norms, biases, embeddings and the logit scale).
        warmup_steps, min_lr_ratio: the schedule (:func:`~mmformer.training.optim.warmup_cosine`):
            linear warmup, then cosine from ``lr`` to ``min_lr_ratio * lr``; ``min_lr_ratio=1``
            keeps the rate constant.
        distill_weight: weight of the affinity distillation term beside the CLIP loss (0: CLIP
            loss only, the teacher never runs).
        max_grad_norm: gradient clipping by norm (None: no clipping).
        precision: the Trainer's ``32-true`` or ``bf16-mixed`` (fp32 weights, bf16 autocast; the
            teacher then runs under bf16 autocast too), or ``auto``
            (:func:`~mmformer.training.precision.auto_precision` on the student and one batch).
        on_step: called as ``on_step(step, loss)`` after each step (1-based).
        callbacks: more Trainer callbacks.
        **trainer_args: other ``Trainer`` arguments over
            :data:`~mmformer.training.trainer.TRAINER_DEFAULTS` (the accelerator follows the
            student's device unless given).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"recovery steps must be an int >= 0, got {steps!r}")
    if not lr > 0 or weight_decay < 0 or distill_weight < 0:
        raise ValueError(
            f"need lr > 0, weight_decay >= 0 and distill_weight >= 0, got {lr}, {weight_decay}, {distill_weight}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"recovery precision {precision!r} must be one of {list(PRECISIONS)}")
    if steps == 0:
        return student
    if precision == "auto":
        choice = auto_precision(student, datamodule)
        log.info("recovery %s", choice.reason())
        precision = choice.precision
    device = next(student.parameters()).device
    t_device = next(teacher.parameters()).device
    was_training, t_training = student.training, teacher.training
    t_grad = [p.requires_grad for p in teacher.parameters()]
    module = DistillModule(
        teacher=teacher,
        pretrained=student,
        clip_weight=1.0,
        affinity_weight=distill_weight,
        feature_weight=0.0,
        interactive_weight=0.0,
        teacher_precision="bf16" if precision.startswith("bf16") else "fp32",
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        eps=eps,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
    )
    if device.type == "cuda":
        trainer_args = {"accelerator": "gpu", "devices": [device.index or 0], **trainer_args}
    progress = StepLosses(on_step)
    trainer = make_trainer(
        max_steps=steps,
        precision=precision,
        gradient_clip_val=max_grad_norm,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[progress, *callbacks],
        **trainer_args,
    )
    module.train()  # the Trainer keeps the mode it is given
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        student.to(device).train(was_training)
        student.zero_grad(set_to_none=True)
        teacher.to(t_device).train(t_training)
        for p, g in zip(teacher.parameters(), t_grad):
            p.requires_grad_(g)
    if trainer.global_step < steps:
        raise ValueError(
            f"recovery ran {trainer.global_step} of {steps} steps: the training data gave "
            f"{'no' if not progress.losses else 'too few'} batches"
        )
    log.info("recovery: %d steps, loss %.4f -> %.4f", steps, progress.losses[0], progress.losses[-1])
    return student


# ---- the command ---------------------------------------------------------------------------------
def prune_command(
    model: str,
    out: str,
    heads: float,
    criterion: Literal["gradient", "magnitude"] = "gradient",
    normalize: Literal["block", "none"] = "block",
    batches: int = 8,
    batch_size: int = 256,
    recover: int = 0,
    lr: float = 8e-4,
    precision: Literal["auto", "32-true", "bf16-mixed"] = "auto",
    seed: int = 0,
    data: str | None = None,
    shards: str | None = None,
    image_col: str = "image",
    caption_col: str = "caption",
    data_dir: str | None = None,
    overwrite: bool = False,
) -> int:
    """Remove attention heads from a saved model, optionally recover by distillation, save the result.

    Args:
        model: save_pretrained directory to prune.
        out: save_pretrained directory to write the pruned model to (swapped in only once complete).
        heads: fraction of all heads to remove, in [0, 1); the lowest-scored over all blocks, at
            least one head left in every block.
        criterion: head importance: ``gradient``, the mean |dL/d gate| of the CLIP loss on
            training batches, or ``magnitude``, the norm of the head's weights (no data).
        normalize: ``block`` divides each block's scores by their L2 norm before the global
            ranking (Michel et al. 2019); ``none`` ranks the raw scores.
        batches: training batches for the gradient criterion.
        batch_size: pairs per batch, for the scores and the recovery.
        recover: fine-tune the pruned model this many steps (CLIP loss + distillation from the
            unpruned model, through the Lightning Trainer) on the training data, augmented, epoch
            after epoch; 0 = none.
        lr: recovery learning rate (AdamW), decayed to 0 on a cosine.
        precision: recovery precision: ``auto`` (time a few training steps of each on one batch,
            keep the faster, as ``mmformer demo`` does), ``32-true``, or ``bf16-mixed`` (bf16
            autocast, fp32 weights).
        seed: seed of the training batches' order and augmentation.
        data: CSV/TSV/JSONL manifest of image-caption pairs to score and recover on (default: the
            bundled emoji training split).
        shards: WebDataset shard pattern to score and recover on, instead of a manifest.
        image_col: the manifest's image column.
        caption_col: the manifest's caption column.
        data_dir: without ``data``/``shards``: the bundled emoji data's folder.
        overwrite: replace an existing model folder at ``out``.

    Returns:
        0 (errors raise ``ValueError`` or ``SystemExit`` with a one-line message).
    """
    from mmformer.data.bundled import BundledDataNotFound
    from mmformer.data.emoji import default_data_dir
    from mmformer.files import atomic_dir

    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r} must be one of {list(CRITERIA)}")
    if normalize not in ("block", "none"):
        raise ValueError(f"normalize {normalize!r} must be 'block' or 'none'")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {list(PRECISIONS)}")
    if not 0 <= heads < 1:
        raise ValueError(f"--heads must be a fraction in [0, 1) of the heads to remove, got {heads}")
    for flag, value, least in (("--batches", batches, 1), ("--batch-size", batch_size, 2), ("--recover", recover, 0)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if data is not None and shards is not None:
        raise ValueError("--data MANIFEST and --shards PATTERN are two sources of training pairs; pass one")
    if (data is not None or shards is not None) and data_dir is not None:
        raise ValueError(
            f"{'--data MANIFEST' if data is not None else '--shards'} replaces the bundled data that "
            "--data-dir locates; pass one"
        )
    target = Path(out)
    if not overwrite and (target.is_file() or target.is_dir() and any(target.iterdir())):
        raise ValueError(
            f"{target} already exists and is not empty (a model folder?); pass --overwrite to replace "
            "it, or choose another --out"
        )
    unpruned = MMFormer.from_pretrained(model).eval()
    c = unpruned.config
    before = unpruned.num_parameters()
    print(f"loaded {model}: {before:,} parameters, {c.depth} blocks, heads per block {c.heads_per_block}", flush=True)
    select_heads(torch.zeros(c.depth, c.heads), heads, c.heads_per_block)  # a fraction too large fails here
    dm = None
    source = f"the manifest {data}" if data is not None else f"the shards {shards}" if shards is not None else None
    if criterion == "gradient" or recover:
        torch.manual_seed(seed)
        if source is None:
            try:
                data_dir = str(default_data_dir(data_dir))
            except BundledDataNotFound as e:
                raise SystemExit(f"mmformer prune: {e}") from e
            source = f"the emoji training split in {data_dir}"
        if unpruned.tokenizer is None:
            raise ValueError(f"{model} has no tokenizer.model (needed to read the training captions)")
        dm = pruning_datamodule(unpruned, data, shards, data_dir, batch_size, seed, image_col, caption_col)
    scored = None
    if criterion == "gradient":
        scored = scoring_batches(dm, batches)
        sizes = sorted({int(b["images"].shape[0]) for b in scored})
        size = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        print(f"data: {len(scored)} batches of {size} pairs from {source}", flush=True)
    importance = head_importance(unpruned, scored, criterion)
    if normalize == "block":
        importance = normalize_per_block(importance)
    print(
        f"scored {sum(c.heads_per_block)} heads by {criterion}"
        + (f" on {len(scored)} batches" if scored is not None else "")
        + (", normalised per block" if normalize == "block" else ""),
        flush=True,
    )
    plan = select_heads(importance, heads, c.heads_per_block)
    for i, (removed, h) in enumerate(zip(plan, c.heads_per_block)):
        print(f"block {i}: removed heads {removed or 'none'}, kept {h - len(removed)} of {h}", flush=True)
    pruned = prune_heads(unpruned, plan)
    after = pruned.num_parameters()
    print(
        f"parameters: {before:,} -> {after:,} ({100 * (before - after) / before:.1f}% fewer); "
        f"heads per block {pruned.config.heads_per_block}",
        flush=True,
    )
    if recover:
        _recover_with_progress(pruned, unpruned, dm, recover, lr, precision, batch_size, source)
    with atomic_dir(target) as tmp:
        pruned.eval().save_pretrained(tmp)
    print(
        f"wrote {target} (config.json with block_heads, model.safetensors"
        + (", tokenizer.model)" if pruned.tokenizer is not None else ")"),
        flush=True,
    )
    return 0


def _recover_with_progress(
    pruned: MMFormer,
    unpruned: MMFormer,
    dm: ImageTextDataModule,
    steps: int,
    lr: float,
    precision: str,
    batch_size: int,
    source: str,
) -> None:
    """``mmformer prune --recover STEPS``: :func:`recover` with a progress bar on stderr and its lines."""
    from tqdm.auto import tqdm

    print(
        f"recovery: {steps} steps of AdamW at lr {lr:g} (cosine decay), CLIP loss + distillation from the "
        f"unpruned model, batches of {batch_size} from {source}",
        flush=True,
    )
    if precision == "auto":
        choice = auto_precision(pruned, dm)
        print(f"recovery {choice.reason()}", flush=True)
        precision = choice.precision
    progress = StepLosses()
    with tqdm(total=steps, desc="recovery", unit="step") as bar:

        def on_step(step: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

        progress.on_step = on_step
        recover(pruned, unpruned, dm, steps, lr=lr, precision=precision, callbacks=[progress])
    losses = progress.losses
    per_epoch = progress.batches_per_epoch
    epochs = (
        f"{progress.epochs} epoch{'s' if progress.epochs != 1 else ''} of {int(per_epoch)} batches"
        if per_epoch is not None and per_epoch != float("inf")
        else "a stream of batches"
    )
    print(
        f"recovery: loss {losses[0]:.4f} at step 1, {losses[-1]:.4f} at step {len(losses)} ({epochs} from {source})",
        flush=True,
    )
