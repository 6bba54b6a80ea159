"""Helpers shared by the benchmarks in ``bench/`` (not part of the library).

- :func:`load_tokenizer`: a SentencePiece model file, by default the one shipped in the package.
- :func:`open_clip_config` / :func:`build_open_clip`: an open_clip CLIP of the same size as an
  mmformer :class:`~mmformer.config.ModelConfig`, built from config dicts (no download).
- :class:`Pair`: one interface over both models for training steps and retrieval embedding.
- :func:`count_train_flops`: FLOPs of one forward+backward, including CPU attention kernels.
- :func:`best_rate`: items per second of the fastest of several timed inference calls.
- :class:`OnnxModel`: an ``export_onnx`` folder run by onnxruntime behind MMFormer's encoder calls.
- :func:`held_out_split`, :func:`held_out_recall`: the bundled held-out family and a model's
  retrieval metrics on it, as ``mmformer demo`` computes them.
- :func:`add_cpu_settings_argument`, :func:`apply_cpu_settings`: the process settings the training
  commands apply, or none.
- :func:`machine_line`, :func:`markdown_table`: the report's last lines.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mmformer.compress.onnx import GRAPHS, INT8_GRAPHS, OnnxEncoder
from mmformer.config import ModelConfig
from mmformer.tokenizer import EOS_ID, PAD_ID, Tokenizer, default_tokenizer_path
from mmformer.runtime import flush_denormals, keep_freed_memory

REPO = Path(__file__).resolve().parents[1]


# ---- tokenizer ---------------------------------------------------------------------------------
def load_tokenizer(path: str | None = None) -> tuple[Tokenizer, str]:
    """(tokenizer, where it came from): ``path``, else the default one shipped in the package."""
    chosen = Path(path) if path else default_tokenizer_path()
    return Tokenizer.load(chosen), str(chosen)


# ---- open_clip of the same size ----------------------------------------------------------------
def open_clip_config(c: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """``open_clip.model.CLIP`` kwargs for the same trunk shape as ``c``.

    Text pooling: our ids are ``[bos] pieces [eos] pad...`` with bos=2, eos=3, pad=0. open_clip's
    default ``pool_type='argmax'`` takes the position of the *largest id* (CLIP's BPE puts EOT
    last in its vocabulary); with SentencePiece ids that is an arbitrary piece, so it is wrong
    here. ``'last'`` takes position T-1, a padding slot for every caption shorter than T. We use
    ``pool_type='eos'`` with ``eos_id=3``: the first EOS of each row, i.e. the last real token,
    which under open_clip's causal text mask has attended to the whole caption -- the same
    token mmformer's ``text_pool='eos'`` pools.
    """
    head_width = c.width // c.heads
    return {
        "embed_dim": c.embed_dim,
        "vision_cfg": {"width": c.width, "layers": c.depth, "head_width": head_width,
                       "mlp_ratio": c.mlp_ratio, "patch_size": c.patch_size, "image_size": c.image_size},
        "text_cfg": {"context_length": c.context_length, "vocab_size": vocab_size, "width": c.width,
                     "heads": c.heads, "layers": c.depth, "mlp_ratio": c.mlp_ratio,
                     "pad_id": PAD_ID, "eos_id": EOS_ID, "pool_type": "eos"},
    }


def build_open_clip(c: ModelConfig, vocab_size: int) -> nn.Module:
    """A randomly initialised ``open_clip.model.CLIP`` (``pretrained=None``: nothing is fetched)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    kw = open_clip_config(c, vocab_size)
    model = CLIP(kw["embed_dim"], vision_cfg=CLIPVisionCfg(**kw["vision_cfg"]),
                 text_cfg=CLIPTextCfg(**kw["text_cfg"]))
    return model


def open_clip_parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay) by open_clip's own training rule: no decay on 1-D params (norms, biases,
    class embedding), ``ln``/``bn``/``bias`` names and ``logit_scale``; all matrices decay."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if exempt else decay).append(p)
    return decay, no_decay


class Pair:
    """One interface over an MMFormer (``impl='mmformer'``) and an open_clip CLIP (``'open_clip'``).

    ``pair(images, ids, mask) -> (image_emb, text_emb, logit_scale)``, unit-length embeddings;
    ``logit_scale`` = exp(s) clamped at ``max_scale`` for both (mmformer clamps in ``forward``;
    open_clip's training script clamps the parameter after each step to the same bound).
    """

    def __init__(self, impl: str, model: nn.Module, max_scale: float = 100.0) -> None:
        if impl not in ("mmformer", "open_clip"):
            raise ValueError(f"impl must be 'mmformer' or 'open_clip', got {impl!r}")
        self.impl, self.model, self.max_scale = impl, model, max_scale

    def __call__(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        if self.impl == "mmformer":
            out = self.model(images, ids, mask)
            return out["image_embeds"], out["text_embeds"], out["logit_scale"]
        img, txt, scale = self.model(images, ids)  # open_clip: normalised features, exp(logit_scale)
        return img, txt, scale.clamp(max=self.max_scale)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.impl == "mmformer":
            return self.model.encode_text(ids, mask, normalize=True)
        return self.model.encode_text(ids, normalize=True)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        if self.impl == "mmformer":
            from mmformer.training.optim import parameter_groups

            return parameter_groups(self.model)
        return open_clip_parameter_groups(self.model)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- FLOPs -------------------------------------------------------------------------------------
def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                       **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode has no formula for the CPU flash-attention kernels, so without these it counts
# attention as 0 FLOPs on CPU (the math fallback, when taken, is counted through its bmm's).
CPU_SDPA_FLOPS: dict[Any, Callable[..., int]] = {}
for _name, _fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu),
                   ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward)):
    if hasattr(torch.ops.aten, _name):
        CPU_SDPA_FLOPS[getattr(torch.ops.aten, _name)] = _fn  # keyed by overload packet


def count_train_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs (2 per multiply-add) of ``step()`` (forward returning a loss) plus its backward."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        step().backward()
    return counter.get_total_flops()


# ---- speed ---------------------------------------------------------------------------------------
def best_rate(fn, batch: int, repeats: int, min_seconds: float = 1.0) -> float:
    """batch / the fastest of at least ``repeats`` timed calls (more, up to 200, until
    ``min_seconds`` have passed: small batches get many tries on a shared machine)."""
    with torch.inference_mode():
        fn()  # warm-up (and compilation for compiled variants)
        best, n, start = float("inf"), 0, time.perf_counter()
        while n < repeats or (time.perf_counter() - start < min_seconds and n < 200):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
            n += 1
    return batch / best


# ---- exported models and held-out recall -------------------------------------------------------
class OnnxModel(nn.Module):
    """The graphs of an :func:`~mmformer.compress.onnx.export_onnx` folder run by onnxruntime,
    behind MMFormer's encoder calls: ``encode_image(images)`` and ``encode_text(ids, mask)`` give
    (B, E) unit float32 tensors, ``config`` and ``tokenizer`` are the exported ones. So the timing
    loops and :func:`mmformer.retrieval.evaluate_retrieval` take it as they take the model (a
    module without parameters: the embedding helpers then run it on the CPU).

    Args:
        folder: written by ``export_onnx``.
        int8: the onnxruntime int8 graphs (``image.int8.onnx``, ``text.int8.onnx``).
        threads: onnxruntime intra-op threads (0 = its default).
    """

    def __init__(self, folder: str | os.PathLike, int8: bool = False, threads: int = 0) -> None:
        super().__init__()
        self.encoder = OnnxEncoder(folder, int8=int8, threads=threads)
        self.config, self.tokenizer = self.encoder.config, self.encoder.tokenizer
        self.files = [Path(folder) / f for f in (INT8_GRAPHS if int8 else GRAPHS).values()]

    @staticmethod
    def _unit_only(normalize: bool) -> None:
        if not normalize:
            raise ValueError("the exported graphs return L2-normalised embeddings only (normalize=True)")

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self._unit_only(normalize)
        return torch.from_numpy(self.encoder.encode_image(images.numpy()))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    normalize: bool = True) -> torch.Tensor:
        self._unit_only(normalize)
        return torch.from_numpy(self.encoder.encode_text(input_ids.numpy(), attention_mask.numpy()))

    def file_bytes(self) -> int:
        """Bytes of the two graph files this model runs (each holds the shared trunk)."""
        return sum(f.stat().st_size for f in self.files)


def held_out_split(config: ModelConfig, data_dir: str | os.PathLike | None = None):
    """The bundled held-out drawing family (the emoji test split, never seen in training) at the
    model's image size and normalisation, one concept name per image."""
    from mmformer.data.emoji import InMemoryImageText

    return InMemoryImageText.eval_split("test", config.image_size, config.image_mean, config.image_std,
                                        root=data_dir)


def held_out_recall(model: nn.Module, data_dir: str | os.PathLike | None = None, split=None) -> dict[str, float]:
    """:func:`mmformer.retrieval.evaluate_retrieval` of ``model`` on the held-out family
    (``split``: an already loaded :func:`held_out_split` of the model's image settings)."""
    from mmformer.retrieval import evaluate_retrieval

    ds = split if split is not None else held_out_split(model.config, data_dir)
    return evaluate_retrieval(model.eval(), model.tokenizer, ds.stacked_images(), ds.captions, ds.caption_to_image)


# ---- report ------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_demo(demo_args: list[str], run_dir: Path) -> dict[str, Any]:
    """Run ``mmformer demo DEMO_ARGS --out RUN_DIR`` in a fresh process (the checkout's code) and
    return its ``results.json``; a failed run raises with the end of its stderr."""
    cmd = [sys.executable, "-m", "mmformer.cli", "demo", *demo_args, "--out", str(run_dir)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))


#: ``--cpu-settings`` choices: what ``mmformer fit`` / ``mmformer demo`` apply before training, or nothing
CPU_SETTINGS = ("training", "none")


def add_cpu_settings_argument(parser) -> None:
    """``--cpu-settings training|none`` on a bench's argparse ``parser`` (see :func:`apply_cpu_settings`)."""
    parser.add_argument("--cpu-settings", default="training", choices=CPU_SETTINGS,
                        help="training (default): the process settings mmformer fit and demo apply (malloc keeps "
                             "freed memory, denormals flushed), for every model timed; none: the defaults")


def apply_cpu_settings(which: str) -> str:
    """Apply the process-wide CPU settings ``which`` names and return a line saying what was applied:
    ``"training"`` = what the training commands apply before any torch work
    (:func:`mmformer.runtime.keep_freed_memory`: glibc keeps freed blocks for reuse instead of
    unmapping them, so a step's large activations are not fresh pages to fault in;
    :func:`~mmformer.runtime.flush_denormals`); ``"none"`` = the C library's and torch's defaults.
    The settings are process-wide: every implementation timed in the run gets the same."""
    if which not in CPU_SETTINGS:
        raise ValueError(f"cpu settings {which!r} must be one of {CPU_SETTINGS}")
    if which == "none":
        return "cpu settings: none (glibc malloc and denormals as the defaults leave them)"
    kept = keep_freed_memory()
    flush_denormals()
    return ("cpu settings: the training commands' (freed memory kept for reuse" + ("" if kept else
            ": not available, no glibc mallopt") + "; denormals flushed to zero), for every model timed")


def machine_line() -> str:
    return (f"machine: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
            f"python {sys.version.split()[0]}")


def fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, int]]) -> str:
    """``columns``: (header, row key, float digits)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k, ""), d) for _, k, d in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])

