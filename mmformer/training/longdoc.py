"""Fine-tuning for long documents on needle documents (``train/longdoc-stage1.yaml``, then
``train/longdoc.yaml``).

:class:`LongDocModule` subclasses :class:`mmformer.training.module.MMFormerModule`: it starts from a
trained model, adds a :class:`~mmformer.layers.fusion.DocumentFusion` (gate at zero) and trains
what ``trainable`` names: by default (``"document"``) the fusion and a document expert, the
model's own route for the windows of multi-window documents, so that images, short texts and
one-window documents keep their embeddings bit for bit. Losses: distillation of the model's own
embedding of the bare caption into the fused document (and into every window that holds the
caption), optionally the CLIP loss between images and documents. With only the fusion training,
:class:`ProseStateCache` replaces the encoder call over prose windows with a lookup.

Its data module is :class:`mmformer.training.datamodule.NeedleDataModule`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmformer.data.longdoc import NeedleDataset, caption_windows
from mmformer.documents import DocumentBatch
from mmformer.losses import clip_loss
from mmformer.model import MMFormer, eval_mode
from mmformer.runtime import flush_denormals
from mmformer.tokenizer import BOS_ID, EOS_ID, chunk_starts
from mmformer.training.module import MMFormerModule

log = logging.getLogger(__name__)


TRAINABLE = ("fusion", "document", "text", "all")


def trains(role: str, trainable: str) -> bool:
    """Whether a parameter of ``role`` (:meth:`MMFormer.parameter_roles`) trains under
    ``trainable`` (see :class:`LongDocModule`): the fusion module always; with ``"text"`` or
    ``"document"`` also the parameters only that route uses; with ``"all"`` everything."""
    return trainable == "all" or role in ("fusion", trainable)


class ProseStateCache:
    """Token states of every window of a prose text under a frozen text path.

    Windows are encoded independently, so the states of a document window that holds
    ``pieces`` consecutive prose pieces are those of the same prose window in any other
    document. Needle documents are almost all prose: with the text path frozen (only the fusion
    trains), the cache turns the encoder call over all chunks of a batch into a lookup plus an
    encoder call over the few windows that hold caption pieces (or cross a filler junction).

    Args:
        model: the model whose (frozen) text path makes the states.
        prose_ids: the prose as piece ids (the filler's :attr:`~mmformer.data.longdoc.Filler.ids`).
        pieces, stride: the windows' pieces and the pieces between window starts (the
            model's :meth:`~mmformer.model.MMFormer.document_collator`'s).
        dtype: storage dtype of the states (bfloat16 halves the memory; they are used in the
            model's dtype).
        max_bytes: cache only the windows starting in the first part of the prose that fits
            (on the model's device);
            windows beyond it are encoded as usual.
        batch_windows: windows per encoder call while building.
    """

    def __init__(
        self,
        model: MMFormer,
        prose_ids: Sequence[int],
        pieces: int,
        stride: int,
        dtype: torch.dtype = torch.bfloat16,
        max_bytes: float = 8e9,
        batch_windows: int = 2048,
    ) -> None:
        self.pieces, self.stride = pieces, stride
        self.prose = torch.tensor(list(prose_ids), dtype=torch.long)
        length, width = pieces + 2, model.config.width
        per_window = length * width * torch.finfo(dtype).bits // 8
        n = min(max(len(self.prose) - pieces + 1, 0), int(max_bytes // per_window))
        device = model.logit_scale.device  # the states live where the model does (a GPU's memory)
        self.states = torch.empty(n, length, width, dtype=dtype, device=device)
        # windows of documents longer than one window: the document expert's route, if any
        modality = "document" if model.config.document_expert else "text"
        offsets = torch.arange(pieces)
        with eval_mode(model), torch.inference_mode():
            for s in range(0, n, batch_windows):
                starts = torch.arange(s, min(s + batch_windows, n))
                ids = self._window_ids(starts[:, None] + offsets)
                states = model.forward_text_features(ids.to(device), modality=modality)
                self.states[s : s + len(starts)] = states.to(dtype)
        log.info("cached the token states of %d prose windows (%.0f MB, %s)", n, n * per_window / 2**20, dtype)

    def __len__(self) -> int:
        return int(self.states.shape[0])

    def _window_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """(W, pieces) prose positions -> (W, pieces + 2) ids ``[bos] pieces [eos]``."""
        bos = torch.full((positions.shape[0], 1), BOS_ID, dtype=torch.long)
        return torch.cat([bos, self.prose[positions], torch.full_like(bos, EOS_ID)], dim=1)

    def cached_windows(
        self, batch: DocumentBatch, sources: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which chunks of ``batch`` are cached prose windows: (rows, starts), the chunk rows
        and the prose positions their windows start at. ``sources`` give each document piece's
        prose position (-1 = not prose), as :class:`~mmformer.data.longdoc.NeedleDataset` does.
        Only chunks of documents of more than one chunk are taken from the cache."""
        rows, starts = [], []
        row = 0
        for src, count in zip(sources, batch.chunk_counts.tolist()):
            if count == 1:
                row += 1
                continue
            a = np.asarray(src, dtype=np.int64)
            # runs[p] = number of steps of +1 among the first p pieces
            runs = np.concatenate([[0], np.cumsum(np.diff(a) == 1)]) if len(a) else a
            for p in chunk_starts(len(a), self.pieces, self.stride):
                end = p + self.pieces - 1
                if end < len(a) and a[p] >= 0 and runs[end] - runs[p] == self.pieces - 1 and a[p] < len(self):
                    rows.append(row)
                    starts.append(int(a[p]))
                row += 1
        if row != batch.input_ids.shape[0]:
            raise ValueError(
                f"the sources describe {row} chunks but the batch has {batch.input_ids.shape[0]} "
                "(were the documents chunked with another stride or cut by max_chunks?)"
            )
        return torch.tensor(rows, dtype=torch.long), torch.tensor(starts, dtype=torch.long)

    def states_for(self, model: MMFormer, batch: DocumentBatch, sources: Sequence[Sequence[int]]) -> torch.Tensor:
        """(C, L, D) token states of every chunk of ``batch``: cached where the chunk is a prose
        window, one encoder call over the rest (without gradient: the text path is frozen)."""
        rows, starts = self.cached_windows(batch, sources)
        ids, mask = batch.input_ids, batch.attention_mask
        live = torch.ones(ids.shape[0], dtype=torch.bool)
        live[rows] = False
        dtype = model.logit_scale.dtype
        states = ids.new_empty((*ids.shape, model.config.width), dtype=dtype)
        if len(rows):
            expected = self._window_ids(starts[:, None] + torch.arange(self.pieces)).to(ids.device)
            if ids.shape[1] != expected.shape[1] or not torch.equal(ids[rows.to(ids.device)], expected):
                raise ValueError(
                    "cached prose windows do not match the batch's chunks: the documents were not "
                    "made from the prose this cache was built on"
                )
            states[rows.to(ids.device)] = self.states[starts.to(self.states.device)].to(device=ids.device, dtype=dtype)
        if bool(live.any()):
            live = live.to(ids.device)
            with torch.no_grad():
                states[live] = model.chunk_states(ids[live], mask[live], batch.in_long_document[live]).to(dtype)
        return states


class LongDocModule(MMFormerModule):
    """Fine-tuning of document fusion (and a document expert) on needle documents.

    Args:
        pretrained: ``save_pretrained`` directory of a trained model (required).
        fusion_latents: learned latent queries M of the fusion module (if the model has none).
        trainable: which parameters train:
            ``"fusion"`` the fusion module only (every other embedding of the model unchanged);
            ``"document"`` (default) the fusion module and a document expert (added from the
            text path's parts if the model has none, :meth:`MMFormer.enable_document_expert`):
            chunks of long documents learn to read a caption among prose while images and
            short texts (one window) embed exactly as before;
            ``"text"`` the fusion module and the text-only parameters (role ``"text"`` in
            :meth:`MMFormer.parameter_roles`: token embedding, the blocks' text parts, final
            text norm, text projection):
            the shared attention projections, every image parameter and the logit scale stay
            frozen, so image embeddings are unchanged bit for bit, short texts are not;
            ``"all"`` every parameter.
        export_dir: write the fine-tuned model there (``save_pretrained``) when fit ends.
        gate_lr_scale: the fusion gate's learning rate in multiples of ``lr``. The gate starts at
            zero and Adam moves a parameter by about ``lr`` per step, so at ``lr`` alone the
            fusion term would stay near zero for hundreds of steps; a larger rate lets it open
            within tens of steps.
        clip_weight: weight of the CLIP loss between images and documents.
        distill_weight: weight of the caption distillation term:
            ``1 - cos(document embedding, teacher embedding of the bare caption)``, averaged
            over the batch. The teacher is the model as loaded from ``pretrained``: the model
            itself when its text path stays frozen (``"fusion"``, ``"document"``), else a frozen
            copy, kept in checkpoints. It tells the text path and the fusion what a needle document should embed
            as, for every document rather than only relative to the batch's other documents, and
            keeps bare captions where the teacher put them. 0 = CLIP loss only.
        window_distill_weight: weight of the same term for every chunk of a (multi-chunk) needle
            document that holds the whole caption: such a window should embed as the bare
            caption. A dense signal for the chunk encoder (``"document"`` / ``"text"`` /
            ``"all"``); it gives no gradient to the fusion.
            One of the three weights must be positive.
        cache_states: with ``trainable="fusion"``, build a :class:`ProseStateCache` of the
            training prose when fit starts and take the states of prose windows from it (the
            same states, up to ``cache_dtype`` rounding, at a fraction of the encoder cost).
        cache_dtype: ``"bfloat16"`` or ``"float32"``.
        cache_max_gb: memory cap of the cache; prose windows beyond it are encoded as usual.
        chunk_stride: pieces between window starts for documents (``ModelConfig.chunk_stride``,
            stored with the exported model; None keeps the model's). Overlapping windows (e.g.
            half the window) put every caption of up to ``window - stride`` pieces whole into
            some window, at twice the encode cost.
        kwargs: the other options of :class:`MMFormerModule` (``tokenizer``, optimizer, schedule,
            ``time_budget_s``, ``nonfinite``, ``compile``, ...), with its defaults; they behave as
            there. ``contrastive_accum`` > 1 is refused.
    """

    progress_bar_logs = ("distill", "gate")

    def __init__(
        self,
        pretrained: str,
        fusion_latents: int = 16,
        trainable: str = "document",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 20,
        export_dir: str | None = None,
        gate_lr_scale: float = 50.0,
        clip_weight: float = 1.0,
        distill_weight: float = 1.0,
        window_distill_weight: float = 0.0,
        chunk_stride: int | None = None,
        cache_states: bool = False,
        cache_dtype: str = "bfloat16",
        cache_max_gb: float = 8.0,
        **kwargs: Any,
    ) -> None:
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable={trainable!r} must be one of {TRAINABLE}")
        if kwargs.get("loss", "clip") != "clip":
            raise ValueError(
                f"loss={kwargs['loss']!r}: LongDocModule's optional image-document term is the CLIP loss; use loss=clip"
            )
        if int(kwargs.get("contrastive_accum", 1)) != 1:
            raise ValueError(
                f"contrastive_accum={kwargs['contrastive_accum']}: LongDocModule does not support contrastive "
                "accumulation (its distillation terms are per document; only its optional CLIP term sees the "
                "batch); accumulate with the Trainer's accumulate_grad_batches instead"
            )
        super().__init__(pretrained=pretrained, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs)
        if chunk_stride is not None:  # validated by ModelConfig; saved with the model
            self.model.config = dataclasses.replace(self.model.config, chunk_stride=chunk_stride)
        if cache_states and trainable != "fusion":
            raise ValueError(
                f"cache_states needs frozen chunk encoders (trainable='fusion'), got trainable={trainable!r}"
            )
        if cache_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"cache_dtype={cache_dtype!r} must be 'bfloat16' or 'float32'")
        self.state_cache: ProseStateCache | None = None
        weights = {
            "clip_weight": clip_weight,
            "distill_weight": distill_weight,
            "window_distill_weight": window_distill_weight,
        }
        if min(weights.values()) < 0 or not max(weights.values()) > 0:
            raise ValueError(f"loss weights {weights} must be >= 0, one of them > 0")
        # The text path as loaded embeds the bare captions (the distillation targets). When it
        # trains, keep a frozen copy; otherwise the model itself serves.
        self.teacher: MMFormer | None = None
        if (distill_weight or window_distill_weight) and trainable in ("text", "all"):
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher.fusion = None
        if trainable == "document":
            self.model.enable_document_expert()
        if self.model.fusion is None:
            self.model.enable_fusion(fusion_latents)
        roles = self.model.parameter_roles()
        for name, p in self.model.named_parameters():
            p.requires_grad_(trains(roles[name], trainable))
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("training %d of %d parameters (%s)", n, self.model.num_parameters(), trainable)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The parent's groups, with the gate in its own group at ``gate_lr_scale * lr``."""
        gate = self.model.fusion.gate
        groups = super().optimizer_groups()
        for group in groups:
            group["params"] = [p for p in group["params"] if p is not gate]
        if gate.requires_grad:
            groups.append({"params": [gate], "weight_decay": 0.0, "lr": self.hparams.lr * self.hparams.gate_lr_scale})
        return groups

    def on_fit_start(self) -> None:
        flush_denormals()
        if not self.hparams.cache_states or self.state_cache is not None:
            return
        ds = getattr(getattr(self.trainer, "datamodule", None), "train_ds", None)
        if not isinstance(ds, NeedleDataset):
            raise RuntimeError("cache_states needs the NeedleDataModule's training prose (its train_ds.filler)")
        self.state_cache = ProseStateCache(
            self.model,
            ds.filler.ids,
            self.model.config.context_length - 2,
            self.model.document_stride,
            getattr(torch, self.hparams.cache_dtype),
            self.hparams.cache_max_gb * 1e9,
        )

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.model.save_pretrained(self.hparams.export_dir)
            log.info("wrote the fine-tuned model to %s", self.hparams.export_dir)

    def setup(self, stage: str) -> None:
        """The parent's setup, then hand a data module that chunks documents
        (``set_document_collator``, e.g. :class:`~mmformer.training.datamodule.NeedleDataModule`) the model's window and stride."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "set_document_collator"):
            dm.set_document_collator(self.model.document_collator())

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted CLIP, caption distillation and window distillation terms (see the class)."""
        hp, model = self.hparams, self.model
        docs = batch["documents"]
        if self.state_cache is not None:
            states = self.state_cache.states_for(model, docs, batch["doc_sources"])
        else:
            states = model.chunk_states(docs.input_ids, docs.attention_mask, docs.in_long_document)
        # losses in float32 (under bf16 autocast the embeddings come out in bf16)
        doc = F.normalize(model.forward_document(docs, states=states)["fusion"].float(), dim=-1)
        logs: dict[str, torch.Tensor] = {}
        loss = doc.new_zeros(())
        if hp.clip_weight:
            with torch.set_grad_enabled(hp.trainable == "all"):
                image = model.encode_image(batch["images"])
            scale = model.logit_scale.exp().clamp(max=model.config.logit_scale_max)
            logs["clip"] = clip_loss(
                image, doc, scale, batch["concepts"] if hp.concept_positives else None, group=self.loss_group
            )
            loss = loss + hp.clip_weight * logs["clip"]
        if hp.distill_weight or hp.window_distill_weight:
            with torch.no_grad():
                target = (
                    (model if self.teacher is None else self.teacher)
                    .encode_text(batch["caption_ids"], batch["caption_mask"])
                    .float()
                )
        if hp.distill_weight:
            logs["distill"] = (1 - (doc * target).sum(-1)).mean()
            loss = loss + hp.distill_weight * logs["distill"]
        if hp.window_distill_weight:
            rows, owners = caption_windows(
                batch["doc_sources"], docs.chunk_counts, model.config.context_length - 2, model.document_stride
            )
            if len(rows):
                rows = rows.to(states.device)
                window = F.normalize(
                    model.text_proj(model.pool_text(states[rows], docs.attention_mask[rows])).float(), dim=-1
                )
                logs["window_distill"] = (1 - (window * target[owners.to(doc.device)]).sum(-1)).mean()
                loss = loss + hp.window_distill_weight * logs["window_distill"]
        logs["gate"] = torch.tanh(model.fusion.gate).detach()
        return loss, logs

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._val_outputs.append(
            {
                "image": self.model.encode_image(batch["images"]).float(),
                "text": self.model.encode_document(batch["documents"], mode="fusion").float(),
                "image_ids": batch["indices"].long(),
                "concepts": batch["concepts"].long(),
            }
        )
