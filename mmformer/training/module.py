"""The LightningModule: contrastive training of :class:`MMFormer` with retrieval validation.

The module holds the science (model, loss, optimizer groups, schedule, metrics); the Trainer
holds the engineering (devices, precision, accumulation, checkpoints, logging).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from mmformer.config import get_config
from mmformer.losses import clip_loss, contrastive_accumulation, siglip_loss, world_size
from mmformer.model import MMFormer
from mmformer.retrieval.metrics import concept_retrieval_metrics, pair_retrieval_metrics
from mmformer.tokenizer import Tokenizer, default_tokenizer_path
from mmformer.training.callbacks import ScheduleClock
from mmformer.training.checkpoint import guard_fit
from mmformer.training.datamodule import SkippedSamplesCallback
from mmformer.training.distributed import PRECISION_DTYPES, apply_fsdp, apply_tensor_parallel, is_fsdp
from mmformer.training.optim import ClockLambdaLR, StepCosine, TimeCosine, make_adamw, parameter_groups

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")
LOSSES = ("clip", "siglip")
SIGLIP_SCALE_INIT = 10.0


def in_memory_name(model: MMFormer) -> str:
    """What the hyperparameters record for a model given in memory rather than as a folder, e.g.
    ``"<in-memory MMFormer: 3 blocks, heads [3, 4, 2]>"`` (a checkpoint of such a run cannot
    rebuild the module from its hyperparameters; the weights are in its state dict)."""
    c = model.config
    return f"<in-memory MMFormer: {c.depth} blocks, heads {c.heads_per_block}>"


class MMFormerModule(L.LightningModule):
    """Contrastive (CLIP InfoNCE) training of an MMFormer.

    Args:
        preset: model preset name (``tiny``, ``small``, ``base``).
        model_config: overrides of the preset's :class:`~mmformer.config.ModelConfig` fields.
        tokenizer: SentencePiece model path; None = the default one shipped in the package
            (:func:`mmformer.tokenizer.default_tokenizer_path`).
        pretrained: a ``save_pretrained`` directory to start from (its config wins over
            ``preset``/``model_config``), or an :class:`MMFormer` in memory, which is trained in
            place (the hyperparameters record :func:`in_memory_name` of it, not its weights; it
            may lack a tokenizer when the data module tokenizes on its own).
        lr, weight_decay, betas, eps: AdamW. No decay on norms, biases, embeddings, logit scale.
        warmup_steps: linear warmup length (optimizer steps), then cosine decay to
            ``min_lr_ratio * lr`` at the end of training.
        concept_positives: when batches carry ``concepts`` ids, pairs of the same concept are
            not used as each other's negatives.
        time_budget_s: train for a wall-clock budget instead of a step count: after warmup the
            cosine follows the elapsed fraction of this many seconds (pair it with the Trainer's
            ``max_time``, as ``mmformer demo`` does). None = cosine over the Trainer's steps.
        contrastive_accum: k > 1 = contrastive-correct gradient accumulation over k micro-batches
            (the loader's batches): their embeddings are computed without gradient, the loss is
            taken over all k*B pairs (every micro-batch's samples are the others' negatives), then
            each micro-batch is re-run with gradient against the cached rest; one optimizer step
            per k batches. Use it instead of the Trainer's ``accumulate_grad_batches`` (which
            averages k losses that each see only B-1 negatives); ``max_steps`` counts optimizer steps.
        loss: ``"clip"`` (symmetric InfoNCE, :func:`~mmformer.losses.clip_loss`) or ``"siglip"``
            (pairwise sigmoid, :func:`~mmformer.losses.siglip_loss`): a learnable bias
            (``logit_bias``, kept in checkpoints, not in the exported model: it does not change
            rankings) set to log(1/B) of the global batch B at the first training step, and for a
            fresh model the logit scale starting at 10.
        nonfinite: what a NaN/inf loss does: ``"stop"`` raises ``FloatingPointError`` naming the
            optimizer step, epoch and batch; ``"skip"`` skips that optimizer step, counts it
            (``train/nonfinite_skipped``, kept in checkpoints) and goes on.
        compile: ``torch.compile`` each block (in ``configure_model``, before FSDP sharding).
        fsdp_mixed_precision: under FSDP with ``bf16-mixed`` / ``16-mixed`` Trainer precision, let
            FSDP2 gather the parameters in that dtype (``MixedPrecisionPolicy``; fp32 sharded master
            weights, fp32 gradient reduction). False = gather fp32, autocast only.
        reshard_after_forward: FSDP2 frees gathered block weights after forward (less memory,
            one more all-gather in backward).
    """

    def __init__(
        self,
        preset: str = "tiny",
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        pretrained: str | MMFormer | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        concept_positives: bool = True,
        time_budget_s: float | None = None,
        contrastive_accum: int = 1,
        nonfinite: str = "stop",
        compile: bool = False,
        fsdp_mixed_precision: bool = True,
        reshard_after_forward: bool = True,
        loss: str = "clip",
    ) -> None:
        super().__init__()
        given = pretrained if isinstance(pretrained, MMFormer) else None
        self.save_hyperparameters(ignore=["pretrained"] if given is not None else None)
        if given is not None:  # the hyperparameters name the model; its weights are in the state dict
            self.hparams["pretrained"] = in_memory_name(given)
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} must be one of {LOSSES}")
        if int(contrastive_accum) < 1:
            raise ValueError(f"contrastive_accum={contrastive_accum} must be >= 1")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r} must be one of {NONFINITE_POLICIES}")
        self.automatic_optimization = int(contrastive_accum) == 1
        self._micro_batches: list[dict[str, Any]] = []
        self.nonfinite_skipped = 0
        if pretrained is not None:
            self.model = given if given is not None else MMFormer.from_pretrained(pretrained)
            if tokenizer is not None:
                self.model.tokenizer = Tokenizer.load(tokenizer)
            if self.model.tokenizer is None and given is None:  # a model in memory may come with tokenized data
                raise ValueError(f"{pretrained} has no tokenizer.model; pass tokenizer=PATH")
        else:
            tok = Tokenizer.load(tokenizer or default_tokenizer_path())
            config = get_config(preset, **{"vocab_size": tok.vocab_size, **(model_config or {})})
            if config.vocab_size < tok.vocab_size:
                raise ValueError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
            self.model = MMFormer(config, tok)
            if loss == "siglip":
                with torch.no_grad():
                    self.model.logit_scale.fill_(math.log(SIGLIP_SCALE_INIT))
        # SigLIP's bias: set from the global batch size at the first step (the flag is kept in
        # checkpoints, so a resumed run keeps the trained value)
        self.logit_bias = nn.Parameter(torch.zeros(())) if loss == "siglip" else None
        self.logit_bias_ready = False
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        # the ranks whose samples the contrastive loss gathers (None = all; the data-parallel
        # group under tensor parallelism, set by configure_model)
        self.loss_group = None
        self._step_start = 0.0

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    def setup(self, stage: str) -> None:
        """Hand the model's tokenizer to a data module that has none; for ``fit``, write
        checkpoints atomically and check the checkpoint to resume from before it is loaded
        (:func:`mmformer.training.checkpoint.guard_fit`)."""
        if stage == "fit" and self._trainer is not None:
            guard_fit(self.trainer)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "set_tokenizer") and getattr(dm, "tokenizer", None) is None:
            dm.set_tokenizer(self.tokenizer)

    def configure_model(self) -> None:
        """Compile the blocks (``compile``) and, under :class:`~mmformer.training.distributed.ShardedStrategy`
        (Lightning's ``ModelParallelStrategy``), split every block by heads over the tensor-parallel
        mesh (when ``tensor_parallel_size`` > 1) and shard the model with FSDP2 over the
        data-parallel mesh: one unit per multiway block, then the root. Idempotent."""
        if is_fsdp(self.model):
            return
        if self.hparams.compile:
            for block in self.model.blocks:
                block.compile()
        mesh = self.device_mesh
        if mesh is None:
            return
        dp = mesh["data_parallel"] if "data_parallel" in mesh.mesh_dim_names else mesh
        if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            apply_tensor_parallel(self.model, mesh["tensor_parallel"])
            self.loss_group = dp.get_group()  # tensor-parallel ranks hold copies of the same samples
            log.info(
                "tensor parallelism: %d heads per rank over %d ranks",
                self.model.blocks[0].attn.heads,
                mesh["tensor_parallel"].size(),
            )
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        param_dtype = PRECISION_DTYPES.get(precision) if self.hparams.fsdp_mixed_precision else None
        apply_fsdp(self.model, dp, param_dtype=param_dtype, reshard_after_forward=self.hparams.reshard_after_forward)
        log.info(
            "FSDP2: %d blocks + root sharded over %d ranks (params gathered in %s)",
            len(self.model.blocks),
            dp.size(),
            param_dtype or "fp32",
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the model config and tokenizer (for ``mmformer export``), the skip counter and
        whether SigLIP's bias was initialised."""
        tok = self.model.tokenizer
        checkpoint["mmformer"] = {
            "config": self.model.config.to_dict(),
            "tokenizer": tok._proto if tok is not None else None,
            "nonfinite_skipped": self.nonfinite_skipped,
            "logit_bias_ready": self.logit_bias_ready,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("mmformer", {})
        self.nonfinite_skipped = int(info.get("nonfinite_skipped", 0))
        self.logit_bias_ready = bool(info.get("logit_bias_ready", False))

    # ---- training -----------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The model's embeddings and logit scale (and SigLIP's ``logit_bias``): the loss's inputs."""
        out = self.model(images, input_ids, attention_mask)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def contrastive_loss(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        params: dict[str, torch.Tensor],
        positives: torch.Tensor | None,
    ) -> torch.Tensor:
        """The configured loss (``clip`` or ``siglip``) over the data-parallel group's batch;
        ``params`` holds ``logit_scale`` (and ``logit_bias``)."""
        if self.hparams.loss == "siglip":
            self._init_logit_bias(image_embeds.shape[0])
            return siglip_loss(
                image_embeds, text_embeds, params["logit_scale"], params["logit_bias"], positives, group=self.loss_group
            )
        return clip_loss(image_embeds, text_embeds, params["logit_scale"], positives, group=self.loss_group)

    def _init_logit_bias(self, local_batch: int) -> None:
        """log(1/B) for the global batch B = local rows x data-parallel ranks, once."""
        if self.logit_bias_ready:
            return
        ranks = world_size(self.loss_group)
        with torch.no_grad():
            self.logit_bias.fill_(-math.log(local_batch * ranks))
        self.logit_bias_ready = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        """Take the :meth:`training_loss`, apply the ``nonfinite`` policy and log; subclasses
        change the loss (:meth:`training_loss`), not this. (Skipped samples are counted by
        :class:`~mmformer.training.datamodule.SkippedSamplesCallback`, see :meth:`configure_callbacks`.)"""
        if not self.automatic_optimization:
            return self._accumulating_step(batch, batch_idx)
        if batch is None or batch["images"].shape[0] == 0:  # every sample of the batch was corrupt
            return None  # Lightning skips the optimizer step
        loss, logs = self.training_loss(batch)
        if not self._loss_is_finite(loss, batch_idx):
            return None  # "skip": no backward, no update (the optimizer sees no gradients)
        bs = batch["images"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in logs.items():
            self.log(f"train/{name}", value, prog_bar=name in self.progress_bar_logs, batch_size=bs)
        return loss

    #: names of :meth:`training_loss`'s logged values shown in the progress bar (besides the loss)
    progress_bar_logs: tuple[str, ...] = ()

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, values to log as ``train/NAME``) of one batch: the CLIP loss and the logit scale."""
        out = self(batch["images"], batch["input_ids"], batch["attention_mask"])
        positives = batch.get("concepts") if self.hparams.concept_positives else None
        loss = self.contrastive_loss(out["image_embeds"], out["text_embeds"], out, positives)
        logs = {"logit_scale": out["logit_scale"].detach()}
        if self.logit_bias is not None:
            logs["logit_bias"] = self.logit_bias.detach()
        return loss, logs

    def _loss_is_finite(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """Apply the ``nonfinite`` policy; every rank takes the same decision."""
        finite = torch.isfinite(loss.detach()).all().float()
        if world_size() > 1:
            import torch.distributed as dist

            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite.item()):
            return True
        where = (
            (f"optimizer step {self.trainer.global_step}, epoch {self.current_epoch}, batch {batch_idx}")
            if self._trainer is not None
            else f"batch {batch_idx}"
        )
        if self.hparams.nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at {where}; set model.nonfinite=skip to skip such steps"
            )
        self.nonfinite_skipped += 1
        log.warning(
            "non-finite training loss (%s) at %s: step skipped (%d so far)", loss.item(), where, self.nonfinite_skipped
        )
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
        return False

    def _accumulating_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        """Manual optimization for ``contrastive_accum`` = k: collect k batches, then one step."""
        if batch is not None and batch["images"].shape[0] > 0:
            self._micro_batches.append(batch)
        k = int(self.hparams.contrastive_accum)
        if len(self._micro_batches) < k and not self.trainer.is_last_batch:
            return None
        micro, self._micro_batches = self._micro_batches, []
        if not micro:
            return None
        opt = self.optimizers()
        positives = None
        if self.hparams.concept_positives and all("concepts" in b for b in micro):
            positives = torch.cat([b["concepts"] for b in micro])
        fsdp = hasattr(self.model, "set_requires_gradient_sync")

        def backward(loss: torch.Tensor, last: bool) -> None:
            if fsdp:  # reduce-scatter once, after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            self.manual_backward(loss)

        loss, logit_scale = contrastive_accumulation(
            lambda b: self(b["images"], b["input_ids"], b["attention_mask"]),
            micro,
            backward,
            positives,
            is_finite=lambda v: self._loss_is_finite(v, batch_idx),
            loss_fn=self.contrastive_loss,
        )
        if loss is None:
            opt.zero_grad()
            return None
        if self.trainer.gradient_clip_val:
            self.clip_gradients(opt, self.trainer.gradient_clip_val, self.trainer.gradient_clip_algorithm)
        opt.step()
        opt.zero_grad()
        self.lr_schedulers().step()
        bs = sum(b["images"].shape[0] for b in micro)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", logit_scale, batch_size=bs)
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch is None:
            return
        elapsed = time.perf_counter() - self._step_start
        bs = batch["images"].shape[0]
        if elapsed > 0 and bs:
            # data-parallel ranks only: tensor- or pipeline-parallel ranks share their samples
            replicas = (getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}).get(
                "num_replicas", self.trainer.world_size
            )
            self.log("train/samples_per_s", bs * replicas / elapsed, prog_bar=True, batch_size=bs)
        opt = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", opt.param_groups[0]["lr"], batch_size=max(bs, 1))

    def configure_callbacks(self) -> list[L.Callback]:
        """The module's own callbacks:

        - skipped samples are counted, warned about each epoch and logged (``train/skipped_samples``)
          by one :class:`~mmformer.training.datamodule.SkippedSamplesCallback`: the Trainer's, or
          this one when it has none;
        - with a time budget, :class:`~mmformer.training.callbacks.ScheduleClock` starts the
          schedule's clock when training starts.
        """
        callbacks: list[L.Callback] = []
        trainer_callbacks = self.trainer.callbacks if self._trainer is not None else []
        if not any(isinstance(c, SkippedSamplesCallback) for c in trainer_callbacks):
            callbacks.append(SkippedSamplesCallback())
        if self.hparams.time_budget_s:
            callbacks.append(ScheduleClock())
        return callbacks

    # ---- optimisation -------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: weight matrices with ``weight_decay``; norms, biases, embeddings
        and the logit scale without. Subclasses override this to add groups (own ``lr`` etc.); the
        schedule multiplies every group's ``lr`` by the same factor."""
        decay, no_decay = parameter_groups(self.model)
        if self.logit_bias is not None:
            no_decay.append(self.logit_bias)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except under ``bf16-mixed`` with the fused AdamW
        (:func:`~mmformer.training.optim.make_adamw`), which Lightning's mixed-precision plugin
        refuses to clip for (a fused optimizer unscales fp16 gradients inside ``step``; bf16 has no
        scaler, so the gradients are the true ones): there they are clipped here, by norm or by
        value as the Trainer says."""
        fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
        if gradient_clip_val and fused and self._trainer is not None and str(self.trainer.precision) == "bf16-mixed":
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":  # GradClipAlgorithmType is a str enum
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = make_adamw(self.optimizer_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        if hp.time_budget_s:
            factor = TimeCosine(hp.warmup_steps, hp.time_budget_s, hp.min_lr_ratio)
        else:
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            if not self.automatic_optimization and self.trainer.max_steps < 0:
                total = max(total // int(hp.contrastive_accum), 1)  # batches -> optimizer steps
            factor = StepCosine(hp.warmup_steps, total, hp.min_lr_ratio)
        schedule = ClockLambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- validation: retrieval recall ---------------------------------------------------
    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None or batch["images"].shape[0] == 0:
            return
        emb = self(batch["images"], batch["input_ids"], batch["attention_mask"])  # forward: FSDP2 hooks run
        out = {
            "image": emb["image_embeds"].float(),
            "text": emb["text_embeds"].float(),
            "image_ids": batch.get("image_ids", batch["indices"]).long(),
        }
        if "concepts" in batch:
            out["concepts"] = batch["concepts"].long()
        self._val_outputs.append(out)

    def test_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

    def _log_retrieval(self, stage: str) -> None:
        outs, self._val_outputs = self._val_outputs, []
        if not outs:
            return
        keys = ["image", "text", "image_ids"] + (["concepts"] if "concepts" in outs[0] else [])
        cols = {k: torch.cat([o[k] for o in outs]) for k in keys}
        if self.trainer.world_size > 1:  # every rank scores the whole set
            cols = {k: self.all_gather(v, group=self.loss_group).flatten(0, 1) for k, v in cols.items()}
        if "concepts" in cols:
            metrics = concept_retrieval_metrics(cols["image"], cols["text"], cols["concepts"])
        else:
            metrics = pair_retrieval_metrics(cols["image"], cols["text"], cols["image_ids"])
        for k, v in metrics.items():
            self.log(f"{stage}/{k}", v, prog_bar=k == "t2i_R@1", sync_dist=False, rank_zero_only=True)

    # ---- export -------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Write the model as a ``save_pretrained`` directory (config, safetensors, tokenizer)."""
        return self.model.save_pretrained(directory)
