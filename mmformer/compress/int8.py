"""Dynamic int8 quantization of an MMFormer's Linear layers, for CPU inference.

Every ``nn.Linear`` of the trunk and the projections (shared ``qkv`` included) gets int8 weights
with one scale per output channel; activations are quantized on the fly per batch, and the
matmuls run in int8 with int32 accumulation (PyTorch's dynamic quantization, fbgemm/x86
kernels). Embeddings, LayerNorms and the patch-embedding convolution stay float32.

The copy is for inference only (no gradients, CPU only, not savable with ``save_pretrained``:
quantize again after loading the float model; it takes well under a second for the presets).
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from mmformer.model import model_fingerprint

log = logging.getLogger(__name__)


def quantize_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An int8 copy of ``model`` (or ``model`` itself when ``inplace``), in eval mode on the CPU.

    The result has ``is_int8 = True`` and ``source_fingerprint`` (the float model's
    fingerprint, so indexes built with either can be searched with the other).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic


    if getattr(model, "is_int8", False):
        return model
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantization runs on the CPU: move the model there first (model.cpu())")
    fingerprint = model_fingerprint(model)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # torch.ao's eager quantization warns that it will move to torchao
        warnings.simplefilter("ignore")
        quantize_dynamic(target, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    target.is_int8 = True
    target.source_fingerprint = fingerprint
    for p in target.parameters():
        p.requires_grad_(False)
    log.info("quantized %d Linear layers to int8 (engine %s)", count_int8_linears(target), engine)
    return target


def count_int8_linears(model: nn.Module) -> int:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    return sum(isinstance(m, QLinear) for m in model.modules())


def int8_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the Linear weights as stored, number of Linear layers), float or int8 model.

    For an int8 model the weight bytes are the int8 values plus the per-channel scales and
    zero points; for a float model, the float weights.
    """
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    total, count = 0, 0
    for m in model.modules():
        if isinstance(m, QLinear):
            w = m.weight()
            per_channel = w.qscheme() == torch.per_channel_affine
            n_scales = w.q_per_channel_scales().numel() if per_channel else 1
            total += w.int_repr().numel() + n_scales * 16  # int8 values + float64 scale, int64 zero point
            count += 1
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
            count += 1
    return total, count
