"""MMFormer: one stack of multiway blocks serving an image path and a text path.

Data flow (see DESIGN.md):

- image (B, 3, H, W) -> 16x16 (or 8x8) patch embedding + class token + 2-D positions
  -> pre-norm -> blocks(modality="image") -> final norm -> class token -> projection -> L2-normalised (B, E)
- ids (B, T) -> token embedding + scaled sinusoidal positions -> blocks(modality="text",
  key padding mask) -> final norm -> EOS state -> projection -> L2-normalised (B, E)

A checkpoint directory holds ``config.json`` + ``model.safetensors`` (+ ``tokenizer.model``, or
``clip_bpe.txt.gz`` for CLIP's tokenizer).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmformer.bpe import CLIP_BPE_NAME, ClipTokenizer
from mmformer.config import DOCUMENT_MODES, LATER_FIELDS, RETIRED_FIELDS, ModelConfig
from mmformer.documents import DocumentCollator
from mmformer.files import atomic_path
from mmformer.layers.attention import AttendFn, attend
from mmformer.layers.causal import causal_attend
from mmformer.layers.cpu_attention import attend_fused_cpu
from mmformer.layers.fusion import DocumentFusion
from mmformer.layers.init import init_linears_and_norms
from mmformer.layers.multiway import MultiwayBlock, each, sharing
from mmformer.layers.packing import TokenPacking
from mmformer.layers.positions import sincos_2d, sinusoidal_1d
from mmformer.layers.sparse import make_attend
from mmformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
#: ``ModelConfig.attention_kernel`` -> the blocks' dense attention (one switch; the default is the reference)
ATTENTION_KERNEL_FNS: dict[str, AttendFn] = {"default": attend, "fused_cpu": attend_fused_cpu}
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.model"
#: vocabulary size of CLIP's BPE tokenizer: an imported CLIP model of this size gets it attached
CLIP_VOCAB_SIZE = 49408


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; afterwards every submodule gets back its own previous
    train/eval flag (a frozen teacher kept in eval stays in eval), also when the block raises."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _tracing() -> bool:
    """True while the graph is traced, compiled or exported (no inference mode may be entered)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): a stride-``patch`` convolution, kept as timm's ``proj`` Conv2d
    parameters and computed as one matmul over the flattened patches (the same numbers; on the
    CPU the matmul's backward is several times faster than the convolution's in bf16)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        patches = (
            x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        )
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


def drop_patches(x: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 1+N, D) image tokens, class token first -> (B, 1+K, D): the class token and, per image, a
    random K = N - round(fraction * N) of its N patch tokens (at least one), in their original
    order. The positions must already be added (FLIP's patch dropout, open_clip's ``patch_dropout``)."""
    b, t, d = x.shape
    n = t - 1
    keep = max(1, n - round(fraction * n))
    if keep >= n:
        return x
    order = torch.rand(b, n, device=x.device, generator=generator).argsort(dim=1)[:, :keep].sort(dim=1).values
    patches = x[:, 1:].gather(1, order.unsqueeze(-1).expand(b, keep, d))
    return torch.cat([x[:, :1], patches], dim=1)


class MMFormer(nn.Module):
    """Image-text model with attention weights shared across modalities.

    Args:
        config: the model's shape; see :class:`mmformer.config.ModelConfig`.
        tokenizer: optional tokenizer kept with the model and saved beside it: SentencePiece
            (:class:`mmformer.tokenizer.Tokenizer`) or CLIP's BPE (:class:`mmformer.bpe.ClipTokenizer`).
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | ClipTokenizer | None = None) -> None:
        super().__init__()
        c = self.config = config
        self.tokenizer = tokenizer
        d = c.width
        # image path
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, d, c.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        pos = (
            c.pos_scale * torch.cat([torch.zeros(1, d), sincos_2d(c.grid_size, c.grid_size, d)])[None]
            if c.image_pos == "sincos"
            else torch.zeros(1, 1 + c.num_patches, d)
        )
        if c.image_pos == "learned":
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", pos, persistent=False)  # (1, 1+N, D), cls gets 0
        self.norm_pre = nn.LayerNorm(d, eps=c.ln_eps) if c.image_pre_norm else nn.Identity()
        # text path
        td = c.text_dim  # the trunk's width unless the text path has its own (share="none")
        self.token_embed = nn.Embedding(c.vocab_size, td)
        if c.text_pos == "learned":
            self.text_pos = nn.Parameter(torch.zeros(c.context_length, td))  # (T, D)
        else:
            self.register_buffer("text_pos", c.pos_scale * sinusoidal_1d(c.context_length, td), persistent=False)
        # shared trunk
        shapes = c.modality_shapes if c.text_shape != (d, c.heads, c.mlp_hidden) else None
        self.blocks = nn.ModuleList(  # a pruned config gives blocks fewer heads of the same width
            MultiwayBlock(
                d,
                h,
                c.mlp_hidden,
                c.share,
                c.block_modalities(i),
                c.qkv_bias,
                c.ln_eps,
                c.head_dim,
                c.mlp_act,
                shapes,
                attend=ATTENTION_KERNEL_FNS[c.attention_kernel],
            )
            for i, h in enumerate(c.heads_per_block)
        )
        self.norm = nn.ModuleDict({m: nn.LayerNorm(c.modality_shapes[m][0], eps=c.ln_eps) for m in c.modalities})
        # long documents' own token embeddings (with the document expert)
        self.document_embed = nn.Embedding(c.vocab_size, td) if c.document_expert else None
        # joint space
        self.image_proj = nn.Linear(d, c.embed_dim, bias=False)
        self.text_proj = nn.Linear(td, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(c.logit_scale_init)))
        # long documents: text attention kernel (dense or sparse) and chunk fusion (optional)
        self.set_text_attention(c.attention)
        self.fusion = self._make_fusion(c) if c.fusion_latents else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP-style initialisation, scaled by width D and depth L.

        qkv ~ N(0, D^-1/2), fc1 ~ N(0, (2D)^-1/2), the residual-branch outputs (attention
        ``proj``, ``fc2``) ~ N(0, D^-1/2 (2L)^-1/2), joint-space projections ~ N(0, D^-1/2),
        token embeddings and class token ~ N(0, 0.02); biases 0, LayerNorms 1/0.

        Why not sqrt(D)-scaled token embeddings: with unit-scale embeddings plus a unit sin-cos
        table the input-independent part of the residual stream (EOS token, positions) dominates
        at init, pooled features of different captions have cosine ~0.97, and contrastive
        training collapsed every embedding to one point at lr >= 3e-4 on the emoji data
        (measured). Small embeddings with the tables scaled by ``pos_scale`` and a pre-norm on
        the image path let the blocks' content dominate, and training moves at once.
        """
        stds = self._linear_init_stds()
        fusion = getattr(self, "fusion", None)
        own_init = {id(m) for m in fusion.modules()} if fusion is not None else set()  # DocumentFusion's
        init_linears_and_norms(
            ((n, m) for n, m in self.named_modules() if id(m) not in own_init), lambda name, m: stds[id(m)]
        )
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if getattr(self, "document_embed", None) is not None:
            nn.init.normal_(self.document_embed.weight, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.text_pos, nn.Parameter):
            nn.init.normal_(self.text_pos, std=0.01)  # open_clip's init of its learned text positions
        with torch.no_grad():
            self.logit_scale.fill_(math.log(self.config.logit_scale_init))
        if getattr(self, "fusion", None) is not None:
            self.fusion.reset_parameters()

    def _linear_init_stds(self) -> dict[int, float]:
        """Init std of every Linear outside the fusion module, by its role (keyed by ``id``)."""
        d, depth = self.config.width, self.config.depth
        stds = {id(self.image_proj): d**-0.5, id(self.text_proj): d**-0.5}  # joint-space projections
        for block in self.blocks:
            stds.update((id(m), d**-0.5) for m in each(block.attn.qkv))
            residual = [*each(block.attn.proj), *(mlp.fc2 for mlp in each(block.mlp))]
            stds.update((id(m), d**-0.5 * (2 * depth) ** -0.5) for m in residual)  # added to the residual stream
            stds.update((id(mlp.fc1), (2 * d) ** -0.5) for mlp in each(block.mlp))
        return stds

    # ---- parameter roles (asked by the optimizer and the long-document fine-tuning) ---------
    def parameter_roles(self) -> dict[str, str]:
        """Every parameter's name -> the route that alone uses it: ``"image"``, ``"text"`` or
        ``"document"`` (a modality's own parts: its embeddings, per-modality block parts, final
        norm and projection), ``"fusion"`` (the document fusion module), or ``"shared"`` (used by
        several routes: the shared attention weights or FFN, the logit scale)."""
        owner: dict[int, str] = {}

        def mark(role: str, *parts: nn.Module | nn.Parameter | None) -> None:
            for part in parts:
                if isinstance(part, nn.Module):
                    owner.update((id(p), role) for p in part.parameters())
                elif isinstance(part, nn.Parameter):
                    owner[id(part)] = role

        mark("image", self.patch_embed, self.cls_token, self.pos_embed, self.norm_pre, self.image_proj)
        mark("text", self.token_embed, self.text_pos, self.text_proj)
        mark("document", self.document_embed)
        for modality, norm in self.norm.items():
            mark(modality, norm)
        for block in self.blocks:
            for part in block.parts():
                if isinstance(part, nn.ModuleDict):
                    for modality, module in part.items():
                        mark(modality, module)
        mark("fusion", self.fusion)
        return {name: owner.get(id(p), "shared") for name, p in self.named_parameters()}

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters of two or more dims that take no weight decay (timm's
        convention): the token embeddings, the class token, a learned position table and the
        logit scale. Parameters of fewer than two dims (norms, biases, gates) take none either
        (:func:`mmformer.training.optim.parameter_groups`)."""
        exempt: set[int] = set()
        # parts may be None: a pipeline stage keeps only the parts its blocks need
        for part in (
            self.token_embed,
            self.document_embed,
            self.cls_token,
            self.pos_embed,
            self.text_pos,
            self.logit_scale,
        ):
            if isinstance(part, nn.Module):
                exempt.update(id(q) for q in part.parameters())
            elif isinstance(part, torch.Tensor):
                exempt.add(id(part))
        return {name for name, p in self.named_parameters() if id(p) in exempt}

    # ---- trunk --------------------------------------------------------------------------
    def run_blocks(
        self,
        x: torch.Tensor,
        modality: str,
        key_padding_mask: torch.Tensor | None = None,
        blocks: list[nn.Module] | None = None,
        packing: TokenPacking | None = None,
    ) -> torch.Tensor:
        """(B, T, D) through ``blocks`` (default: all; a pipeline stage passes its own) for one
        modality, with activation checkpointing per block when enabled; no final norm. With
        ``packing`` (of ``key_padding_mask``), x is the (N, D) real tokens and so is the result."""
        for block in self.blocks_of(modality) if blocks is None else blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, modality, key_padding_mask, packing, use_reentrant=False)
            else:
                x = block(x, modality, key_padding_mask, packing)
        return x

    def blocks_of(self, modality: str) -> nn.ModuleList:
        """The blocks ``modality`` runs through: all, or for the text path the first ``text_depth``."""
        n = self.config.text_blocks if modality != "image" else len(self.blocks)
        return self.blocks if n == len(self.blocks) else self.blocks[:n]

    def forward_tokens(
        self,
        x: torch.Tensor,
        modality: str,
        key_padding_mask: torch.Tensor | None = None,
        packing: TokenPacking | None = None,
    ) -> torch.Tensor:
        """The blocks' input (B, T, D) of one modality (:meth:`patch_tokens`, :meth:`text_tokens`) ->
        final-norm states (B, T, D): the modality's blocks (:meth:`run_blocks`), then its final norm.
        With ``packing``, the (N, D) real tokens in and out."""
        return self.norm[modality](self.run_blocks(x, modality, key_padding_mask, packing=packing))

    # ---- image path ---------------------------------------------------------------------
    def forward_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised pixels -> final-norm token states (B, 1+N, D), class token first.

        Equals timm's ``VisionTransformer.forward_features`` when loaded with its weights.
        """
        return self.forward_tokens(self.patch_tokens(images), "image")

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the blocks' input (B, 1+N, D): the class token, then the N patch embeddings,
        positions added, pre-norm (not the joint-space embedding: that is :meth:`encode_image`)."""
        c = self.config
        if images.ndim != 4 or images.shape[1:] != (c.in_chans, c.image_size, c.image_size):
            raise ValueError(
                f"expected images of shape (B, {c.in_chans}, {c.image_size}, {c.image_size}), got {tuple(images.shape)}"
            )
        x = self.patch_embed(images)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        if self.training and c.patch_dropout > 0:
            x = drop_patches(x, c.patch_dropout)
        return self.norm_pre(x)

    #: In eval mode the encode calls (:meth:`encode_image`, :meth:`encode_text`,
    #: :meth:`encode_texts`, :meth:`encode_document`) run under ``torch.inference_mode()``: no graph
    #: is recorded and the result has ``requires_grad=False`` (an ordinary tensor, usable in a later
    #: autograd computation such as a probe trained on it). In train mode they keep gradients, and
    #: :meth:`forward` (the training call) always does. False keeps gradients in eval mode too.
    inference_in_eval: bool = True

    def _encode(self, fn, *args):
        """``fn(*args)``, under ``torch.inference_mode()`` in eval mode (see :attr:`inference_in_eval`),
        the result cloned outside it so that it is an ordinary tensor; as is in train mode, inside an
        inference-mode block already, or while traced, compiled or exported."""
        if self.training or not self.inference_in_eval or torch.is_inference_mode_enabled() or _tracing():
            return fn(*args)
        with torch.inference_mode():
            out = fn(*args)
        return out.clone()

    @property
    def preprocess(self):
        """The eval image transform of this model (as open_clip's ``preprocess``): an RGB
        ``PIL.Image`` (or a uint8 (3, H, W) tensor) -> float (3, S, S): shorter side resized to the
        config's ``image_size``, centre-cropped, normalised with its ``image_mean`` / ``image_std``.
        ``model.encode_image(torch.stack([model.preprocess(im) for im in images]))`` is what
        ``model.encode_image(images)`` computes for a list of PIL images."""
        from mmformer.data.transforms import build_transforms

        c = self.config
        key = (c.image_size, tuple(c.image_mean), tuple(c.image_std))
        cached = self.__dict__.get("_preprocess")
        if cached is None or cached[0] != key:
            cached = (key, build_transforms(c.image_size, train=False, mean=c.image_mean, std=c.image_std))
            self.__dict__["_preprocess"] = cached
        return cached[1]

    def image_batch(self, images) -> torch.Tensor:
        """Images as people have them -> the (B, C, S, S) batch :meth:`encode_image` embeds.

        ``images``: a (B, C, H, W) tensor (returned as is: already preprocessed), or one image or a
        list/tuple of images, each a ``PIL.Image``, a path (``str`` / ``os.PathLike``), encoded
        bytes (PNG, JPEG, WebP...) or a preprocessed (C, S, S) tensor. Files and bytes are decoded
        with :func:`mmformer.data.transforms.load_image` (EXIF orientation, any mode to RGB);
        everything goes through :attr:`preprocess`. The batch is on the model's device, in the
        dtype of its image parameters.

        Raises:
            CorruptSample: an image that cannot be read (naming its path).
            TypeError: an input of another kind.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return images
        from PIL import Image

        from mmformer.data.transforms import load_image, to_rgb

        single = isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, torch.Tensor))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("encode_image got an empty list of images")
        tf = self.preprocess
        out = []
        for i, im in enumerate(items):
            if isinstance(im, torch.Tensor):
                if im.ndim != 3:
                    raise ValueError(f"images[{i}]: expected a preprocessed (C, H, W) tensor, got {tuple(im.shape)}")
                out.append(im)
            elif isinstance(im, Image.Image):
                out.append(tf(to_rgb(im)))
            elif isinstance(im, (str, os.PathLike, bytes, bytearray)):
                src = bytes(im) if isinstance(im, bytearray) else im
                out.append(tf(load_image(src, name=None if not isinstance(src, bytes) else f"images[{i}] (bytes)")))
            else:
                raise TypeError(
                    f"images[{i}]: expected a PIL image, a path, encoded bytes or a tensor, got {type(im).__name__}"
                )
        return torch.stack(out).to(self.cls_token.device, self.cls_token.dtype)

    def encode_image(self, images, normalize: bool = True) -> torch.Tensor:
        """Images -> (B, E) joint-space embeddings (unit length when ``normalize``).

        ``images``: a (B, C, H, W) tensor of preprocessed pixels (the fast path), or a ``PIL.Image``,
        a path, encoded bytes, or a list of those (see :meth:`image_batch`). In eval mode this runs
        under ``torch.inference_mode()`` (see :attr:`inference_in_eval`).
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            images = self.image_batch(images)
        return self._encode(lambda x: self.project_image(self.forward_image_features(x), normalize), images)

    encode_images = encode_image

    def project_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Final-norm image states (B, 1+N, D) -> (B, E): pooled, projected (unit length when ``normalize``)."""
        pooled = x[:, 0] if self.config.image_pool == "cls" else x[:, 1:].mean(dim=1)
        z = self.image_proj(pooled)
        return F.normalize(z, dim=-1) if normalize else z

    # ---- text path ----------------------------------------------------------------------
    def forward_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, modality: str = "text"
    ) -> torch.Tensor:
        """(B, T) ids, (B, T) bool mask (True = real token) -> final-norm states (B, T, D).

        ``modality="document"`` runs the document expert (``config.document_expert``): its own
        token embeddings and block parts instead of the text path's (positions and shared
        attention weights are the same)."""
        x = self.text_tokens(input_ids, modality)
        mask = self._text_mask(input_ids, attention_mask)
        packing = self._packing(mask)
        if packing is None:
            return self.forward_tokens(x, modality, mask)
        return packing.unpack(self.forward_tokens(packing.pack(x), modality, mask, packing))

    #: the packed token count is rounded up to a multiple of this (see :class:`TokenPacking`)
    pack_text_multiple: int = 64

    def _packing(self, mask: torch.Tensor) -> TokenPacking | None:
        """The packing :meth:`forward_text_features` runs with: None (padded) when packing is off
        (``config.pack_text_below`` 0), the batch is (nearly) pad-free, or the graph is being traced
        or exported (its token count would be a data-dependent shape). Packed, the real tokens'
        states are the padded path's; pad positions come back as zeros (or, for the pad rows that
        round the count up, as states of no meaning: read them through the mask)."""
        below = self.config.pack_text_below
        if below <= 0 or torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
            return None
        real = int(mask.sum())  # the one host sync of packing
        if real > below * mask.numel():
            return None
        return TokenPacking(mask, self.pack_text_multiple, real=real)

    def text_tokens(self, input_ids: torch.Tensor, modality: str = "text") -> torch.Tensor:
        """(B, T) ids -> the blocks' input (B, T, D): token embeddings plus positions (not the
        joint-space embedding: that is :meth:`encode_text`)."""
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > c.context_length:
            raise ValueError(
                f"text of {input_ids.shape[1]} tokens exceeds context_length={c.context_length}; "
                "truncate it (tokenizer max_length) or chunk it"
            )
        x = (self.document_embed if modality == "document" else self.token_embed)(input_ids)
        return x + self.text_pos[: input_ids.shape[1]].to(x.dtype)

    def _text_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The (B, T) bool mask of real tokens: ``attention_mask``, or by default the ids that are not
        ``pad_id``. With ``text_pool="argmax"`` the tokens up to the first one of the highest id
        (CLIP's end of text, pooled there as open_clip does; its padding id 0 is also a word piece),
        within ``attention_mask`` when one is given."""
        if self.config.text_pool == "argmax":
            ends = input_ids.argmax(dim=1, keepdim=True)  # (B, 1), the first highest id
            mask = torch.arange(input_ids.shape[1], device=input_ids.device)[None] <= ends
            if attention_mask is not None:
                if attention_mask.shape != input_ids.shape:
                    raise ValueError(
                        f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                        f"{tuple(input_ids.shape)}"
                    )
                mask = mask & attention_mask.bool()
        else:
            mask = input_ids != self.config.pad_id if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every text needs at least one real token (an all-padding row was given)")
        return mask

    def pool_text(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) states, (B, T) bool mask -> (B, D) by the config's ``text_pool``."""
        pool = self.config.text_pool
        if pool == "cls":
            return states[:, 0]
        if pool == "mean":
            m = mask.to(states.dtype)[..., None]
            return (states * m).sum(1) / m.sum(1)
        # "eos" and "argmax": the last real token (the mask of an "argmax" model ends at its highest id)
        last = mask.long().sum(dim=1) - 1  # (B,) index of the last real token (EOS)
        return states[torch.arange(states.shape[0], device=states.device), last]

    def encode_text(
        self, input_ids, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, T) ids (+ (B, T) bool mask) -> (B, E) joint-space embeddings; a string or a list of
        strings is tokenized with the model's tokenizer first (as :meth:`encode_texts`). In eval
        mode this runs under ``torch.inference_mode()`` (see :attr:`inference_in_eval`)."""
        if isinstance(input_ids, str) or (
            isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(t, str) for t in input_ids)
        ):
            if attention_mask is not None:
                raise ValueError("encode_text: texts are tokenized here; pass no attention_mask with them")
            return self.encode_texts([input_ids] if isinstance(input_ids, str) else list(input_ids), normalize)

        def run(ids: torch.Tensor) -> torch.Tensor:
            mask = self._text_mask(ids, attention_mask)
            return self.project_text(self.forward_text_features(ids, mask), mask, normalize)

        return self._encode(run, input_ids)

    def project_text(self, states: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Final-norm text states (B, T, D), (B, T) bool mask -> (B, E) (unit length when ``normalize``)."""
        z = self.text_proj(self.pool_text(states, mask))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Tokenize ``texts`` with the attached tokenizer and encode them, (len(texts), E)."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer attached; pass ids to encode_text")
        ids, mask = self.tokenizer(texts, max_length=self.config.context_length)
        device = self.logit_scale.device
        return self.encode_text(ids.to(device), mask.to(device), normalize)

    # ---- long documents (see mmformer.data.longdoc, mmformer.layers.fusion) --------------
    @staticmethod
    def _make_fusion(c: ModelConfig) -> DocumentFusion:
        return DocumentFusion(c.width, c.embed_dim, c.fusion_latents, c.fusion_heads, eps=c.ln_eps)

    def set_text_attention(self, kind: str, **options: int) -> None:
        """Use ``kind`` ("dense" | "local" | "compressed") for text self-attention in every block.

        ``options`` override the config's ``attention_window``, ``attention_global``,
        ``attention_compression``; the config is updated so that a saved model keeps the choice.
        """
        names = {"window": "attention_window", "n_global": "attention_global", "compression": "attention_compression"}
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown attention options {unknown}; known: {sorted(names)}")
        changes = {names[k]: v for k, v in options.items()}
        if kind != self.config.attention or changes:  # keep the caller's config object otherwise
            self.config = dataclasses.replace(self.config, attention=kind, **changes)
        c = self.config
        if c.text_mask == "causal":
            if kind != "dense":
                raise ValueError(f"a causal text path (text_mask='causal') has only dense attention, not {kind!r}")
            fn = causal_attend
        else:
            fn = make_attend(
                kind,
                c.attention_window,
                c.attention_global,
                c.attention_compression,
                dense=ATTENTION_KERNEL_FNS[c.attention_kernel],
            )
        for block in self.blocks:
            block.attn.text_attend = fn

    def set_attention_kernel(self, kernel: str) -> None:
        """Run the blocks' dense attention with ``kernel`` (``ModelConfig.attention_kernel``:
        ``"default"`` or ``"fused_cpu"``, see :mod:`mmformer.layers.cpu_attention`); the config is
        updated so that a saved model keeps the choice. A sparse text kernel stays as it is."""
        if kernel not in ATTENTION_KERNEL_FNS:
            raise ValueError(f"attention_kernel={kernel!r} must be one of {tuple(ATTENTION_KERNEL_FNS)}")
        if kernel != self.config.attention_kernel:
            self.config = dataclasses.replace(self.config, attention_kernel=kernel)
        for block in self.blocks:
            block.attn.attend = ATTENTION_KERNEL_FNS[kernel]
        self.set_text_attention(self.config.attention)

    def enable_fusion(self, latents: int = 16, heads: int | None = None) -> DocumentFusion:
        """Add a freshly initialised :class:`DocumentFusion` (gate at zero: documents embed as before)."""
        self.config = dataclasses.replace(self.config, fusion_latents=latents, fusion_heads=heads or self.config.heads)
        self.fusion = self._make_fusion(self.config).to(self.logit_scale.device)
        return self.fusion

    def enable_document_expert(self) -> None:
        """Give long documents their own copy of the text path's token embeddings, per-modality
        block parts and final norm (modality ``"document"``, see ``ModelConfig.document_expert``);
        until it is trained, documents embed exactly as before."""
        if self.config.document_expert:
            return
        for block in self.blocks:
            block.add_modality("document", like="text")
        self.norm["document"] = copy.deepcopy(self.norm["text"])
        self.document_embed = copy.deepcopy(self.token_embed)
        self.config = dataclasses.replace(self.config, document_expert=True)

    def chunk_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, multi: torch.Tensor) -> torch.Tensor:
        """(C, L) chunk ids and mask -> (C, L, D) token states; ``multi`` (C,) bool marks the
        chunks of documents of more than one chunk.

        With a document expert those go through it and the others (one-chunk documents)
        through the text path, so that a short document embeds exactly as :meth:`encode_text`;
        one encoder call per route. Without one, a single text-path call.
        """
        if not self.config.document_expert or not bool(multi.any()):
            return self.forward_text_features(input_ids, attention_mask)
        if bool(multi.all()):
            return self.forward_text_features(input_ids, attention_mask, "document")
        short = self.forward_text_features(input_ids[~multi], attention_mask[~multi])
        long = self.forward_text_features(input_ids[multi], attention_mask[multi], "document")
        states = short.new_empty(*input_ids.shape, short.shape[-1])
        states[~multi], states[multi] = short, long
        return states

    @property
    def document_stride(self) -> int:
        """Pieces between the starts of a document's windows (``chunk_stride``, by default the
        window's ``context_length - 2`` pieces: no overlap)."""
        return self.config.chunk_stride or self.config.context_length - 2

    def document_collator(self, **overrides):
        """A :class:`mmformer.documents.DocumentCollator` with this model's window and chunk policy."""

        c = self.config
        kw = dict(
            length=c.context_length, stride=self.document_stride, max_chunks=c.max_chunks, overflow=c.chunk_overflow
        )
        return DocumentCollator(self.tokenizer, **{**kw, **overrides})

    def forward_document(
        self, batch, modes: tuple[str, ...] = ("fusion",), states: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Un-normalised document embeddings (B, E) per mode, from ONE encoder call over all chunks.

        ``batch``: a :class:`mmformer.documents.DocumentBatch` with C chunks of L tokens.
        Modes: ``"first"`` (the first window only: truncation), ``"mean"`` / ``"max"`` (mean /
        element-wise max of the chunk embeddings), ``"fusion"`` (mean + gated cross-attention
        fusion; needs :attr:`fusion`). The cost is linear in C. ``states``: the chunks' (C, L, D)
        :meth:`chunk_states`, when already computed (e.g. cached for a frozen text path).
        """
        bad = [m for m in modes if m not in DOCUMENT_MODES]
        if bad:
            raise ValueError(f"unknown document modes {bad}; choose from {DOCUMENT_MODES}")
        if "fusion" in modes and self.fusion is None:
            raise ValueError(
                "this model has no fusion module (config.fusion_latents=0); use mode 'mean' or "
                "fine-tune one (train/longdoc-stage1.yaml then train/longdoc.yaml; MMFormer.enable_fusion)"
            )
        ids, mask, counts = batch.input_ids, batch.attention_mask, batch.chunk_counts
        if states is None:
            states = self.chunk_states(ids, mask, batch.in_long_document)  # (C, L, D)
        elif states.shape[:2] != ids.shape:
            raise ValueError(f"states {tuple(states.shape)} do not match the batch's chunks {tuple(ids.shape)}")
        chunk_emb = self.text_proj(self.pool_text(states, mask))  # (C, E)
        doc_mask = batch.chunk_mask  # (B, Nmax)
        b, n_max = doc_mask.shape
        padded = chunk_emb.new_zeros(b, n_max, chunk_emb.shape[-1])
        padded[doc_mask] = chunk_emb  # (B, Nmax, E); chunks are stored document by document
        out: dict[str, torch.Tensor] = {}
        if "first" in modes:
            out["first"] = padded[:, 0]
        if "max" in modes:
            out["max"] = padded.masked_fill(~doc_mask[..., None], float("-inf")).amax(1)
        if "mean" in modes or "fusion" in modes:
            out["mean"] = padded.sum(1) / counts.to(padded.dtype)[:, None]
        if "fusion" in modes:
            out["fusion"] = self.fusion(out["mean"], states, mask, counts)
        return {m: out[m] for m in modes}

    def encode_document(self, texts, mode: str = "auto", normalize: bool = True) -> torch.Tensor:
        """Documents of any length -> (B, E) embeddings.

        ``texts``: a list of str (chunked with :meth:`document_collator`) or a ready
        ``DocumentBatch``. ``mode``: ``"auto"`` (``"fusion"`` when the model has a fusion module,
        else ``"mean"``), or one of ``"first"``, ``"mean"``, ``"max"``, ``"fusion"``. A document
        that fits in one window gives exactly :meth:`encode_text` of its ``tokenizer`` ids in
        every mode.
        """
        if mode == "auto":
            mode = "fusion" if self.fusion is not None else "mean"
        batch = texts
        if isinstance(texts, (list, tuple)):
            if self.tokenizer is None:
                raise RuntimeError("this model has no tokenizer attached; pass a DocumentBatch")
            batch = self.document_collator()(list(texts))
        batch = batch.to(self.logit_scale.device)

        def run(b) -> torch.Tensor:
            z = self.forward_document(b, (mode,))[mode]
            return F.normalize(z, dim=-1) if normalize else z

        return self._encode(run, batch)

    # ---- both ---------------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Both embeddings (unit length) and the logit scale exp(s), clamped at logit_scale_max.

        The training call: it records the graph in eval mode too (unlike the encode calls), for
        losses and gradients of a model kept in eval mode. Takes tensors only."""
        mask = self._text_mask(input_ids, attention_mask)
        return {
            "image_embeds": self.project_image(self.forward_image_features(images)),
            "text_embeds": self.project_text(self.forward_text_features(input_ids, mask), mask),
            "logit_scale": self.logit_scale.exp().clamp(max=self.config.logit_scale_max),
        }

    # ---- persistence --------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json``, ``model.safetensors`` (and ``tokenizer.model``, or CLIP's merges as
        ``clip_bpe.txt.gz``), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.to_json(directory / CONFIG_NAME)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(
                state,
                tmp,
                metadata={
                    "format": "pt",
                    "library": "mmformer",
                    "mmformer_config": json.dumps(self.config.to_dict(), sort_keys=True),
                },
            )
        # the tokenizer's own file (tokenizer.model, or CLIP's merges); another one left from an
        # earlier save would not belong to these weights
        name = getattr(self.tokenizer, "file_name", TOKENIZER_NAME) if self.tokenizer is not None else None
        for other in (TOKENIZER_NAME, CLIP_BPE_NAME):
            if other != name:
                (directory / other).unlink(missing_ok=True)
        if self.tokenizer is not None:
            self.tokenizer.save(directory / name)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> MMFormer:
        """Load a directory written by :meth:`save_pretrained`."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: missing {name} (expected a save_pretrained directory)")
        config = ModelConfig.from_json(directory / CONFIG_NAME)
        tok_path = directory / TOKENIZER_NAME
        tok = Tokenizer.load(tok_path) if tok_path.is_file() else None
        if tok is None and (directory / CLIP_BPE_NAME).is_file():
            tok_path = directory / CLIP_BPE_NAME
            tok = ClipTokenizer.load(tok_path)
        if tok is not None and tok.vocab_size > config.vocab_size:
            raise ValueError(
                f"{tok_path} has {tok.vocab_size} pieces, more than vocab_size={config.vocab_size} "
                f"in {directory / CONFIG_NAME}: it is not the tokenizer these weights were trained with"
            )
        model = cls(config, tok)
        try:
            state = load_file(directory / WEIGHTS_NAME, device=str(map_location))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{directory / WEIGHTS_NAME}: unreadable weights ({e})") from e
        model.load_state_dict_checked(state, source=str(directory / WEIGHTS_NAME))
        check_saved_config(directory, config)  # weights that fit, under an edited config.json
        return model

    def load_state_dict_checked(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """``load_state_dict(strict=True)`` with an error that lists missing/unexpected/mis-shaped keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [
            f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{source} does not fit this model: missing={missing[:10]} unexpected={unexpected[:10]} "
                f"shape mismatches={shapes[:10]}"
            )
        self.load_state_dict(state, strict=True)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- timm interop -------------------------------------------------------------------
    def load_timm_vit(self, state_dict: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
        """Load a timm ``VisionTransformer`` state dict (or a .safetensors/.pth file) into the image path.

        The config must match the ViT: width, depth, heads, patch and image size,
        ``image_pos="learned"``, class-token pooling. Shared parts (``share``) take the ViT's
        weights for every modality; the text path's own parts are left untouched.
        """
        if isinstance(state_dict, (str, os.PathLike)):
            state_dict = _read_state_dict(Path(state_dict))
        if self.config.image_pos != "learned":
            raise ValueError("timm ViT weights need image_pos='learned' in the config")
        has_pre = any(k.startswith("norm_pre.") for k in state_dict)
        if has_pre != self.config.image_pre_norm:
            raise ValueError(f"timm ViT {'has' if has_pre else 'has no'} norm_pre; set image_pre_norm={has_pre}")
        converted = timm_vit_to_mmformer(state_dict, self.config.share)
        own = self.state_dict()
        bad = [
            f"{k}: timm {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in converted.items()
            if k in own and own[k].shape != v.shape
        ]
        unknown = [k for k in converted if k not in own]
        if bad or unknown:
            raise ValueError(
                f"timm ViT does not fit this config: shape mismatches={bad[:10]} unknown keys={unknown[:10]}"
            )
        self.load_state_dict(converted, strict=False)

    # ---- CLIP checkpoints (mmformer.convert) -----------------------------------------------
    @classmethod
    def from_open_clip(
        cls,
        model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
        arch: str,
        quick_gelu: bool | None = None,
    ) -> MMFormer:
        """A ``share="none"`` MMFormer with the weights of an open_clip ``CLIP`` of architecture
        ``arch`` (a name open_clip knows, e.g. ``"ViT-B-32"``; its config is read from open_clip's
        bundled model configs): the model, its state dict, or a weights file (.pt/.pth/.bin, an
        open_clip training checkpoint, or .safetensors). Its ``encode_image`` / ``encode_text``
        equal open_clip's on the same normalised pixels and token ids.

        ``quick_gelu``: the activation, when it is not the architecture's (OpenAI's weights, loaded
        by open_clip with ``force_quick_gelu``); taken from the model when a model is given.
        """
        from mmformer.convert.open_clip import open_clip_config, open_clip_to_mmformer

        source = f"open_clip {arch}"
        if isinstance(model_or_state_dict, nn.Module):
            if quick_gelu is None:
                quick_gelu = any(type(m).__name__ == "QuickGELU" for m in model_or_state_dict.modules())
            state = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, (str, os.PathLike)):
            source = str(model_or_state_dict)
            state = _read_state_dict(Path(model_or_state_dict))
        else:
            state = model_or_state_dict
        state = _unwrap_training_checkpoint(state)
        config = open_clip_config(arch, quick_gelu)
        model = cls(config, ClipTokenizer.default() if config.vocab_size == CLIP_VOCAB_SIZE else None)
        model.load_state_dict_checked(open_clip_to_mmformer(state), source=source)
        return model

    @classmethod
    def from_hf_clip(cls, model_or_dir: nn.Module | str | os.PathLike) -> MMFormer:
        """A ``share="none"`` MMFormer with the weights of a Hugging Face ``CLIPModel``: the model,
        or a directory written by its ``save_pretrained`` (``config.json`` and ``model.safetensors``
        or ``pytorch_model.bin``; transformers is not needed to read it). Its ``encode_image`` /
        ``encode_text`` equal ``get_image_features`` / ``get_text_features``."""
        from mmformer.convert.hf_clip import hf_clip_config, hf_clip_to_mmformer

        if isinstance(model_or_dir, nn.Module):
            source = type(model_or_dir).__name__
            hf_config, state = model_or_dir.config.to_dict(), model_or_dir.state_dict()
        else:
            directory = Path(model_or_dir)
            source = str(directory)
            weights = [directory / n for n in ("model.safetensors", "pytorch_model.bin") if (directory / n).is_file()]
            if not (directory / CONFIG_NAME).is_file() or not weights:
                raise FileNotFoundError(
                    f"{directory}: expected a Hugging Face CLIP directory with config.json and "
                    "model.safetensors (or pytorch_model.bin)"
                )
            try:
                hf_config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{directory / CONFIG_NAME}: not a JSON config ({e})") from None
            state = _read_state_dict(weights[0])
        config = hf_clip_config(hf_config, source=source)
        model = cls(config, ClipTokenizer.default() if config.vocab_size == CLIP_VOCAB_SIZE else None)
        model.load_state_dict_checked(hf_clip_to_mmformer(state), source=source)
        return model


def _unwrap_training_checkpoint(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The weights of an open_clip training checkpoint (``{"state_dict": ...}``, keys under
    ``module.`` when saved from DDP), or ``state`` itself."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


#: Config fields left out of :func:`model_fingerprint`: the same weights embed the same way whatever
#: their value (training-only patch dropout; the text path's packing, whose states equal the padded
#: path's; the attention kernel, whose result equals the reference's), so indexes built before the
#: field existed, or with another value, stay valid.
UNHASHED_FIELDS = ("patch_dropout", "pack_text_below", "attention_kernel")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the model's config and every tensor of its state dict.

    Two models with equal weights and config share it; any changed weight changes it. Compute
    it on the float model (an int8 copy made by ``quantize_int8`` reports its source's).
    """
    fp = getattr(model, "source_fingerprint", None)
    if fp:
        return fp
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        d = config.to_dict()
        if isinstance(config, ModelConfig):  # retired fields at the value they always had, so
            d = {**RETIRED_FIELDS, **d}  # fingerprints recorded in indexes stay valid
            if d.get("block_heads") is None:  # unpruned: hashed as before the field existed
                d.pop("block_heads", None)
            for name in UNHASHED_FIELDS:  # how the same weights run, not what they compute
                d.pop(name, None)
            for name, default in LATER_FIELDS.items():  # at their defaults: hashed as before they existed
                if name in d and d[name] == default:
                    d.pop(name)
        h.update(json.dumps(d, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_TIMM_SKIP = re.compile(r"^(head\.|fc_norm\.|attn_pool\.|reg_token)")


def timm_vit_to_mmformer(state_dict: Mapping[str, torch.Tensor], share: str) -> dict[str, torch.Tensor]:
    """Rename a timm ViT state dict to MMFormer's image-path keys for a given ``share`` mode."""
    s = sharing(share)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _TIMM_SKIP.match(key):
            continue
        new = key
        m = re.match(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp)\.(.+)$", key)
        if m:
            idx, part, rest = m.groups()
            per_modality = part.startswith("norm") or not s[part.split(".")[-1]]
            new = f"blocks.{idx}.{part}." + ("image." if per_modality else "") + rest
        elif key.startswith("norm."):
            new = "norm.image." + key[len("norm.") :]
        elif key.startswith("blocks.") or not key.startswith(("cls_token", "pos_embed", "patch_embed.", "norm_pre.")):
            raise ValueError(
                f"timm key {key!r} has no MMFormer counterpart (layer scale, q/k norm or pre-norm ViTs are not supported)"
            )
        out[new] = value
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# config fields that only change how a model runs, not what its weights mean: may be edited
RUNTIME_FIELDS = frozenset(
    {
        "grad_checkpointing",
        "max_chunks",
        "chunk_overflow",
        "chunk_stride",
        "attention",
        "attention_window",
        "attention_global",
        "attention_compression",
        "extra",
        "pack_text_below",
        "attention_kernel",
    }
)


def check_saved_config(directory: Path, config: ModelConfig) -> None:
    """Compare ``config.json`` with the config stored inside ``model.safetensors`` at save time:
    an edited field that changes what the weights compute (e.g. ``context_length``) is an error
    naming config.json and the field. Weights saved without a stored config are not checked."""
    try:
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            stored = (f.metadata() or {}).get("mmformer_config")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{directory / WEIGHTS_NAME}: unreadable weights ({e})") from e
    if not stored:
        return
    saved, now = json.loads(stored), config.to_dict()
    changed = [k for k in sorted(saved) if k in now and k not in RUNTIME_FIELDS and saved[k] != now[k]]
    if changed:
        raise ValueError(
            f"{directory / CONFIG_NAME}: field(s) "
            + ", ".join(f"{k!r} = {now[k]!r} but the weights were saved with {saved[k]!r}" for k in changed)
            + "; restore config.json (only "
            + ", ".join(sorted(RUNTIME_FIELDS - {"extra"}))
            + " may be edited)"
        )
