"""Hugging Face ``CLIPModel`` -> MMFormer with ``share="none"``.

:func:`hf_clip_config` turns a ``CLIPConfig`` dict (its ``config.json``) into a
:class:`ModelConfig`; :func:`hf_clip_to_mmformer` renames the state dict key by key, fusing each
attention's ``q_proj`` / ``k_proj`` / ``v_proj`` into one ``qkv``. A key with no counterpart is a
one-line error naming it. transformers itself is not needed: a saved directory is read as JSON
and safetensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from mmformer.config import ModelConfig

# CLIPTextConfig / CLIPVisionConfig defaults, for fields a config.json leaves out
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
    pad_token_id=1,
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hf_clip_config(config: Mapping[str, Any], source: str = "CLIPConfig") -> ModelConfig:
    """The ``share="none"`` :class:`ModelConfig` of a Hugging Face ``CLIPConfig`` dict."""
    if config.get("model_type", "clip") != "clip":
        raise ValueError(f"{source}: model_type = {config.get('model_type')!r}, expected 'clip'")
    t = {**_TEXT_DEFAULTS, **config.get("text_config", {})}
    v = {**_VISION_DEFAULTS, **config.get("vision_config", {})}
    if t["num_hidden_layers"] > v["num_hidden_layers"]:
        raise ValueError(
            f"{source}: {v['num_hidden_layers']} image layers and {t['num_hidden_layers']} text layers; "
            "MMFormer's text path runs through the first blocks of the image path's stack, so it "
            "cannot be deeper"
        )
    if t["hidden_act"] != v["hidden_act"] or t["hidden_act"] not in _ACTS:
        raise ValueError(
            f"{source}: hidden_act = {t['hidden_act']!r} (text) / {v['hidden_act']!r} (vision); "
            f"expected one of {sorted(_ACTS)} for both"
        )
    if t["layer_norm_eps"] != v["layer_norm_eps"]:
        raise ValueError(
            f"{source}: layer_norm_eps differs between the towers ({t['layer_norm_eps']} vs {v['layer_norm_eps']})"
        )
    eos = t["eos_token_id"]
    if eos not in (2, t["vocab_size"] - 1):  # 2: transformers pools at the highest id, as open_clip
        raise ValueError(
            f"{source}: text_config.eos_token_id = {eos}; MMFormer pools CLIP text at the highest id, "
            f"which needs eos_token_id = vocab_size - 1 = {t['vocab_size'] - 1}"
        )
    return ModelConfig(
        width=v["hidden_size"],
        depth=v["num_hidden_layers"],
        heads=v["num_attention_heads"],
        mlp_ratio=v["intermediate_size"] / v["hidden_size"],
        qkv_bias=True,
        ln_eps=float(v["layer_norm_eps"]),
        share="none",
        mlp_act=_ACTS[v["hidden_act"]],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        in_chans=v["num_channels"],
        image_pos="learned",
        image_pre_norm=True,
        image_pool="cls",
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        patch_bias=False,
        vocab_size=t["vocab_size"],
        context_length=t["max_position_embeddings"],
        text_pool="argmax",
        pad_id=0,
        text_pos="learned",
        text_mask="causal",
        text_width=t["hidden_size"],
        text_heads=t["num_attention_heads"],
        text_mlp_ratio=t["intermediate_size"] / t["hidden_size"],
        text_depth=None if t["num_hidden_layers"] == v["num_hidden_layers"] else t["num_hidden_layers"],
        embed_dim=config.get("projection_dim", 512),
    )


_FIXED = {
    "vision_model.embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "vision_model.embeddings.class_embedding": "cls_token",
    "vision_model.embeddings.position_embedding.weight": "pos_embed",
    "vision_model.pre_layrnorm.weight": "norm_pre.weight",
    "vision_model.pre_layrnorm.bias": "norm_pre.bias",
    "vision_model.post_layernorm.weight": "norm.image.weight",
    "vision_model.post_layernorm.bias": "norm.image.bias",
    "visual_projection.weight": "image_proj.weight",
    "text_model.embeddings.token_embedding.weight": "token_embed.weight",
    "text_model.embeddings.position_embedding.weight": "text_pos",
    "text_model.final_layer_norm.weight": "norm.text.weight",
    "text_model.final_layer_norm.bias": "norm.text.bias",
    "text_projection.weight": "text_proj.weight",
    "logit_scale": "logit_scale",
}
# position ids: arange buffers that MMFormer does not keep (its positions are the table's rows)
_DERIVED = re.compile(r"(vision|text)_model\.embeddings\.position_ids")
_LAYER = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_LAYER_PARTS = {
    "layer_norm1": "norm1.{m}",
    "layer_norm2": "norm2.{m}",
    "self_attn.out_proj": "attn.proj.{m}",
    "mlp.fc1": "mlp.{m}.fc1",
    "mlp.fc2": "mlp.{m}.fc2",
}


def hf_clip_to_mmformer(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPModel`` state dict -> MMFormer's keys (``share="none"``)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # fused name -> {"q": .., "k": .., "v": ..}
    for key, value in state.items():
        if key in _FIXED:
            new = _FIXED[key]
            out[new] = (
                value.reshape(1, 1, -1) if new == "cls_token" else value.unsqueeze(0) if new == "pos_embed" else value
            )
            continue
        if _DERIVED.fullmatch(key):
            continue
        m = _LAYER.fullmatch(key)
        if m:
            tower, idx, part, param = m.groups()
            modality = "image" if tower == "vision" else "text"
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"blocks.{idx}.attn.qkv.{modality}.{param}", {})[part[-6]] = value
                continue
            if part in _LAYER_PARTS:
                out[f"blocks.{idx}.{_LAYER_PARTS[part].format(m=modality)}.{param}"] = value
                continue
        raise ValueError(f"Hugging Face CLIP key {key!r} has no MMFormer counterpart")
    for new, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(
                f"Hugging Face CLIP state dict lacks the {sorted({'q', 'k', 'v'} - set(parts))} projection(s) of {new}"
            )
        out[new] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
