"""The ``mmformer import`` and ``mmformer export --open-clip`` verbs: CLIP checkpoints in and out.

:func:`import_clip` writes a save_pretrained directory from an open_clip architecture and weights
file or a Hugging Face CLIP directory; :func:`export_open_clip` writes a save_pretrained model's
weights as a state dict open_clip's ``CLIP`` of the same architecture loads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmformer.convert.open_clip import mmformer_to_open_clip
from mmformer.files import atomic_dir, atomic_path
from mmformer.model import MMFormer

log = logging.getLogger(__name__)


def import_clip(
    out: str | os.PathLike,
    open_clip_arch: str | None = None,
    weights: str | os.PathLike | None = None,
    hf_clip: str | os.PathLike | None = None,
    quick_gelu: bool | None = None,
) -> Path:
    """Convert a CLIP checkpoint into a save_pretrained directory ``out`` (written whole or not at all).

    Either ``open_clip_arch`` (an open_clip architecture name) with ``weights`` (its state dict or
    training checkpoint file; ``quick_gelu`` for OpenAI's weights under a plain architecture name),
    or ``hf_clip``, a Hugging Face CLIP directory. The model keeps CLIP's tokenizer.
    """
    if (open_clip_arch is None) == (hf_clip is None):
        raise ValueError("give an open_clip architecture (with its weights file) or a Hugging Face CLIP directory")
    if open_clip_arch is not None:
        if weights is None:
            raise ValueError(f"open_clip {open_clip_arch}: needs the weights file (--weights FILE)")
        model = MMFormer.from_open_clip(weights, open_clip_arch, quick_gelu=quick_gelu)
    else:
        if weights is not None:
            raise ValueError("a Hugging Face CLIP directory holds its weights; --weights is for open_clip")
        model = MMFormer.from_hf_clip(hf_clip)
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    log.info("imported %s into %s (%d parameters)", open_clip_arch or hf_clip, out, model.num_parameters())
    return out


def export_open_clip(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the weights of the save_pretrained model at ``model_dir`` as an open_clip ``CLIP``
    state dict at ``out`` (``.safetensors``, else a ``torch.save`` file), for
    ``open_clip.create_model(arch, pretrained=out)`` of the architecture it was imported from."""
    model = MMFormer.from_pretrained(model_dir)
    c = model.config
    if c.share != "none" or c.text_mask != "causal" or c.text_pool != "argmax" or c.patch_bias:
        raise ValueError(
            f"{model_dir}: open_clip export needs a CLIP-shaped model (share='none', causal text "
            f"pooled at its highest id, no patch bias), got share={c.share!r}, text_mask={c.text_mask!r}, "
            f"text_pool={c.text_pool!r}, patch_bias={c.patch_bias}"
        )
    state = mmformer_to_open_clip({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            save_file(state, tmp)
        else:
            torch.save(state, tmp)
    return out


def add_import_arguments(p) -> None:
    """The flags of ``mmformer import`` (``p``: an ``argparse.ArgumentParser``)."""
    p.add_argument("--open-clip", metavar="ARCH", help="open_clip architecture name (e.g. ViT-B-32), with --weights")
    p.add_argument("--weights", help="open_clip state dict or training checkpoint file")
    p.add_argument("--quick-gelu", action="store_true", default=None, help="QuickGELU (OpenAI's own weights)")
    p.add_argument("--hf-clip", metavar="DIR", help="Hugging Face CLIPModel directory (config.json + weights)")
    p.add_argument("--out", required=True, help="save_pretrained directory to write")


def import_command(
    *,
    out: str,
    open_clip: str | None = None,
    weights: str | None = None,
    quick_gelu: bool | None = None,
    hf_clip: str | None = None,
) -> int:
    """``mmformer import``: :func:`import_clip`, printing the folder written."""
    print(f"wrote {import_clip(out, open_clip, weights, hf_clip, quick_gelu)}")
    return 0
