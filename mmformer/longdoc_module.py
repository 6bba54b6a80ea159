"""Fine-tuning document fusion on needle documents (``train/longdoc.yaml``).

:class:`LongDocModule` subclasses :class:`mmformer.module.MMFormerModule`: it starts from a
trained model, adds a :class:`~mmformer.layers.fusion.DocumentFusion` (gate at zero) and trains
it (by default only it: the trunk, projections and logit scale stay frozen, so every other
embedding of the model is unchanged) with the CLIP loss between images and needle documents.

:class:`NeedleDataModule` pairs the emoji images of the **train** split (training families only;
the held-out twitter family is never seen) with documents of prose filler and the image's
caption inserted at a random position, drawn afresh every epoch; validation uses the val split
(unseen concepts) at one fixed document length and seed.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmformer.data.emoji import EmojiData, default_data_dir
from mmformer.data.longdoc import DocumentCollator, Filler, NeedleCollator, NeedleDataset, load_prose
from mmformer.losses import clip_loss
from mmformer.module import MMFormerModule
from mmformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class LongDocModule(MMFormerModule):
    """Contrastive fine-tuning of document fusion.

    Args:
        pretrained: ``save_pretrained`` directory of a trained model (required).
        fusion_latents: learned latent queries M of the fusion module (if the model has none).
        train_trunk: also train the encoder, projections and logit scale (default: fusion only).
        export_dir: write the fine-tuned model there (``save_pretrained``) when fit ends.
        gate_lr_scale: the fusion gate's learning rate in multiples of ``lr``. The gate starts at
            zero and Adam moves a parameter by about ``lr`` per step, so at ``lr`` alone the
            fusion term would stay near zero for hundreds of steps (measured: tanh(gate) = 0.07
            after 44 steps at lr 2e-3); a larger rate lets it open within tens of steps.
        The rest as :class:`MMFormerModule` (optimizer, schedule, time budget).
    """

    def __init__(self, pretrained: str, fusion_latents: int = 16, train_trunk: bool = False,
                 tokenizer: str | None = None, lr: float = 1e-3, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, warmup_steps: int = 20,
                 min_lr_ratio: float = 0.0, concept_positives: bool = True,
                 time_budget_s: float | None = None, export_dir: str | None = None,
                 gate_lr_scale: float = 50.0) -> None:
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, lr=lr, weight_decay=weight_decay,
                         betas=betas, eps=eps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                         concept_positives=concept_positives, time_budget_s=time_budget_s)
        # The parent's save_hyperparameters records this class's arguments; under LightningCLI it
        # records only the config given, so give the parent's other options their defaults.
        for name, par in inspect.signature(MMFormerModule.__init__).parameters.items():
            if name != "self" and name not in self.hparams and par.default is not inspect.Parameter.empty:
                self.hparams[name] = par.default
        if self.model.fusion is None:
            self.model.enable_fusion(fusion_latents)
        for name, p in self.model.named_parameters():
            p.requires_grad_(train_trunk or name.startswith("fusion."))
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("training %d parameters (%s)", n, "all" if train_trunk else "fusion only")

    def configure_optimizers(self) -> dict[str, Any]:
        """The parent's AdamW and schedule, with the gate in its own group at ``gate_lr_scale * lr``."""
        conf = super().configure_optimizers()
        opt = conf["optimizer"]
        gate = self.model.fusion.gate
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if p is not gate]
        if gate.requires_grad:
            lr = self.hparams.lr * self.hparams.gate_lr_scale
            opt.add_param_group({"params": [gate], "weight_decay": 0.0, "lr": lr, "initial_lr": lr})
            sched = conf["lr_scheduler"]["scheduler"]
            sched.base_lrs.append(lr)
            sched.lr_lambdas.append(sched.lr_lambdas[0])
        return conf

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.model.save_pretrained(self.hparams.export_dir)
            log.info("wrote the fine-tuned model to %s", self.hparams.export_dir)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with torch.set_grad_enabled(self.hparams.train_trunk):
            image = self.model.encode_image(batch["images"])
        doc = torch.nn.functional.normalize(self.model.forward_document(batch["documents"])["fusion"], dim=-1)
        scale = self.model.logit_scale.exp().clamp(max=self.model.config.logit_scale_max)
        positives = batch["concepts"] if self.hparams.concept_positives else None
        loss = clip_loss(image, doc, scale, positives)
        bs = batch["images"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/gate", torch.tanh(self.model.fusion.gate).detach(), prog_bar=True, batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", opt.param_groups[0]["lr"], batch_size=batch["images"].shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._val_outputs.append({
            "image": self.model.encode_image(batch["images"]).float(),
            "text": self.model.encode_document(batch["documents"], mode="fusion").float(),
            "image_ids": batch["indices"].long(),
            "concepts": batch["concepts"].long(),
        })


class NeedleDataModule(L.LightningDataModule):
    """Emoji images with needle documents (see module docstring).

    Args:
        root: emoji data directory (default: bundled).
        prose: prose text file (default: ``data/prose/kjv.txt``).
        lengths: training document lengths in pieces, drawn uniformly per document.
        val_length: validation document length in pieces.
        batch_size, num_workers: loaders.
        image_size: image side the model expects.
        max_chunks: chunk cap; a document over it is an error (the lengths should fit it).
    """

    def __init__(self, root: str | None = None, prose: str | None = None,
                 lengths: Sequence[int] = (14, 64, 128, 256, 512, 1024), val_length: int = 512,
                 batch_size: int = 64, num_workers: int = 0, image_size: int = 64,
                 max_chunks: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = None
        self.train_ds: NeedleDataset | None = None
        self.val_ds: NeedleDataset | None = None

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        if self.tokenizer is None and self.trainer is not None:  # Lightning sets up data before the module
            self.tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        if self.tokenizer is None:
            raise RuntimeError("NeedleDataModule needs a tokenizer: call set_tokenizer or attach it to a Trainer "
                               "whose module has one")
        if self.train_ds is not None:
            return
        hp = self.hparams
        root = hp.root or default_data_dir()
        filler = Filler(self.tokenizer, load_prose(self.tokenizer, hp.prose))
        train = EmojiData.load(root, "train", hp.image_size)
        val = EmojiData.load(root, "val", hp.image_size)
        self.train_ds = NeedleDataset(train.images, train.captions, self.tokenizer, filler, hp.lengths,
                                      train.concept_ids, seed=hp.seed)
        self.val_ds = NeedleDataset(val.images, val.captions, self.tokenizer, filler, [hp.val_length],
                                    val.concept_ids, seed=hp.seed + 1, fixed=True)

    def _collate(self) -> NeedleCollator:
        length = self.trainer.lightning_module.model.config.context_length if self.trainer else 16
        return NeedleCollator(DocumentCollator(self.tokenizer, length, max_chunks=self.hparams.max_chunks))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_ds, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers, collate_fn=self._collate(),
                          persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_ds, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=0, collate_fn=self._collate())


def main(argv: list[str] | None = None) -> None:
    """``python -m mmformer.longdoc_module fit --config train/longdoc.yaml``: LightningCLI over
    :class:`LongDocModule` and :class:`NeedleDataModule`."""
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(LongDocModule, NeedleDataModule, args=argv, save_config_kwargs={"overwrite": True},
                 parser_kwargs={"default_env": False})


if __name__ == "__main__":
    main()
