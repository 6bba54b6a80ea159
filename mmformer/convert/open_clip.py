"""open_clip ``CLIP`` (ViT image tower, transformer text tower) <-> MMFormer with ``share="none"``.

:func:`open_clip_config` reads an architecture from open_clip's bundled model configs (no
download) and turns it into a :class:`ModelConfig`; :func:`open_clip_to_mmformer` renames a state
dict key by key and :func:`mmformer_to_open_clip` renames it back. Every key is accounted for: a key
with no counterpart is a one-line error naming it, never a silent drop.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from mmformer.config import ModelConfig

# open_clip's CLIPVisionCfg / CLIPTextCfg fields MMFormer can express (the others must keep their defaults)
_VISION_FIELDS = {
    "layers",
    "width",
    "head_width",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "patch_dropout",
    "output_tokens",
}
_TEXT_FIELDS = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "pad_id",
    "eos_id",
    "output_tokens",
}
_TOP_FIELDS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "custom_text", "cast_dtype", "preprocess_cfg"}
# per-block parts: open_clip name -> MMFormer part (the modality goes between part and parameter)
_BLOCK_PARTS = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "attn.out_proj": "attn.proj",
    "mlp.c_fc": "mlp.{m}.fc1",
    "mlp.c_proj": "mlp.{m}.fc2",
}
# buffers open_clip may keep in a state dict, rebuilt by MMFormer from its config
_DERIVED = {"attn_mask"}


def open_clip_arch_config(arch: str) -> dict[str, Any]:
    """open_clip's bundled config of ``arch`` (e.g. ``"ViT-B-32"``): read from the installed
    package, nothing downloaded."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("reading an open_clip architecture needs open_clip (pip install open-clip-torch)") from e
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"open_clip has no architecture {arch!r}; known ones: open_clip.list_models()")
    return cfg


def _defaults(kind: str) -> dict[str, Any]:
    import dataclasses

    from open_clip import model as oc_model

    cls = oc_model.CLIPVisionCfg if kind == "vision_cfg" else oc_model.CLIPTextCfg
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _check_supported(arch: str, cfg: Mapping[str, Any]) -> None:
    """One-line error naming the first field of ``cfg`` MMFormer cannot express."""
    for key, value in cfg.items():
        if key not in _TOP_FIELDS and value not in (None, False):
            raise ValueError(f"open_clip {arch}: {key} = {value!r} is not supported by MMFormer's CLIP import")
    for kind, supported in (("vision_cfg", _VISION_FIELDS), ("text_cfg", _TEXT_FIELDS)):
        defaults = _defaults(kind)
        for key, value in cfg.get(kind, {}).items():
            if key not in supported and value != defaults.get(key, object()):
                raise ValueError(
                    f"open_clip {arch}: {kind}.{key} = {value!r} is not supported by MMFormer's CLIP "
                    f"import (only a ViT image tower and a causal text tower pooled at its highest id)"
                )


def _single(arch: str, name: str, value: Any) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"open_clip {arch}: non-square {name} = {value!r} is not supported")
        value = value[0]
    return int(value)


def open_clip_config(arch: str, quick_gelu: bool | None = None, cfg: Mapping[str, Any] | None = None) -> ModelConfig:
    """The ``share="none"`` :class:`ModelConfig` of open_clip architecture ``arch``.

    ``quick_gelu``: override the architecture's activation (open_clip's ``force_quick_gelu``, which
    OpenAI's own weights need); ``cfg``: the architecture's config dict, when already read.
    """
    cfg = dict(open_clip_arch_config(arch) if cfg is None else cfg)
    _check_supported(arch, cfg)
    v, t = {**_defaults("vision_cfg"), **cfg["vision_cfg"]}, {**_defaults("text_cfg"), **cfg["text_cfg"]}
    if t["layers"] > v["layers"]:
        raise ValueError(
            f"open_clip {arch}: {v['layers']} image blocks and {t['layers']} text blocks; MMFormer's "
            "text path runs through the first blocks of the image path's stack, so it cannot be deeper"
        )
    if v["width"] % v["head_width"]:
        raise ValueError(
            f"open_clip {arch}: vision width {v['width']} is not a multiple of head_width {v['head_width']}"
        )
    import open_clip

    pre = cfg.get("preprocess_cfg", {})
    act = cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu
    return ModelConfig(
        width=v["width"],
        depth=v["layers"],
        heads=v["width"] // v["head_width"],
        mlp_ratio=float(v["mlp_ratio"]),
        qkv_bias=True,
        ln_eps=1e-5,
        share="none",
        mlp_act="quick_gelu" if act else "gelu",
        image_size=_single(arch, "image_size", v["image_size"]),
        patch_size=_single(arch, "patch_size", v["patch_size"]),
        in_chans=3,
        image_pos="learned",
        image_pre_norm=True,
        image_pool="cls",
        image_mean=tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        image_std=tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)),
        patch_bias=False,
        vocab_size=t["vocab_size"],
        context_length=t["context_length"],
        text_pool="argmax",
        pad_id=t["pad_id"],
        text_pos="learned",
        text_mask="causal",
        text_width=t["width"],
        text_heads=t["heads"],
        text_mlp_ratio=float(t["mlp_ratio"]),
        text_depth=None if t["layers"] == v["layers"] else t["layers"],
        embed_dim=cfg["embed_dim"],
    )


def open_clip_to_mmformer(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ``CLIP`` state dict -> MMFormer's keys (``share="none"``). A key with no
    counterpart (a timm or Hugging Face tower, layer scale, a logit bias, attention pooling) is a
    ``ValueError`` naming it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _rename_from_open_clip(key)
        if new is None:
            continue
        out[new] = value.t().contiguous() if key in ("visual.proj", "text_projection") else value
        if key == "visual.class_embedding":
            out[new] = value.reshape(1, 1, -1)
        elif key == "visual.positional_embedding":
            out[new] = value.unsqueeze(0)
    return out


def _rename_from_open_clip(key: str) -> str | None:
    fixed = {
        "visual.conv1.weight": "patch_embed.proj.weight",
        "visual.class_embedding": "cls_token",
        "visual.positional_embedding": "pos_embed",
        "visual.proj": "image_proj.weight",
        "token_embedding.weight": "token_embed.weight",
        "positional_embedding": "text_pos",
        "text_projection": "text_proj.weight",
        "logit_scale": "logit_scale",
    }
    if key in fixed:
        return fixed[key]
    if key in _DERIVED:
        return None
    m = re.fullmatch(r"(visual\.)?(ln_pre|ln_post|ln_final)\.(weight|bias)", key)
    if m:
        tower, part, param = m.groups()
        target = {"ln_pre": "norm_pre", "ln_post": "norm.image", "ln_final": "norm.text"}[part]
        if (part == "ln_final") == bool(tower):
            raise ValueError(f"open_clip key {key!r} has no MMFormer counterpart")
        return f"{target}.{param}"
    m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
    m2 = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
    if m2:
        tower, idx, param = m2.groups()
        return f"blocks.{idx}.attn.qkv.{'image' if tower else 'text'}.{param}"
    if m and m.group(3) in _BLOCK_PARTS:
        tower, idx, part, param = m.groups()
        modality = "image" if tower else "text"
        target = _BLOCK_PARTS[part]
        target = target.format(m=modality) if "{m}" in target else f"{target}.{modality}"
        return f"blocks.{idx}.{target}.{param}"
    raise ValueError(
        f"open_clip key {key!r} has no MMFormer counterpart (layer scale, attention pooling, a logit "
        "bias, or a timm / Hugging Face tower are not supported)"
    )


def mmformer_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`open_clip_to_mmformer`: a ``share="none"`` MMFormer's state dict ->
    the open_clip ``CLIP`` keys (``attn_mask`` is open_clip's own buffer and not written). A key
    with no counterpart (a document expert, a fusion module, a patch-embedding bias) is a
    ``ValueError`` naming it."""
    inverse = {}
    for key in state:
        inverse[key] = _rename_to_open_clip(key)
    out = {}
    for key, value in state.items():
        new = inverse[key]
        if new in ("visual.proj", "text_projection"):
            value = value.t().contiguous()
        elif new == "visual.class_embedding":
            value = value.reshape(-1)
        elif new == "visual.positional_embedding":
            value = value.squeeze(0)
        out[new] = value
    return out


def _rename_to_open_clip(key: str) -> str:
    fixed = {
        "patch_embed.proj.weight": "visual.conv1.weight",
        "cls_token": "visual.class_embedding",
        "pos_embed": "visual.positional_embedding",
        "image_proj.weight": "visual.proj",
        "token_embed.weight": "token_embedding.weight",
        "text_pos": "positional_embedding",
        "text_proj.weight": "text_projection",
        "logit_scale": "logit_scale",
        "norm_pre.weight": "visual.ln_pre.weight",
        "norm_pre.bias": "visual.ln_pre.bias",
        "norm.image.weight": "visual.ln_post.weight",
        "norm.image.bias": "visual.ln_post.bias",
        "norm.text.weight": "ln_final.weight",
        "norm.text.bias": "ln_final.bias",
    }
    if key in fixed:
        return fixed[key]
    m = re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp)\.(image|text)\.(.+)", key)
    if m:
        idx, part, modality, rest = m.groups()
        prefix = f"{'visual.' if modality == 'image' else ''}transformer.resblocks.{idx}"
        if part == "attn.qkv" and rest in ("weight", "bias"):
            return f"{prefix}.attn.in_proj_{rest}"
        names = {"norm1": "ln_1", "norm2": "ln_2", "attn.proj": "attn.out_proj"}
        if part in names and rest in ("weight", "bias"):
            return f"{prefix}.{names[part]}.{rest}"
        if part == "mlp" and rest in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            return f"{prefix}.mlp.{'c_fc' if rest.startswith('fc1') else 'c_proj'}.{rest.split('.')[1]}"
    raise ValueError(
        f"MMFormer key {key!r} has no open_clip counterpart (open_clip export needs a share='none' "
        "model without a document expert, fusion module or patch-embedding bias)"
    )
