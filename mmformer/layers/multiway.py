"""The multiway transformer block: attention weights shared across modalities (VLMo style).

Each block owns one attention module whose fused ``qkv`` Linear (and, by ``share`` mode, the
output projection and the FFN) serves every modality, and per-modality LayerNorms. A part that
is not shared is an ``nn.ModuleDict`` keyed by modality, so the state-dict keys say what is
shared: ``attn.qkv.weight`` (shared) versus ``attn.qkv.image.weight`` (per modality). Shared
weights live inside one block, so FSDP can shard each block as one unit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from mmformer.config import MODALITIES, SHARE_MODES
from mmformer.layers.attention import AttendFn, attend, check_heads
from mmformer.layers.packing import TokenPacking


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    """The FFN activation ``name``: ``"gelu"`` (exact) or ``"quick_gelu"``."""
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; choose 'gelu' or 'quick_gelu'")


class Mlp(nn.Module):
    """Linear -> activation (exact GELU by default) -> Linear, named like timm's ``Mlp`` (fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def shared_or_per_modality(shared: bool, make: Callable[[], nn.Module], modalities: tuple[str, ...]) -> nn.Module:
    """One module when ``shared``, else a ModuleDict with one fresh module per modality."""
    return make() if shared else nn.ModuleDict({m: make() for m in modalities})


def route(module: nn.Module, modality: str) -> nn.Module:
    """The module that serves ``modality``: the shared one, or its entry in a ModuleDict."""
    return module[modality] if isinstance(module, nn.ModuleDict) else module


def each(module: nn.Module) -> list[nn.Module]:
    """Every module behind a shared-or-per-modality part: the shared one, or each modality's."""
    return list(module.values()) if isinstance(module, nn.ModuleDict) else [module]


def sharing(share: str) -> dict[str, bool]:
    """Which parts of a block are shared for a ``share`` mode."""
    if share not in SHARE_MODES:
        raise ValueError(f"share={share!r} must be one of {SHARE_MODES}")
    return {
        "qkv": share != "none",
        "proj": share in ("attention", "all"),
        "mlp": share == "all",
    }


class MultiwayAttention(nn.Module):
    """Self-attention whose ``qkv``/``proj`` are shared or per modality (see :func:`sharing`).

    ``heads`` heads of ``head_dim`` each (default ``dim // heads``): the inner width
    ``heads * head_dim`` may be smaller than ``dim`` after head pruning
    (:mod:`mmformer.compress.prune`): ``qkv`` maps dim -> 3 * inner (q, k, v, each head by head),
    ``proj`` maps inner -> dim.

    ``head_gate``: None (the default: nothing is computed for it), or an (H,) tensor that
    multiplies each head's attention output before ``proj``, for every modality (head-importance
    scoring differentiates the loss with respect to it; a 0 entry switches a head off).

    ``attend``: the dense attention kernel (default the reference
    :func:`~mmformer.layers.attention.attend`); ``text_attend``, the text routes' kernel, starts as
    the same and may be a sparse one (:func:`mmformer.layers.sparse.make_attend`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        share: str,
        modalities: tuple[str, ...],
        qkv_bias: bool = True,
        head_dim: int | None = None,
        shapes: Mapping[str, tuple[int, int]] | None = None,
        attend: AttendFn = attend,
    ) -> None:
        super().__init__()
        if head_dim is None:
            check_heads(dim, heads)
            head_dim = dim // heads
        if heads < 1 or head_dim < 1:
            raise ValueError(f"need heads >= 1 and head_dim >= 1, got heads={heads}, head_dim={head_dim}")
        s = sharing(share)
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.qkv = shared_or_per_modality(s["qkv"], lambda: nn.Linear(dim, 3 * inner, bias=qkv_bias), modalities)
        self.proj = shared_or_per_modality(s["proj"], lambda: nn.Linear(inner, dim), modalities)
        # modalities of their own (width, heads) (share="none" only): None = every modality has (dim, heads)
        self.heads_by_modality: dict[str, int] | None = None
        if shapes is not None and any(shapes.get(m, (dim, heads)) != (dim, heads) for m in modalities):
            self._own_shapes(shapes, share, modalities, qkv_bias)
        self.attend: AttendFn = attend
        self.text_attend: AttendFn = attend
        self.head_gate: torch.Tensor | None = None

    def _own_shapes(
        self, shapes: Mapping[str, tuple[int, int]], share: str, modalities: tuple[str, ...], qkv_bias: bool
    ) -> None:
        """Give each modality its own (width, heads) projections: a two-tower model (share="none")."""
        if share != "none" or self.heads * self.head_dim != next(iter(self.qkv.values())).in_features:
            raise ValueError(
                f"modalities of different widths or heads need share='none' and unpruned heads, got share={share!r}"
            )
        self.heads_by_modality = {}
        for m in modalities:
            width, heads = shapes.get(m, (self.heads * self.head_dim, self.heads))
            check_heads(width, heads)
            self.qkv[m] = nn.Linear(width, 3 * width, bias=qkv_bias)
            self.proj[m] = nn.Linear(width, width)
            self.heads_by_modality[m] = heads

    def forward(
        self,
        x: torch.Tensor,
        modality: str,
        key_padding_mask: torch.Tensor | None = None,
        packing: TokenPacking | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D) of one modality, or its (N, D) real tokens with their ``packing`` (then the
        projections run on the N tokens and only the attention kernel sees the (B, T) layout);
        key_padding_mask: (B, T) bool, True = real token."""
        fn = self.attend if modality == "image" else self.text_attend
        heads = self.heads if self.heads_by_modality is None else self.heads_by_modality[modality]
        qkv = route(self.qkv, modality)(x)
        h = fn(qkv if packing is None else packing.unpack(qkv), heads, key_padding_mask)  # (B, T, H*Dh)
        if self.head_gate is not None:
            b, t, _ = h.shape
            h = (h.reshape(b, t, self.heads, self.head_dim) * self.head_gate.to(h.dtype)[:, None]).reshape(b, t, -1)
        return route(self.proj, modality)(h if packing is None else packing.pack(h))


class MultiwayBlock(nn.Module):
    """Pre-LN residual block: x + Attn(LN1_m(x)), then x + FFN_m(LN2_m(x)) for modality m.

    ``head_dim``: width of each attention head (default ``dim // heads``); a pruned block has
    fewer heads of the unpruned model's head width; ``attend``: the attention kernel (see
    :class:`MultiwayAttention`)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_hidden: int,
        share: str = "qkv",
        modalities: tuple[str, ...] = MODALITIES,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        head_dim: int | None = None,
        act: str = "gelu",
        shapes: Mapping[str, tuple[int, int, int]] | None = None,
        attend: AttendFn = attend,
    ) -> None:
        """``shapes``: (width, heads, FFN hidden width) of modalities that differ from (dim, heads,
        mlp_hidden), e.g. a CLIP text tower narrower than its image tower; only with share="none"."""
        super().__init__()
        s = sharing(share)
        shape = {m: (shapes or {}).get(m, (dim, heads, mlp_hidden)) for m in modalities}
        self.norm1 = nn.ModuleDict({m: nn.LayerNorm(shape[m][0], eps=eps) for m in modalities})
        self.attn = MultiwayAttention(
            dim, heads, share, modalities, qkv_bias, head_dim, {m: shape[m][:2] for m in modalities}, attend=attend
        )
        self.norm2 = nn.ModuleDict({m: nn.LayerNorm(shape[m][0], eps=eps) for m in modalities})
        if s["mlp"]:
            self.mlp = Mlp(dim, mlp_hidden, act)
        else:
            self.mlp = nn.ModuleDict({m: Mlp(shape[m][0], shape[m][2], act) for m in modalities})

    def forward(
        self,
        x: torch.Tensor,
        modality: str,
        key_padding_mask: torch.Tensor | None = None,
        packing: TokenPacking | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D); or, with ``packing`` (of ``key_padding_mask``), the (N, D) real
        tokens -> (N, D) (see :mod:`mmformer.layers.packing`)."""
        if modality not in self.norm1:
            raise KeyError(f"unknown modality {modality!r}; this block serves {list(self.norm1)}")
        x = x + self.attn(self.norm1[modality](x), modality, key_padding_mask, packing)
        return x + route(self.mlp, modality)(self.norm2[modality](x))

    def parts(self) -> tuple[nn.Module, ...]:
        """The block's parts, each one shared module or a ModuleDict keyed by modality:
        ``norm1``, ``norm2``, ``attn.qkv``, ``attn.proj``, ``mlp``."""
        return (self.norm1, self.norm2, self.attn.qkv, self.attn.proj, self.mlp)

    def add_modality(self, name: str, like: str) -> None:
        """Give modality ``name`` its own copy of every per-modality part of ``like``."""
        for parts in self.parts():
            if isinstance(parts, nn.ModuleDict):
                parts[name] = copy.deepcopy(parts[like])
