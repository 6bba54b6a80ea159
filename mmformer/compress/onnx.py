"""ONNX export of an MMFormer's two encoders, with onnxruntime int8 copies.

:func:`export_onnx` writes a folder that any ONNX runtime (onnxruntime, Triton's ONNX backend)
can serve without mmformer or torch:

- ``image.onnx``: ``images`` float32 (B, 3, S, S), normalised pixels -> ``embeddings`` (B, E)
- ``text.onnx``: ``input_ids`` int64 (B, T) + ``attention_mask`` int64 (B, T), 1 = real token,
  0 = padding, T <= ``context_length`` -> ``embeddings`` (B, E)
- ``image.int8.onnx``, ``text.int8.onnx``: the same graphs after onnxruntime's dynamic int8
  quantization (int8 per-channel weights, uint8 activations quantized per call)
- ``config.json`` and ``tokenizer.model`` of the model, ``onnx.json`` (inputs, outputs, opset,
  the float model's fingerprint and the parity measured at export)

Batch B and text length T are dynamic axes. The embeddings are L2-normalised, as
``encode_image`` / ``encode_text`` return them. The graphs come from the TorchScript exporter
(``torch.onnx.export(dynamo=False)``): the model's input checks (shapes, no all-padding row) are
Python conditions that the tracer evaluates once, so the graph holds only the computation
(SDPA with the key-padding mask, the text routing of the multiway blocks, EOS pooling).

``onnx``/``onnxruntime`` are optional dependencies (``pip install mmformer[onnx]``), imported
inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmformer.compress.int8 import cpu_has_vnni
from mmformer.config import ModelConfig
from mmformer.files import atomic_path, write_text_atomic
from mmformer.model import CONFIG_NAME, TOKENIZER_NAME, MMFormer, model_fingerprint
from mmformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

OPSET = 17
GRAPHS = {"image": "image.onnx", "text": "text.onnx"}
INT8_GRAPHS = {"image": "image.int8.onnx", "text": "text.int8.onnx"}
MANIFEST_NAME = "onnx.json"
PARITY_ATOL = 1e-4  # fp32 graph vs PyTorch, max |difference| of embedding entries


class ImageEncoder(nn.Module):
    """``images`` (B, 3, S, S) -> unit embeddings (B, E): the graph of ``image.onnx``."""

    def __init__(self, model: MMFormer) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class TextEncoder(nn.Module):
    """``input_ids`` (B, T) int64 + ``attention_mask`` (B, T) int64 (1 = real) -> unit embeddings (B, E)."""

    def __init__(self, model: MMFormer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask.bool())


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the '{module}' package: pip install 'mmformer[onnx]'") from e


def _check_exportable(model: MMFormer) -> None:
    if getattr(model, "is_int8", False):
        raise ValueError(
            "export the float model: a quantize_int8 copy is not exportable to ONNX "
            "(the int8 ONNX graphs are made from the float ones by onnxruntime)"
        )
    if model.config.attention != "dense":
        raise ValueError(
            f"ONNX export supports dense text attention only; this model uses "
            f"attention={model.config.attention!r} (set_text_attention('dense') first)"
        )
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("move the model to the CPU (model.cpu()) before exporting to ONNX")


def sample_inputs(model: MMFormer, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for both graphs: random images, and ``batch`` texts of different lengths padded to
    the longest (real tokens from the model's vocabulary, BOS/EOS as the tokenizer writes them)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, c.in_chans, c.image_size, c.image_size, generator=g)
    lengths = [max(3, c.context_length - 2 * i) for i in range(batch)]
    t = max(lengths)
    ids = torch.full((batch, t), c.pad_id, dtype=torch.int64)
    mask = torch.zeros(batch, t, dtype=torch.int64)
    low = max(c.pad_id, 3) + 1
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(low, c.vocab_size, (n,), generator=g)
        mask[i, :n] = 1
    return {"images": images.numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def export_onnx(
    model: MMFormer, out_dir: str | os.PathLike, *, opset: int = OPSET, int8: bool = True, check: bool = True
) -> dict:
    """Write the two encoder graphs (and their int8 copies) to ``out_dir``; returns the manifest.

    ``check``: run both fp32 graphs with onnxruntime on :func:`sample_inputs` and raise if any
    embedding entry differs from PyTorch by more than ``PARITY_ATOL``; the int8 graphs' lowest
    per-row cosine similarity to PyTorch is recorded in the manifest (not enforced here).
    """
    _require("onnx")
    _check_exportable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    c = model.config
    sample = sample_inputs(model, batch=2)
    images = torch.from_numpy(sample["images"])
    ids, mask = torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"])
    specs = {
        "image": (ImageEncoder(model), (images,), ["images"], {"images": {0: "batch"}, "embeddings": {0: "batch"}}),
        "text": (
            TextEncoder(model),
            (ids, mask),
            ["input_ids", "attention_mask"],
            {
                "input_ids": {0: "batch", 1: "length"},
                "attention_mask": {0: "batch", 1: "length"},
                "embeddings": {0: "batch"},
            },
        ),
    }
    for name, (module, args, inputs, axes) in specs.items():
        with atomic_path(out / GRAPHS[name]) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about the Python input checks
            torch.onnx.export(
                module,
                args,
                tmp,
                input_names=inputs,
                output_names=["embeddings"],
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
        log.info("wrote %s", out / GRAPHS[name])
    if int8:
        for name in GRAPHS:
            quantize_onnx_int8(out / GRAPHS[name], out / INT8_GRAPHS[name])
    c.to_json(out / CONFIG_NAME)
    if model.tokenizer is not None:
        model.tokenizer.save(out / TOKENIZER_NAME)
    manifest = {
        "format": 1,
        "opset": opset,
        "fingerprint": model_fingerprint(model),
        "embed_dim": c.embed_dim,
        "image_size": c.image_size,
        "context_length": c.context_length,
        "image_mean": list(c.image_mean),
        "image_std": list(c.image_std),
        "graphs": {
            "image": {
                "file": GRAPHS["image"],
                "int8": INT8_GRAPHS["image"] if int8 else None,
                "inputs": {"images": ["batch", c.in_chans, c.image_size, c.image_size]},
                "outputs": {"embeddings": ["batch", c.embed_dim]},
            },
            "text": {
                "file": GRAPHS["text"],
                "int8": INT8_GRAPHS["text"] if int8 else None,
                "inputs": {"input_ids": ["batch", "length"], "attention_mask": ["batch", "length"]},
                "outputs": {"embeddings": ["batch", c.embed_dim]},
                "max_length": c.context_length,
                "pad_id": c.pad_id,
            },
        },
    }
    if check:
        manifest["parity"] = check_parity(model, out, int8=int8)
        bad = {k: v for k, v in manifest["parity"].items() if k.endswith("fp32_max_abs_diff") and v > PARITY_ATOL}
        if bad:
            raise RuntimeError(f"{out}: exported graphs differ from PyTorch by more than {PARITY_ATOL}: {bad}")
    write_text_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return manifest


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike, reduce_range: bool | None = None) -> Path:
    """onnxruntime dynamic int8 quantization of ``src`` (MatMul/Gemm weights int8 per channel,
    activations uint8 quantized per call) written to ``dst``.

    ``reduce_range`` quantizes the weights to 7 bits. Without VNNI (AVX2-only CPUs) onnxruntime's
    uint8 x int8 kernels add pairs of products in int16, which saturates with full-range
    per-channel weights: on an AVX2-only CPU the image embeddings then agree with fp32 markedly
    worse than on VNNI CPUs (see the benchmarks pages). ``None`` (default) reduces the range where this CPU has
    no VNNI (:func:`mmformer.compress.int8.cpu_has_vnni`); a graph meant for another CPU kind can
    say which it needs."""
    _require("onnxruntime")
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    # onnxruntime's advised pre-processing (shape inference, graph optimisation) first; without
    # it quantize_dynamic warns through the root logger (which would configure the root logger)
    with (
        tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as work,
        atomic_path(dst) as tmp,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        pre = str(Path(work) / "preprocessed.onnx")
        quant_pre_process(str(src), pre, skip_symbolic_shape=True)
        quantize_dynamic(pre, tmp, weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range)
    log.info("wrote %s (int8 weights%s)", dst, ", 7-bit range (reduce_range)" if reduce_range else "")
    return dst


def check_parity(model: MMFormer, onnx_dir: str | os.PathLike, int8: bool = True, batch: int = 3) -> dict[str, float]:
    """ONNX graphs against PyTorch on :func:`sample_inputs` (a fresh draw: other batch and lengths
    than the export's): the fp32 graphs' max |difference| and the int8 graphs' lowest per-row cosine."""
    enc = {"fp32": OnnxEncoder(onnx_dir)}
    if int8:
        enc["int8"] = OnnxEncoder(onnx_dir, int8=True)
    sample = sample_inputs(model, batch=batch, seed=1)
    with torch.inference_mode():
        ref = {
            "image": model.encode_image(torch.from_numpy(sample["images"])).numpy(),
            "text": model.encode_text(
                torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"]).bool()
            ).numpy(),
        }
    out = {}
    for kind, e in enc.items():
        got = {
            "image": e.encode_image(sample["images"]),
            "text": e.encode_text(sample["input_ids"], sample["attention_mask"]),
        }
        for name in ("image", "text"):
            if kind == "fp32":
                out[f"{name}_fp32_max_abs_diff"] = float(np.abs(got[name] - ref[name]).max())
            else:
                out[f"{name}_int8_min_cosine"] = float((got[name] * ref[name]).sum(-1).min())
    return out


class OnnxEncoder:
    """The exported encoders run with onnxruntime (CPU), mmformer-free at inference.

    Args:
        onnx_dir: a folder written by :func:`export_onnx`.
        int8: use ``image.int8.onnx`` / ``text.int8.onnx``.
        threads: onnxruntime intra-op threads (0 = its default).
    """

    def __init__(self, onnx_dir: str | os.PathLike, int8: bool = False, threads: int = 0) -> None:
        ort = _require("onnxruntime")
        self.dir = Path(onnx_dir)
        files = INT8_GRAPHS if int8 else GRAPHS
        missing = [f for f in files.values() if not (self.dir / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.dir}: missing {missing} (expected a folder written by "
                f"`mmformer export --onnx`{'' if not int8 else ' with int8 graphs'})"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.sessions = {
            k: ort.InferenceSession(str(self.dir / f), opts, providers=["CPUExecutionProvider"])
            for k, f in files.items()
        }
        self.config = ModelConfig.from_json(self.dir / CONFIG_NAME)
        tok = self.dir / TOKENIZER_NAME
        self.tokenizer = Tokenizer.load(tok) if tok.is_file() else None

    def encode_image(self, images) -> np.ndarray:
        """(B, 3, S, S) normalised float pixels -> (B, E) unit embeddings."""
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        return self.sessions["image"].run(None, {"images": x})[0]

    def encode_text(self, input_ids, attention_mask) -> np.ndarray:
        """(B, T) ids + (B, T) mask (bool or 0/1) -> (B, E) unit embeddings."""
        ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
        mask = np.ascontiguousarray(np.asarray(attention_mask).astype(np.int64))
        return self.sessions["text"].run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Tokenize with the exported tokenizer and encode, (len(texts), E)."""
        if self.tokenizer is None:
            raise RuntimeError(f"{self.dir} has no {TOKENIZER_NAME}; pass ids to encode_text")
        ids, mask = self.tokenizer(list(texts), max_length=self.config.context_length)
        return self.encode_text(ids.numpy(), mask.numpy())
