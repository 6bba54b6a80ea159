"""Model configuration: one dataclass, named presets, JSON round trip.

Every model is built from a :class:`ModelConfig`. A checkpoint directory stores it as
``config.json``; :func:`get_config` returns a named preset (``tiny``, ``small``, ``base``) with
optional overrides.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmformer.files import write_text_atomic

log = logging.getLogger(__name__)

#: What the modalities share inside each block (``ModelConfig.share``).
SHARE_MODES = ("qkv", "attention", "all", "none")
#: The block routes every model has (a document expert adds ``"document"``).
MODALITIES = ("image", "text")
#: Text self-attention kernels (``ModelConfig.attention``, :func:`mmformer.layers.sparse.make_attend`).
ATTENTION_KINDS = ("dense", "local", "compressed")
#: The blocks' dense attention kernel (``ModelConfig.attention_kernel``): ``"default"`` is the
#: reference :func:`mmformer.layers.attention.attend`; ``"fused_cpu"`` is
#: :func:`mmformer.layers.cpu_attention.attend_fused_cpu` (its own backward for bf16/fp16 CPU training).
ATTENTION_KERNELS = ("default", "fused_cpu")
#: What a document over ``max_chunks`` does (``ModelConfig.chunk_overflow``,
#: :class:`mmformer.documents.DocumentCollator`): raise, or keep the first chunks.
OVERFLOW_POLICIES = ("error", "first")
#: Text self-attention masks (``ModelConfig.text_mask``): every token sees every real token, or
#: only the tokens before it and itself (CLIP's text tower).
TEXT_MASKS = ("bidirectional", "causal")
#: Text pooling (``ModelConfig.text_pool``): "eos" = the last real token, "argmax" = the token of the
#: highest id (CLIP's end-of-text, the last id of its vocabulary; the real tokens are those up to it
#: when no mask is given), "cls" = the first token, "mean" = the mean over the real tokens.
TEXT_POOLS = ("eos", "argmax", "cls", "mean")
#: FFN activations (``ModelConfig.mlp_act``): exact GELU, or x * sigmoid(1.702 x) (OpenAI CLIP's).
MLP_ACTS = ("gelu", "quick_gelu")
#: Document embeddings from chunk embeddings (:meth:`mmformer.model.MMFormer.forward_document`).
DOCUMENT_MODES = ("first", "mean", "max", "fusion")
#: Fields older versions wrote into config.json (with the value they always had) that nothing
#: reads: ignored when loading, hashed at that value by :func:`mmformer.model.model_fingerprint`.
RETIRED_FIELDS: dict[str, Any] = {"extra": {}}
#: Fields added after model fingerprints were first recorded in indexes, with their defaults: a model
#: at the default is hashed without the field by :func:`mmformer.model.model_fingerprint`.
LATER_FIELDS: dict[str, Any] = {
    "mlp_act": "gelu",
    "patch_bias": True,
    "text_pos": "sincos",
    "text_mask": "bidirectional",
    "text_width": None,
    "text_heads": None,
    "text_mlp_ratio": None,
    "text_depth": None,
}


@dataclass
class ModelConfig:
    """Shape and behaviour of an :class:`mmformer.model.MMFormer`.

    One stack of ``depth`` transformer blocks of width ``width`` serves both modalities. What the
    modalities share inside each block is set by ``share``:

    - ``"qkv"``: the fused QKV projection is shared; output projection, norms and FFN per modality.
    - ``"attention"``: QKV and output projection shared; norms and FFN per modality.
    - ``"all"``: everything except the LayerNorms shared.
    - ``"none"``: separate weights for each modality through the same code (the baseline).
    """

    # trunk
    width: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    share: str = "qkv"
    mlp_act: str = "gelu"  # "gelu" (exact) or "quick_gelu" (OpenAI CLIP)
    # image path
    image_size: int = 64
    patch_size: int = 16
    in_chans: int = 3
    image_pos: str = "sincos"  # "sincos" (fixed 2-D) or "learned"
    image_pre_norm: bool = True  # LayerNorm on patch+position embeddings before the blocks
    image_pool: str = "cls"  # "cls" or "mean"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # fraction of each image's patch tokens dropped at random in training (the class token is always
    # kept), after the positions are added: fewer image tokens per step (FLIP; open_clip's
    # patch_dropout). 0 = off; evaluation and inference always see every patch
    patch_dropout: float = 0.0
    patch_bias: bool = True  # bias on the patch embedding (CLIP's has none)
    # text path
    vocab_size: int = 4096
    context_length: int = 16
    text_pool: str = "eos"  # one of TEXT_POOLS
    pad_id: int = 0
    text_pos: str = "sincos"  # "sincos" (fixed 1-D, times pos_scale) or "learned" (context_length, D)
    text_mask: str = "bidirectional"  # or "causal" (CLIP's text tower)
    # the text path's own width, heads and FFN ratio (None = the trunk's): only with share="none",
    # where the modalities share no weights (a two-tower CLIP imports this way)
    text_width: int | None = None
    text_heads: int | None = None
    text_mlp_ratio: float | None = None
    # blocks the text path runs through, the first text_depth of the stack (None = all ``depth``): a
    # CLIP text tower shallower than its image tower; only with share="none"
    text_depth: int | None = None
    # Fixed sin-cos tables (amplitude 1) are multiplied by this so that they sit at the scale of
    # the learned token / patch embeddings (std 0.02) instead of drowning them.
    pos_scale: float = 0.02
    # joint space
    embed_dim: int = 128
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    # memory / speed
    grad_checkpointing: bool = False
    # the text path runs its per-token layers on the real tokens only (mmformer.layers.packing)
    # when at most this fraction of a batch's (B, T) positions are real tokens; 0 = always padded.
    # The real tokens' states are the same either way
    pack_text_below: float = 0.9
    # the blocks' dense attention kernel, one of ATTENTION_KERNELS: "default" (the reference) or
    # "fused_cpu" (mmformer.layers.cpu_attention: taken only in bf16/fp16 training on the CPU)
    attention_kernel: str = "default"
    # text self-attention inside a window: "dense", "local" (sliding window of +-attention_window
    # tokens plus the first attention_global tokens) or "compressed" (K/V mean-pooled over
    # strides of attention_compression); see mmformer.layers.sparse
    attention: str = "dense"
    attention_window: int = 128
    attention_global: int = 1
    attention_compression: int = 4
    # long documents (MMFormer.encode_document): fusion_latents = 0 means no fusion module
    # (documents are mean-pooled over chunk embeddings); chunks are context_length-token windows
    # [bos] pieces [eos] starting every chunk_stride pieces (None = context_length - 2, no
    # overlap); more than max_chunks chunks (None = no cap) is an error or keeps the first
    # max_chunks, by chunk_overflow ("error" | "first")
    fusion_latents: int = 0
    fusion_heads: int = 4
    # document_expert: chunks of documents longer than one window run through their own
    # per-modality block parts ("document": norms, FFN, unshared attention parts, final norm),
    # copied from the text path by MMFormer.enable_document_expert and fine-tuned on documents,
    # so that short texts keep the text path exactly
    document_expert: bool = False
    chunk_stride: int | None = None
    max_chunks: int | None = None
    chunk_overflow: str = "error"
    # heads kept in each block after head pruning (mmformer.compress.prune): None = every block has
    # ``heads``. A pruned block keeps the head width ``width // heads``, so its attention's inner
    # width is block_heads[i] * head_dim < width (qkv: width -> 3 * inner, proj: inner -> width)
    block_heads: list[int] | None = None

    def __post_init__(self) -> None:
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        if isinstance(self.block_heads, tuple):  # a list, as JSON gives it back
            self.block_heads = list(self.block_heads)
        problems = []
        if self.share not in SHARE_MODES:
            problems.append(f"share={self.share!r} must be one of {SHARE_MODES}")
        if self.width % self.heads:
            problems.append(f"width={self.width} is not divisible by heads={self.heads}")
        if self.image_size % self.patch_size:
            problems.append(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            problems.append(f"attention_kernel={self.attention_kernel!r} must be one of {ATTENTION_KERNELS}")
        if not 0.0 <= self.pack_text_below <= 1.0:
            problems.append(f"pack_text_below={self.pack_text_below} must be in [0, 1] (a fraction of the positions)")
        if not 0.0 <= self.patch_dropout < 1.0:
            problems.append(f"patch_dropout={self.patch_dropout} must be in [0, 1) (a fraction of the patches)")
        if self.image_pos not in ("sincos", "learned"):
            problems.append(f"image_pos={self.image_pos!r} must be 'sincos' or 'learned'")
        if self.image_pool not in ("cls", "mean"):
            problems.append(f"image_pool={self.image_pool!r} must be 'cls' or 'mean'")
        if self.text_pool not in TEXT_POOLS:
            problems.append(f"text_pool={self.text_pool!r} must be one of {TEXT_POOLS}")
        problems += self._clip_problems()
        if self.image_pos == "sincos" and self.width % 4:
            problems.append(f"2-D sin-cos positions need width divisible by 4, got {self.width}")
        problems += self._long_document_problems()
        problems += self._block_heads_problems()
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def _clip_problems(self) -> list[str]:
        """The fields a CLIP tower needs: activation, text positions and mask, the text path's shape."""
        problems = []
        if self.mlp_act not in MLP_ACTS:
            problems.append(f"mlp_act={self.mlp_act!r} must be one of {MLP_ACTS}")
        if self.text_pos not in ("sincos", "learned"):
            problems.append(f"text_pos={self.text_pos!r} must be 'sincos' or 'learned'")
        if self.text_pos == "sincos" and self.text_dim % 2:
            problems.append(f"1-D sin-cos text positions need an even text width, got {self.text_dim}")
        if self.text_mask not in TEXT_MASKS:
            problems.append(f"text_mask={self.text_mask!r} must be one of {TEXT_MASKS}")
        if self.text_mask == "causal" and self.attention != "dense":
            problems.append(f"text_mask='causal' needs attention='dense', got {self.attention!r}")
        if self.text_dim < 1 or self.text_head_count < 1:
            problems.append(f"text width {self.text_dim} and text heads {self.text_head_count} must be >= 1")
        elif self.text_dim % self.text_head_count:
            problems.append(f"text width {self.text_dim} is not divisible by text heads {self.text_head_count}")
        if self.text_depth is not None and not 1 <= self.text_depth <= self.depth:
            problems.append(f"text_depth={self.text_depth} must be in [1, depth={self.depth}] or None")
        if self.text_shape != (self.width, self.heads, self.mlp_hidden) or self.text_blocks != self.depth:
            if self.share != "none":
                problems.append(
                    f"text_width/text_heads/text_mlp_ratio/text_depth other than the trunk's need "
                    f"share='none' (got share={self.share!r})"
                )
            if self.document_expert or self.fusion_latents or self.block_heads is not None:
                problems.append(
                    "a text path of its own width/heads/FFN/depth does not support document_expert, "
                    "fusion_latents or block_heads"
                )
        return problems

    def _long_document_problems(self) -> list[str]:
        problems = []
        if self.attention not in ATTENTION_KINDS:
            problems.append(f"attention={self.attention!r} must be one of {ATTENTION_KINDS}")
        if self.attention_window < 0 or self.attention_global < 0 or self.attention_compression < 1:
            problems.append("need attention_window >= 0, attention_global >= 0, attention_compression >= 1")
        if self.fusion_latents < 0 or (self.fusion_latents and self.width % self.fusion_heads):
            problems.append(
                f"fusion_latents={self.fusion_latents} must be >= 0 and width divisible by "
                f"fusion_heads={self.fusion_heads}"
            )
        if self.chunk_stride is not None and not 1 <= self.chunk_stride <= self.context_length - 2:
            problems.append(f"chunk_stride={self.chunk_stride} must be in [1, context_length - 2]")
        if self.max_chunks is not None and self.max_chunks < 1:
            problems.append(f"max_chunks={self.max_chunks} must be >= 1 or None")
        if self.chunk_overflow not in OVERFLOW_POLICIES:
            problems.append(f"chunk_overflow={self.chunk_overflow!r} must be one of {OVERFLOW_POLICIES}")
        return problems

    def _block_heads_problems(self) -> list[str]:
        if self.block_heads is None:
            return []
        bh = self.block_heads
        if not isinstance(bh, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in bh):
            return [f"block_heads={bh!r} must be a list of ints (heads kept per block) or None"]
        problems = []
        if len(bh) != self.depth:
            problems.append(f"block_heads={bh} must have one entry per block (depth={self.depth}), got {len(bh)}")
        bad = [i for i, h in enumerate(bh) if not 1 <= h <= self.heads]
        if bad:
            problems.append(f"block_heads={bh}: every block keeps 1..heads={self.heads} heads (blocks {bad} do not)")
        return problems

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``width // heads`` in every block (pruned or not)."""
        return self.width // self.heads

    @property
    def heads_per_block(self) -> list[int]:
        """Attention heads of each block: ``block_heads``, or ``heads`` for every block."""
        return list(self.block_heads) if self.block_heads is not None else [self.heads] * self.depth

    @property
    def text_dim(self) -> int:
        """Width of the text path: ``text_width``, or the trunk's ``width``."""
        return self.width if self.text_width is None else self.text_width

    @property
    def text_head_count(self) -> int:
        """Attention heads of the text path: ``text_heads``, or the trunk's ``heads``."""
        return self.heads if self.text_heads is None else self.text_heads

    @property
    def text_blocks(self) -> int:
        """Blocks the text path runs through (the first ones of the stack): ``text_depth`` or ``depth``."""
        return self.depth if self.text_depth is None else self.text_depth

    def block_modalities(self, index: int) -> tuple[str, ...]:
        """The routes block ``index`` serves: every modality, or only the image path past ``text_depth``."""
        return self.modalities if index < self.text_blocks else ("image",)

    @property
    def text_shape(self) -> tuple[int, int, int]:
        """(width, heads, FFN hidden width) of the text path."""
        ratio = self.mlp_ratio if self.text_mlp_ratio is None else self.text_mlp_ratio
        return self.text_dim, self.text_head_count, int(self.text_dim * ratio)

    @property
    def modality_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(width, heads, FFN hidden width) of each block route: the trunk's for the image path,
        :attr:`text_shape` for the text path (and the document expert, a copy of it)."""
        trunk = (self.width, self.heads, self.mlp_hidden)
        return {m: trunk if m == "image" else self.text_shape for m in self.modalities}

    @property
    def modalities(self) -> tuple[str, ...]:
        """The block routes this config builds: ``MODALITIES`` (+ ``"document"``)."""
        return MODALITIES + (("document",) if self.document_expert else ())

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "ModelConfig") -> ModelConfig:
        """Build from a dict (:meth:`to_dict` output). Fields older versions wrote and nothing reads
        (``extra``) are dropped with a debug log, so their config.json files still load; unknown
        fields and values of the wrong type (``"width": "128"``, ``"depth": 2.5``,
        ``"qkv_bias": "false"``) are a ``ValueError`` naming ``source`` and the field."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of ModelConfig fields, got {type(d).__name__}")
        d = dict(d)
        for name in RETIRED_FIELDS:
            if name in d:
                log.debug("ignoring retired ModelConfig field %r = %r", name, d.pop(name))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        check_field_types(d, source)
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the config as JSON atomically (temp file, then rename)."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
        return cls.from_dict(d, source=str(path))


# field type (as annotated) -> (accepted Python types, what to call it in errors)
_POSITIVE_INTS = (
    "width",
    "depth",
    "heads",
    "image_size",
    "patch_size",
    "in_chans",
    "vocab_size",
    "context_length",
    "embed_dim",
    "fusion_heads",
    "text_width",
    "text_heads",
    "text_depth",
)


def check_field_types(d: dict[str, Any], source: str = "ModelConfig") -> None:
    """Raise a ``ValueError`` naming ``source`` and every field whose value has the wrong type
    (booleans are not numbers, strings are not numbers or booleans) or an impossible size."""
    problems = []
    for f in dataclasses.fields(ModelConfig):
        if f.name not in d:
            continue
        v, t = d[f.name], str(f.type)
        optional = t.endswith("| None")
        base = t.replace(" | None", "")
        if v is None and optional:
            continue
        is_int = isinstance(v, int) and not isinstance(v, bool)
        ok = {
            "int": is_int,
            "float": is_int or isinstance(v, float) and not isinstance(v, bool),
            "bool": isinstance(v, bool),
            "str": isinstance(v, str),
            "dict[str, Any]": isinstance(v, dict),
            "list[int]": isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
        }.get(base)
        if base.startswith("tuple["):
            ok = (
                isinstance(v, (list, tuple))
                and len(v) == base.count(",") + 1
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            )
        if ok is None:
            continue
        if not ok:
            problems.append(f"{f.name!r} must be {base}{' or null' if optional else ''}, got {v!r}")
        elif f.name in _POSITIVE_INTS and v < 1:
            problems.append(f"{f.name!r} must be >= 1, got {v!r}")
        elif f.name == "context_length" and v < 3:
            problems.append(f"'context_length' must be >= 3 (bos, a piece, eos), got {v!r}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-trainable in minutes: 64 px images in 16x16 patches (a 4x4 grid), short captions.
    # At a fixed CPU budget this size retrieves better than 192x4 or 256x6, and two of its blocks
    # better than three on an AVX2-only CPU: the demo recipe train/tiny-cpu.yaml sets depth 2
    # (see the benchmarks pages).
    "tiny": dict(width=128, depth=3, heads=4, image_size=64, patch_size=16, context_length=16, embed_dim=128),
    "small": dict(width=384, depth=8, heads=6, image_size=128, patch_size=16, context_length=32, embed_dim=384),
    # ViT-B/16-sized trunk.
    "base": dict(
        width=768, depth=12, heads=12, image_size=224, patch_size=16, context_length=64, embed_dim=512, vocab_size=32000
    ),
}


def get_config(name: str = "tiny", **overrides: Any) -> ModelConfig:
    """Return the preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
