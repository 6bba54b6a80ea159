"""Teacher -> student knowledge distillation: :class:`DistillModule`.

A trained teacher (a ``save_pretrained`` folder, or an :class:`~mmformer.model.MMFormer` in
memory) runs beside the student without gradient; the student's loss adds weighted distillation
terms (:mod:`mmformer.losses`) to the contrastive one:

- **affinity**: the student's image->text and text->image similarity distributions follow the
  teacher's (:func:`~mmformer.losses.affinity_distill_loss`);
- **feature**: the student's normalised embeddings, mapped to the teacher's width by a learned
  :class:`~mmformer.losses.FeatureProjection` when the widths differ, match the teacher's (MSE;
  :func:`~mmformer.losses.feature_distill_loss`, images and texts averaged);
- **interactive** (CLIP-KD): each student image must find its caption among the teacher's text
  embeddings and each student caption its image among the teacher's image embeddings
  (:func:`~mmformer.losses.interactive_contrastive_loss`).

The teacher is no submodule of the module: it is not in ``parameters()``, ``state_dict()``,
checkpoints, optimizer groups or the exported model, and it stays frozen in eval mode. Without
augmentation its embeddings are computed once per sample and cached (see :class:`TeacherCache`).
With ``inherit`` the student starts from the teacher's weights
(:func:`mmformer.compress.inherit.inherit_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmformer.compress.inherit import inherit_weights
from mmformer.losses import FeatureProjection, affinity_distill_loss, feature_distill_loss, interactive_contrastive_loss
from mmformer.model import TOKENIZER_NAME, MMFormer
from mmformer.training.module import MMFormerModule, in_memory_name
from mmformer.training.precision import has_native_bf16

log = logging.getLogger(__name__)

TEACHER_PRECISIONS = ("auto", "fp32", "bf16")
#: The distillation terms, by the name of their weight and their logged name ``train/loss_NAME``.
DISTILL_TERMS = ("affinity", "feature", "interactive")


@dataclass
class TeacherOutput:
    """The teacher's (B, E_t) unit-length float32 embeddings of a batch and its logit scale exp(t);
    ``cached``: the fraction of the batch's image embeddings that came from the cache."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    cached: float = 0.0


def cached_rows(
    store: dict[Hashable, torch.Tensor], keys: Sequence[Hashable], compute: Callable[[list[int]], torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """(B, E) rows for ``keys`` from ``store``, and how many of the B came from it. Keys not in
    ``store`` are computed once each: ``compute(rows)`` gets the batch rows of their first
    occurrence and returns their (M, E) values, which are stored."""
    missing: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        if key not in store and key not in missing:
            missing[key] = i
    hits = sum(1 for key in keys if key in store)
    if missing:
        values = compute(list(missing.values()))
        for key, value in zip(missing, values):
            store[key] = value
    return torch.stack([store[key] for key in keys]), hits


class TeacherCache:
    """The teacher's embeddings of training samples, each computed once.

    ``images``: by dataset index (``batch["indices"]``), valid only while a sample's pixels are the
    same in every epoch (training without augmentation); ``texts``: by caption text, valid always
    (the teacher's text embedding depends on nothing else). Memory: 4 * E_t bytes per sample and
    per distinct caption, on the training device.
    """

    def __init__(self, images: bool) -> None:
        self.cache_images = images
        self.images: dict[Hashable, torch.Tensor] = {}
        self.texts: dict[Hashable, torch.Tensor] = {}


class DistillModule(MMFormerModule):
    """Contrastive training of a student with distillation from a frozen teacher.

    The loss is ``clip_weight * contrastive + affinity_weight * affinity + feature_weight *
    feature + interactive_weight * interactive`` (the terms in the module docstring; the
    contrastive term is the parent's ``loss``, CLIP or SigLIP). Each term is logged as
    ``train/loss_NAME`` (``loss_clip`` or ``loss_siglip``, ``loss_affinity``, ...).

    Args:
        teacher: the teacher's ``save_pretrained`` folder (e.g. ``runs/teacher/model``), or an
            :class:`~mmformer.model.MMFormer` in memory (e.g. the unpruned model when a pruned one
            recovers, :mod:`mmformer.training.prune`): used as it is, put in eval mode with
            ``requires_grad`` off, and moved to the training device; the hyperparameters record
            :func:`~mmformer.training.module.in_memory_name` of it.
        affinity_weight, feature_weight, interactive_weight, clip_weight: the terms' weights
            (>= 0; 0 leaves a term out, and with every distillation weight 0 the teacher never runs).
        teacher_precision: how the teacher's forward runs: ``"fp32"``, ``"bf16"`` (autocast) or
            ``"auto"``: bf16 when the Trainer trains in bf16 or the device has native bf16 matmuls
            (CUDA with bf16, a CPU with AVX512-BF16 or AMX; :func:`~mmformer.training.precision.has_native_bf16`),
            else fp32. Its embeddings are always used in float32.
        cache_teacher: cache the teacher's embeddings (:class:`TeacherCache`): caption embeddings
            always; image embeddings only when the data module says its training images are not
            augmented (``ImageTextDataModule(augment=False)``); otherwise a log line says images are
            embedded every step.
        inherit: start the student from the teacher's weights (every other block for half the
            depth, the most important heads when it has fewer; see
            :func:`~mmformer.compress.inherit.inherit_weights`); an error when the shapes don't
            allow it. False = a fresh student.
        tokenizer: the student's tokenizer; None = the teacher folder's ``tokenizer.model`` (so both
            see the same token ids), else that of a ``pretrained`` student, else the package
            default. With an in-memory teacher the student keeps its own (a pruned student has
            its teacher's); for a fresh student pass ``tokenizer=PATH`` (when the two differ the
            teacher tokenizes the captions itself).
        **kwargs: :class:`MMFormerModule`'s arguments (``preset``, ``model_config``, ``lr``,
            ``time_budget_s``, ``loss``, ...), except ``contrastive_accum`` > 1.
    """

    progress_bar_logs = ("loss_affinity",)

    def __init__(
        self,
        teacher: str | MMFormer,
        affinity_weight: float = 1.0,
        feature_weight: float = 1.0,
        interactive_weight: float = 0.0,
        clip_weight: float = 1.0,
        teacher_precision: str = "auto",
        cache_teacher: bool = True,
        inherit: bool = False,
        tokenizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        if teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(f"teacher_precision={teacher_precision!r} must be one of {TEACHER_PRECISIONS}")
        weights = {
            "clip_weight": clip_weight,
            "affinity_weight": affinity_weight,
            "feature_weight": feature_weight,
            "interactive_weight": interactive_weight,
        }
        if min(weights.values()) < 0 or not max(weights.values()) > 0:
            raise ValueError(f"loss weights {weights} must be >= 0, one of them > 0")
        if int(kwargs.get("contrastive_accum", 1)) != 1:
            raise ValueError(
                f"contrastive_accum={kwargs['contrastive_accum']}: DistillModule does not support "
                "contrastive accumulation (its loss needs the teacher's embeddings of every micro-batch); "
                "accumulate with the Trainer's accumulate_grad_batches instead"
            )
        if inherit and kwargs.get("pretrained") is not None:
            raise ValueError(
                "inherit=true starts the student from the teacher's weights; it can't also start "
                f"from pretrained={kwargs['pretrained']!r}"
            )
        if isinstance(teacher, MMFormer):
            teacher_model = teacher.eval().requires_grad_(False)
            teacher = in_memory_name(teacher_model)  # what save_hyperparameters (in the parent) records
        else:
            teacher_model = MMFormer.from_pretrained(teacher).eval().requires_grad_(False)
            if tokenizer is None and (Path(teacher) / TOKENIZER_NAME).is_file():
                tokenizer = str(Path(teacher) / TOKENIZER_NAME)
        super().__init__(tokenizer=tokenizer, **kwargs)
        # a plain attribute, not a submodule: out of parameters(), state_dict(), .to() and .train()
        object.__setattr__(self, "_teacher", teacher_model)
        s, t = self.model.config, teacher_model.config
        if inherit:
            if (
                self.model.tokenizer is None
                or teacher_model.tokenizer is None
                or self.model.tokenizer._proto != teacher_model.tokenizer._proto
            ):
                raise ValueError(
                    f"inherit=true: the student's tokenizer is not the teacher's "
                    f"({teacher}/{TOKENIZER_NAME}); inherited token embeddings need the same token "
                    "ids (leave tokenizer unset)"
                )
            inherit_weights(self.model, teacher_model)
        needs_projection = (feature_weight or interactive_weight) and s.embed_dim != t.embed_dim
        self.feature_projection = FeatureProjection(s.embed_dim, t.embed_dim) if needs_projection else None
        self.teacher_cache: TeacherCache | None = None
        self._teacher_dtype: torch.dtype | None = None
        self._teacher_dtype_ready = False
        self._warned_no_index = False
        log.info(
            "distilling from %s (%d parameters) into a student of %d parameters",
            teacher,
            teacher_model.num_parameters(),
            self.model.num_parameters(),
        )

    @property
    def teacher(self) -> MMFormer:
        """The frozen teacher (not a submodule: never saved, trained or moved by Lightning)."""
        return self._teacher

    @property
    def uses_teacher(self) -> bool:
        """True when a distillation term has a weight (else the teacher never runs)."""
        return any(self.hparams[f"{name}_weight"] for name in DISTILL_TERMS)

    # ---- setup ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """The parent's setup; for ``fit``, decide what the teacher cache holds from the data
        module's ``augment``."""
        super().setup(stage)
        if stage != "fit" or not self.hparams.cache_teacher or not self.uses_teacher:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        augment = getattr(dm, "augment", None)
        if augment is False:
            self.teacher_cache = TeacherCache(images=True)
            log.info(
                "teacher cache: image embeddings by sample (the training images are not augmented), "
                "caption embeddings by text"
            )
            return
        self.teacher_cache = TeacherCache(images=False)
        why = "are augmented (data.augment=true)" if augment else "may be augmented (the data module does not say)"
        log.info(
            "teacher cache: image embeddings are not cached, the training images %s: the teacher embeds "
            "every batch's images; caption embeddings are cached by text",
            why,
        )

    def configure_model(self) -> None:
        """One process or DDP only: under ``ShardedStrategy`` / ``PipelineStrategy`` (a device mesh)
        the feature projection, outside the sharded model, would not be synchronised and the
        distillation terms gather over every rank, not the data-parallel group."""
        if self.device_mesh is not None:
            raise ValueError(
                "DistillModule runs on one process or under DDP; ShardedStrategy and PipelineStrategy "
                "(FSDP2, tensor or pipeline parallelism) are not supported"
            )
        super().configure_model()

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def teacher_dtype(self) -> torch.dtype | None:
        """The teacher's autocast dtype (None = fp32), from ``teacher_precision`` (decided once)."""
        if self._teacher_dtype_ready:
            return self._teacher_dtype
        choice = self.hparams.teacher_precision
        trainer_precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if choice == "auto":
            bf16 = trainer_precision.startswith("bf16") or has_native_bf16(self.device)
            reason = (
                f"the Trainer runs {trainer_precision}"
                if trainer_precision.startswith("bf16")
                else "native bf16 matmuls on this device"
                if bf16
                else "no native bf16 matmuls on this device"
            )
            choice = "bf16" if bf16 else "fp32"
            log.info("teacher precision auto -> %s (%s)", choice, reason)
        self._teacher_dtype = torch.bfloat16 if choice == "bf16" else None
        self._teacher_dtype_ready = True
        return self._teacher_dtype

    # ---- the teacher ---------------------------------------------------------------------
    def _autocast(self, device: torch.device) -> torch.autocast:
        dtype = self.teacher_dtype()
        if dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=dtype)

    def _teacher_images(self, images: torch.Tensor) -> torch.Tensor:
        """The student's normalised (B, 3, S, S) images as the teacher expects them (its size and
        normalisation); unchanged when both agree."""
        s, t = self.model.config, self.teacher.config
        if (s.image_size, s.image_mean, s.image_std) == (t.image_size, t.image_mean, t.image_std):
            return images
        view = (1, 3, 1, 1)
        pixels = images.float() * images.new_tensor(s.image_std).view(view) + images.new_tensor(s.image_mean).view(view)
        if s.image_size != t.image_size:
            pixels = F.interpolate(
                pixels, size=(t.image_size, t.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return (pixels - pixels.new_tensor(t.image_mean).view(view)) / pixels.new_tensor(t.image_std).view(view)

    def _teacher_tokens(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and mask for the teacher: the batch's own when the teacher has the student's
        tokenizer (or neither has one: in-memory models fed tokenized batches) and no shorter
        context, else its captions tokenized by the teacher."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        s_tok, t_tok = self.model.tokenizer, self.teacher.tokenizer
        same = (s_tok is None and t_tok is None) or (
            s_tok is not None and t_tok is not None and s_tok._proto == t_tok._proto
        )
        if same and ids.shape[1] <= self.teacher.config.context_length:
            return ids, mask
        if t_tok is None:
            raise ValueError(
                f"the teacher tokenizes differently from the student but it ({self.hparams.teacher}) "
                f"has no {TOKENIZER_NAME}"
            )
        if "captions" not in batch:
            raise ValueError("the teacher tokenizes differently from the student: batches need their 'captions'")
        t_ids, t_mask = t_tok(list(batch["captions"]), max_length=self.teacher.config.context_length)
        return t_ids.to(ids.device), t_mask.to(ids.device)

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast(images.device):  # fp32 in (a bf16-true Trainer hands bf16 batches), autocast or not
            return F.normalize(self.teacher.encode_image(self._teacher_images(images).float()).float(), dim=-1)

    def _encode_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self._autocast(ids.device):
            return F.normalize(self.teacher.encode_text(ids, mask).float(), dim=-1)

    @torch.no_grad()
    def teacher_outputs(self, batch: dict[str, Any]) -> TeacherOutput:
        """The teacher's embeddings of ``batch`` (through the cache where it holds them)."""
        images = batch["images"]
        if self.teacher.logit_scale.device != images.device:
            self.teacher.to(images.device)
        cache, b = self.teacher_cache, images.shape[0]
        indices = batch.get("indices")
        hits = 0
        if cache is not None and cache.cache_images and indices is not None and bool((indices >= 0).all()):
            t_img, hits = cached_rows(cache.images, indices.tolist(), lambda rows: self._encode_images(images[rows]))
        else:
            if cache is not None and cache.cache_images and not self._warned_no_index:
                log.warning(
                    "teacher cache: a batch without sample indices (shards give -1); its images are embedded "
                    "without the cache"
                )
                self._warned_no_index = True
            t_img = self._encode_images(images)
        ids, mask = self._teacher_tokens(batch)
        if cache is not None and "captions" in batch:
            t_txt, _ = cached_rows(
                cache.texts, list(batch["captions"]), lambda rows: self._encode_texts(ids[rows], mask[rows])
            )
        else:
            t_txt = self._encode_texts(ids, mask)
        t = self.teacher
        scale = t.logit_scale.detach().float().exp().clamp(max=t.config.logit_scale_max)
        return TeacherOutput(t_img, t_txt, scale, cached=hits / max(b, 1))

    # ---- the loss ------------------------------------------------------------------------
    def loss_terms(
        self, out: dict[str, torch.Tensor], teacher: TeacherOutput | None, positives: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The unweighted terms whose weight is not 0, by name (``clip``, ``affinity``, ``feature``,
        ``interactive``) from the student's forward output ``out`` and the teacher's embeddings."""
        hp = self.hparams
        img, txt, scale = out["image_embeds"], out["text_embeds"], out["logit_scale"]
        terms: dict[str, torch.Tensor] = {}
        if hp.clip_weight:
            terms["clip"] = self.contrastive_loss(img, txt, out, positives)
        if not self.uses_teacher:
            return terms
        if teacher is None:
            raise ValueError("distillation terms need the teacher's embeddings")
        proj = self.feature_projection
        if hp.affinity_weight:
            terms["affinity"] = affinity_distill_loss(
                img, txt, scale, teacher.image_embeds, teacher.text_embeds, teacher.logit_scale
            )
        if hp.feature_weight:
            terms["feature"] = (
                feature_distill_loss(img, teacher.image_embeds, proj)
                + feature_distill_loss(txt, teacher.text_embeds, proj)
            ) / 2
        if hp.interactive_weight:
            img_t = F.normalize(proj(img), dim=-1) if proj is not None else img
            txt_t = F.normalize(proj(txt), dim=-1) if proj is not None else txt
            terms["interactive"] = interactive_contrastive_loss(
                img_t, txt_t, teacher.image_embeds, teacher.text_embeds, scale, positives
            )
        return terms

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of :meth:`loss_terms`; logs each term (``loss_clip``, ...), the logit
        scale and ``teacher_cached`` (the fraction of image embeddings taken from the cache)."""
        out = self(batch["images"], batch["input_ids"], batch["attention_mask"])
        positives = batch.get("concepts") if self.hparams.concept_positives else None
        teacher = self.teacher_outputs(batch) if self.uses_teacher else None
        terms = self.loss_terms(out, teacher, positives)
        loss = sum(self.hparams[f"{name}_weight"] * value for name, value in terms.items())
        logs = {
            f"loss_{self.hparams.loss if name == 'clip' else name}": value.detach() for name, value in terms.items()
        }
        logs["logit_scale"] = out["logit_scale"].detach()
        if self.logit_bias is not None:
            logs["logit_bias"] = self.logit_bias.detach()
        if teacher is not None and self.teacher_cache is not None and self.teacher_cache.cache_images:
            logs["teacher_cached"] = out["logit_scale"].detach().new_tensor(teacher.cached)
        return loss, logs

    # ---- optimisation ----------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The parent's groups, with the feature projection's matrix among the decayed weights
        (the teacher has no parameters here)."""
        groups = super().optimizer_groups()
        if self.feature_projection is not None:
            groups[0]["params"] = list(groups[0]["params"]) + list(self.feature_projection.parameters())
        return groups
