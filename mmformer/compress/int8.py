"""Dynamic int8 quantization of an MMFormer's Linear layers, for CPU inference.

Every ``nn.Linear`` of the trunk and the projections (shared ``qkv`` included) gets int8 weights
with one scale per output channel; activations are quantized on the fly (per batch or per
token), and the matmuls run in int8 with int32 accumulation. Embeddings, LayerNorms and the
patch-embedding convolution stay float32. Two implementations:

- ``"torchao"``: ``torchao.quantization.quantize_`` with ``Int8DynamicActivationInt8WeightConfig``
  (symmetric per-token activations, symmetric per-channel weights; the weights become
  ``Int8Tensor`` parameters of the same ``nn.Linear`` modules). It is PyTorch's supported
  quantization path and, optionally, ``torch.compile``-d (``compile=True``), which fuses the
  activation quantization into the matmuls.
- ``"torch.ao"``: ``torch.ao.quantization.quantize_dynamic`` (fbgemm/x86 kernels; the Linear
  modules are swapped for ``torch.ao.nn.quantized.dynamic.Linear``). Deprecated by PyTorch in
  favour of torchao; kept as the fallback.

``backend="auto"`` takes :func:`default_backend` (torch.ao, the faster one as measured) and falls
back to the other one when it is missing or fails (e.g. once torch removes the deprecated
``torch.ao`` API: then torchao serves alone).

The copy is for inference only (no gradients, CPU only, not savable with ``save_pretrained``:
quantize again after loading the float model; it takes well under a second for the presets).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from mmformer.model import model_fingerprint

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torchao", "torch.ao")


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise the named loggers to ERROR for the duration (third-party import-time notices)."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def cpu_has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI (or AVX-VNNI) int8 dot products, as torch reports it."""
    for probe in (getattr(torch._C, "_cpu", None), getattr(torch, "cpu", None)):
        fn = getattr(probe, "_is_vnni_supported", None) if probe is not None else None
        if fn is not None:
            try:
                return bool(fn())
            except RuntimeError:
                return False
    return False


def default_backend() -> str:
    """The int8 backend ``backend="auto"`` tries first: ``"torch.ao"``, with torchao as the fallback.

    On the CPUs measured (AVX-512 with VNNI, no AMX; see the benchmarks pages) torch.ao's fbgemm
    kernels are the fastest int8 path, well ahead of torchao's eager path (whose per-Linear cost is
    tensor-subclass dispatch in Python, not the matmul); ``torch.compile`` closes most of that gap
    after compiling each modality and shape. That dispatch cost does not depend on the CPU; AMX
    CPUs (where torchao's s8s8 matmuls could use the tile units) have not been measured, so the
    rule is one choice for every CPU kind rather than a guess per kind.
    """
    return "torch.ao"


def available_backends() -> list[str]:
    """The concrete backends whose APIs import in this environment (not "auto")."""
    out = []
    if _torchao_api() is not None:
        out.append("torchao")
    if _torch_ao_api() is not None:
        out.append("torch.ao")
    return out


def _torchao_api():
    try:
        with _quiet("torch.utils._pytree"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    return quantize_, Int8DynamicActivationInt8WeightConfig


def _torch_ao_api():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        return None
    return quantize_dynamic, per_channel_dynamic_qconfig


def quantize_int8(
    model: nn.Module, inplace: bool = False, backend: str = "auto", compile: bool | str = False
) -> nn.Module:
    """An int8 copy of ``model`` (or ``model`` itself when ``inplace``), in eval mode on the CPU.

    Args:
        backend: ``"auto"`` (:func:`default_backend`, then the other one if that is missing or
            fails), ``"torchao"`` or ``"torch.ao"`` (that one only; errors propagate).
        compile: ``torch.compile`` the transformer trunk (``MMFormer.forward_tokens``) after
            quantizing: ``True`` for inductor, or a ``torch.compile`` backend name. The first
            call of each modality (and of a new input shape) compiles, which takes tens of
            seconds on a small CPU: worth it for a long-running service, not a one-off query.

    The result has ``is_int8 = True``, ``int8_backend`` (the implementation used) and
    ``source_fingerprint`` (the float model's fingerprint, so indexes built with either can be
    searched with the other).
    """
    if backend not in BACKENDS:
        raise ValueError(f"int8 backend {backend!r}: expected one of {BACKENDS}")
    if getattr(model, "is_int8", False):
        return model
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantization runs on the CPU: move the model there first (model.cpu())")
    fingerprint = model_fingerprint(model)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    if backend == "auto":
        first = default_backend()
        order = [first, "torch.ao" if first == "torchao" else "torchao"]
    else:
        order = [backend]
    errors, missing = [], []
    for name in order:
        try:
            _QUANTIZERS[name](target)
        except Exception as e:  # noqa: BLE001 -- the fallback must survive any failure of a backend
            if backend != "auto":
                raise
            if count_int8_linears(target):  # half-converted in place: no clean fallback
                raise RuntimeError(f"int8 backend {name} failed after converting some layers: {e}") from e
            errors.append(f"{name}: {e.__class__.__name__}: {e}")
            missing.append(isinstance(e, ImportError))
            continue
        if errors:  # said once the fallback worked; when none works, the error below says it all
            log.warning("int8 backend %s; falling back to %s", "; ".join(errors), name)
        break
    else:
        if all(missing):
            raise ImportError(
                "int8 quantization needs torchao (this torch has no torch.ao.quantization): "
                "pip install 'mmformer[int8]'",
                name="torchao",
            )
        raise RuntimeError("no int8 backend worked: " + "; ".join(errors))
    target.is_int8 = True
    target.int8_backend = name
    target.source_fingerprint = fingerprint
    for p in target.parameters():
        p.requires_grad_(False)
    if compile:
        _compile_trunk(target, "inductor" if compile is True else compile)
    log.info(
        "quantized %d Linear layers to int8 (%s%s)", count_int8_linears(target), name, ", compiled" if compile else ""
    )
    return target


def _quantize_torchao(model: nn.Module) -> None:
    api = _torchao_api()
    if api is None:
        raise ImportError("torchao is not installed: pip install 'mmformer[int8]'", name="torchao")
    quantize_, Config = api
    # reduce_range avoids int8 dot-product overflow on CPUs without VNNI (torchao's advice);
    # set_inductor_config=False: leave the process-wide inductor settings alone
    config = Config(set_inductor_config=False, reduce_range=not cpu_has_vnni())
    with _quiet("torch.utils._pytree"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config, filter_fn=lambda m, _: isinstance(m, nn.Linear))


def _quantize_torch_ao(model: nn.Module) -> None:
    api = _torch_ao_api()
    if api is None:
        raise ImportError("torch.ao.quantization.quantize_dynamic is not available in this torch")
    quantize_dynamic, qconfig = api
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # torch.ao's eager quantization warns that it will move to torchao
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)


_QUANTIZERS = {"torchao": _quantize_torchao, "torch.ao": _quantize_torch_ao}


def _compile_trunk(model: nn.Module, backend: str) -> None:
    """Replace the model's ``forward_tokens`` by a compiled copy (an instance attribute).

    The trunk is the whole per-token compute of both modalities; the input checks around it
    (shapes, all-padding rows) stay in eager Python, so the graph has no data-dependent breaks.
    """
    forward_tokens = getattr(model, "forward_tokens", None)
    if forward_tokens is None:
        raise TypeError(f"compile=True needs an MMFormer (a model with forward_tokens), got {type(model).__name__}")
    model.forward_tokens = torch.compile(forward_tokens, backend=backend, dynamic=None)
    model.int8_compiled = backend


def _torchao_weight(m: nn.Module):
    """The torchao ``Int8Tensor`` weight of a quantized ``nn.Linear`` (or None)."""
    w = getattr(m, "weight", None)
    return w if isinstance(m, nn.Linear) and hasattr(w, "qdata") and hasattr(w, "scale") else None


def _torch_ao_linear_type():
    try:
        from torch.ao.nn.quantized.dynamic import Linear as QLinear
    except ImportError:
        return None
    return QLinear


def count_int8_linears(model: nn.Module) -> int:
    """Linear layers of ``model`` holding int8 weights (either backend)."""
    qlinear = _torch_ao_linear_type()
    return sum(
        (qlinear is not None and isinstance(m, qlinear)) or _torchao_weight(m) is not None for m in model.modules()
    )


def int8_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the Linear weights as stored, number of Linear layers), float or int8 model.

    For an int8 model the weight bytes are the int8 values plus the per-channel scales and
    zero points; for a float model, the float weights.
    """
    qlinear = _torch_ao_linear_type()
    total, count = 0, 0
    for m in model.modules():
        if qlinear is not None and isinstance(m, qlinear):
            w = m.weight()
            per_channel = w.qscheme() == torch.per_channel_affine
            n_scales = w.q_per_channel_scales().numel() if per_channel else 1
            total += w.int_repr().numel() + n_scales * 16  # int8 values + float64 scale, int64 zero point
            count += 1
        elif (w := _torchao_weight(m)) is not None:
            total += sum(
                t.numel() * t.element_size()
                for t in (w.qdata, w.scale, getattr(w, "zero_point", None))
                if t is not None
            )
            count += 1
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
            count += 1
    return total, count
