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
- :data:`PRECISIONS`: the benches' precision names for :func:`mmformer.training.precision.train_step`,
  the one training step every bench runs (timed by :func:`mmformer.training.precision.time_steps`).
- :func:`machine_line`, :func:`markdown_table`: the report's last lines.
- :func:`add_csv_argument`, :func:`write_csv`: ``--csv PATH``, the rows with the run's date, commit,
  CPU, load and torch version, written atomically (for ``docs/benchmarks/*.csv``).
- :func:`module_command`: ``python -m bench...`` for a bench's own worker subprocess.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mmformer.compress.onnx import GRAPHS, INT8_GRAPHS, OnnxEncoder
from mmformer.config import ModelConfig
from mmformer.files import write_text_atomic
from mmformer.runtime import flush_denormals, keep_freed_memory
from mmformer.tokenizer import EOS_ID, PAD_ID, Tokenizer, default_tokenizer_path

REPO = Path(__file__).resolve().parents[1]
#: the 1-minute load average when the bench started (imported this module)
LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

#: the benches' precision names (and the library's own) -> the library's, as
#: :func:`mmformer.training.precision.train_step` takes them
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed", "32-true": "32-true", "bf16-mixed": "bf16-mixed"}


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
        "vision_cfg": {
            "width": c.width,
            "layers": c.depth,
            "head_width": head_width,
            "mlp_ratio": c.mlp_ratio,
            "patch_size": c.patch_size,
            "image_size": c.image_size,
        },
        "text_cfg": {
            "context_length": c.context_length,
            "vocab_size": vocab_size,
            "width": c.width,
            "heads": c.heads,
            "layers": c.depth,
            "mlp_ratio": c.mlp_ratio,
            "pad_id": PAD_ID,
            "eos_id": EOS_ID,
            "pool_type": "eos",
        },
    }


def build_open_clip(c: ModelConfig, vocab_size: int) -> nn.Module:
    """A randomly initialised ``open_clip.model.CLIP`` (``pretrained=None``: nothing is fetched)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    kw = open_clip_config(c, vocab_size)
    model = CLIP(kw["embed_dim"], vision_cfg=CLIPVisionCfg(**kw["vision_cfg"]), text_cfg=CLIPTextCfg(**kw["text_cfg"]))
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


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode has no formula for the CPU flash-attention kernels, so without these it counts
# attention as 0 FLOPs on CPU (the math fallback, when taken, is counted through its bmm's).
CPU_SDPA_FLOPS: dict[Any, Callable[..., int]] = {}
for _name, _fn in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward),
):
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

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        self._unit_only(normalize)
        return torch.from_numpy(self.encoder.encode_text(input_ids.numpy(), attention_mask.numpy()))

    def file_bytes(self) -> int:
        """Bytes of the two graph files this model runs (each holds the shared trunk)."""
        return sum(f.stat().st_size for f in self.files)


def held_out_split(config: ModelConfig, data_dir: str | os.PathLike | None = None):
    """The bundled held-out drawing family (the emoji test split, never seen in training) at the
    model's image size and normalisation, one concept name per image."""
    from mmformer.data.emoji import InMemoryImageText

    return InMemoryImageText.eval_split("test", config.image_size, config.image_mean, config.image_std, root=data_dir)


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
    run_dir = Path(run_dir).resolve()
    cmd = module_command("mmformer.cli", "demo", *demo_args, "--out", str(run_dir))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env())
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))


#: ``--cpu-settings`` choices: what ``mmformer fit`` / ``mmformer demo`` apply before training, or nothing
CPU_SETTINGS = ("training", "none")


def add_cpu_settings_argument(parser) -> None:
    """``--cpu-settings training|none`` on a bench's argparse ``parser`` (see :func:`apply_cpu_settings`)."""
    parser.add_argument(
        "--cpu-settings",
        default="training",
        choices=CPU_SETTINGS,
        help="training (default): the process settings mmformer fit and demo apply (malloc keeps "
        "freed memory, denormals flushed), for every model timed; none: the defaults",
    )


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
    return (
        "cpu settings: the training commands' (freed memory kept for reuse"
        + ("" if kept else ": not available, no glibc mallopt")
        + "; denormals flushed to zero), for every model timed"
    )


def machine_line() -> str:
    return (
        f"machine: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"python {sys.version.split()[0]}"
    )


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


# ---- CSV rows for docs/benchmarks ----------------------------------------------------------------
#: /proc/cpuinfo flags that decide which kernels the benches' numbers come from
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
#: the columns every CSV row starts with
CONTEXT_COLUMNS = (
    "date",
    "commit",
    "cpu_model",
    "cpu_flags",
    "logical_cpus",
    "load_start",
    "load_end",
    "torch",
    "torch_threads",
)


def cpu_flags() -> str:
    """The :data:`CPU_FLAGS` this CPU has, space-separated ("none" when it has none of them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return " ".join(f for f in CPU_FLAGS if f in flags) or "none"


def git_commit() -> str:
    """The checkout's commit (12 hex digits, ``-dirty`` with uncommitted changes to tracked files), or
    "unknown" outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def run_context() -> dict[str, Any]:
    """The :data:`CONTEXT_COLUMNS` of this run: UTC date and time, commit, CPU model and flags, the
    1-minute load average at the start and now, torch version and threads."""
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "load_start": round(LOAD_AT_START, 2),
        "load_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def add_csv_argument(parser) -> None:
    """``--csv PATH`` on a bench's argparse ``parser`` (see :func:`write_csv`)."""
    parser.add_argument(
        "--csv",
        default=None,
        metavar="PATH",
        help="also write the table's rows as CSV here, each with the date, commit, CPU model "
        "and flags, load and torch version (written atomically)",
    )


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return v


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` to ``path`` as CSV, atomically (a temp file beside it, then a rename): the
    :data:`CONTEXT_COLUMNS` of this run, then every key of the rows in first-seen order (a row
    without a key leaves its cell empty); floats with 6 significant digits, lists and dicts as JSON."""
    context = run_context()
    keys = list(CONTEXT_COLUMNS) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in context]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(v) for k, v in {**context, **r}.items()})
    path = Path(path)
    write_text_atomic(path, buf.getvalue())
    return path


def module_command(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter: how a bench starts its own worker process
    (run it with :func:`subprocess_env`, so ``bench`` is importable from any working directory)."""
    return [sys.executable, "-m", module, *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for :func:`module_command`: this one, the checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
