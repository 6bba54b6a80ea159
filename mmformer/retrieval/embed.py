"""Embed images and captions with a model, and evaluate image-text retrieval.

Model contract (``mmformer.model.MMFormer`` and any stand-in):

- ``model.encode_image(images (B, 3, H, W) float, normalize=True) -> (B, E)``
- ``model.encode_text(input_ids (B, T) long, attention_mask (B, T) bool, normalize=True) -> (B, E)``

Tokenizer contract: ``ids, mask = tokenizer(list_of_str, max_length=T)``.

Embedding runs under ``torch.inference_mode()`` with the model in eval mode; every submodule's
train/eval flag is restored afterwards, exactly as it was. The returned tensors are ordinary
(not inference-mode) float32 tensors, so they can be used anywhere afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mmformer.model import eval_mode

from .metrics import retrieval_metrics

__all__ = ["embed_images", "embed_texts", "evaluate_retrieval", "pieces_dropped", "truncation_note"]

logger = logging.getLogger(__name__)

_IMAGE_KEYS = ("image", "images", "pixel_values")


def pieces_dropped(tokenizer, texts: Sequence[str], context_length: int) -> list[int]:
    """Per text, how many of its pieces a context of ``context_length`` tokens cuts off (0 when it
    fits): a text keeps ``context_length - 2`` pieces beside bos and eos, as ``Tokenizer.__call__``
    and the service's ``pieces_dropped`` count them. ``tokenizer`` has ``encode_batch(texts) -> ids``
    (pieces without the specials), as :class:`mmformer.tokenizer.Tokenizer` and CLIP's BPE do."""
    keep = context_length - 2
    return [max(0, len(p) - keep) for p in tokenizer.encode_batch(list(texts))]


def truncation_note(truncated: int, total: int, context_length: int, what: str = "texts") -> str | None:
    """The line a command prints when some inputs were cut to the model's context, e.g.
    ``"2 of 5 texts were truncated to 14 pieces (the model's context_length 16 less bos and eos)"``;
    None when none was."""
    if not truncated:
        return None
    return (
        f"{truncated} of {total} {what} {'was' if truncated == 1 else 'were'} truncated to {context_length - 2} "
        f"pieces (the model's context_length {context_length} less bos and eos)"
    )


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(iterable, progress: bool, total: int | None, desc: str):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


def _image_batch(item, index: int) -> Tensor:
    """The image tensor of one loader item: a tensor, the first element of a tuple/list, or a dict
    entry under 'image' / 'images' / 'pixel_values'."""
    if isinstance(item, Tensor):
        batch = item
    elif isinstance(item, Mapping):
        key = next((k for k in _IMAGE_KEYS if k in item), None)
        if key is None:
            raise ValueError(f"batch {index}: a dict batch needs one of the keys {_IMAGE_KEYS}, got {sorted(item)}")
        batch = item[key]
    elif isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        batch = item[0]
    else:
        raise TypeError(
            f"batch {index}: expected a (B, 3, H, W) tensor, a (tensor, ...) tuple/list or a dict "
            f"with key {_IMAGE_KEYS[0]!r}, got {type(item).__name__}"
        )
    if batch.dim() != 4:
        raise ValueError(f"batch {index}: images must have shape (B, 3, H, W), got {tuple(batch.shape)}")
    return batch


def _check_output(out: Tensor, n: int, what: str, index: int) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{what} of batch {index} must return a ({n}, E) tensor, got {shape}")
    return out


def _resolve_max_length(model: nn.Module, max_length: int | None) -> int:
    """``max_length`` or, when None, the model's ``config.context_length``."""
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "context_length", None)
        if max_length is None:
            raise ValueError("max_length is None and the model has no config.context_length; pass max_length")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    return max_length


def _finish(chunks: list[Tensor], output_device: torch.device | str | None) -> Tensor:
    # Outside inference mode, so the result is an ordinary tensor (usable with autograd later).
    out = torch.cat(chunks, dim=0).float()
    if output_device is not None:
        out = out.to(output_device)
    return out.clone() if out.is_inference() else out


def embed_images(
    model: nn.Module,
    images: Tensor | Iterable,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    *,
    output_device: torch.device | str | None = "cpu",
) -> Tensor:
    """Image embeddings ``(N, E)`` float32 from ``model.encode_image(x, normalize=True)``.

    Args:
        model: has ``encode_image``.
        images: a ``(N, 3, H, W)`` float tensor (split into ``batch_size`` batches), or an iterable /
            DataLoader of batches (its own batching is used, ``batch_size`` is ignored); an item is a
            ``(B, 3, H, W)`` tensor, a tuple/list whose first element is one, or a dict with key
            ``'image'``, ``'images'`` or ``'pixel_values'``.
        batch_size: batch size when ``images`` is a tensor.
        device: where the model runs; ``None`` means the device of the model's parameters.
            Batches are moved there; the model is not moved.
        autocast_dtype: e.g. ``torch.bfloat16`` to run under ``torch.autocast``; ``None``: no autocast.
        progress: show a tqdm bar.
        output_device: where the result goes (``None``: stay on ``device``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        batches: Iterable = images.split(batch_size)
        total: int | None = len(batches)
    else:
        batches = images
        total = len(images) if hasattr(images, "__len__") else None

    chunks: list[Tensor] = []
    with eval_mode(model), torch.inference_mode():
        for index, item in enumerate(_progress(batches, progress, total, "embedding images")):
            batch = _image_batch(item, index)
            if not batch.dtype.is_floating_point:
                raise TypeError(f"batch {index}: images must be float, got dtype {batch.dtype}")
            batch = batch.to(device, non_blocking=True)
            with _autocast(device, autocast_dtype):
                out = model.encode_image(batch, normalize=True)
            chunks.append(_check_output(out, batch.shape[0], "encode_image", index))
    if not chunks:
        raise ValueError("embed_images: no images (the input yielded no batches)")
    result = _finish(chunks, output_device)
    logger.debug("embedded %d images -> %s", result.shape[0], tuple(result.shape))
    return result


def embed_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 256,
    max_length: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    *,
    output_device: torch.device | str | None = "cpu",
) -> Tensor:
    """Text embeddings ``(N, E)`` float32 from ``model.encode_text(ids, mask, normalize=True)``.

    Args:
        model: has ``encode_text``.
        tokenizer: ``ids, mask = tokenizer(list_of_str, max_length=max_length)``; ids are cast to
            int64 and the mask to bool.
        texts: the captions, a sequence of str (a single str is rejected).
        batch_size: captions per batch.
        max_length: token length T passed to the tokenizer; ``None`` means the model's
            ``config.context_length`` (MMFormer rejects longer inputs).
        device, autocast_dtype, progress, output_device: as in :func:`embed_images`.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of str (e.g. a list), got {type(texts).__name__}")
    not_str = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if not_str:
        raise TypeError(f"texts must all be str; items {not_str[:20]} are not")
    if not texts:
        raise ValueError("embed_texts: no texts")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    max_length = _resolve_max_length(model, max_length)
    device = torch.device(device) if device is not None else _model_device(model)
    starts = range(0, len(texts), batch_size)

    chunks: list[Tensor] = []
    with eval_mode(model), torch.inference_mode():
        for index, start in enumerate(_progress(starts, progress, len(starts), "embedding texts")):
            batch = list(texts[start : start + batch_size])
            ids, mask = tokenizer(batch, max_length=max_length)
            ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
            if ids.dim() != 2 or ids.shape[0] != len(batch) or mask.shape != ids.shape:
                raise ValueError(
                    f"tokenizer output for batch {index} must be ids and mask of shape "
                    f"({len(batch)}, T), got {tuple(ids.shape)} and {tuple(mask.shape)}"
                )
            ids = ids.to(device=device, dtype=torch.long, non_blocking=True)
            mask = mask.to(device=device, dtype=torch.bool, non_blocking=True)
            with _autocast(device, autocast_dtype):
                out = model.encode_text(ids, mask, normalize=True)
            chunks.append(_check_output(out, len(batch), "encode_text", index))
    result = _finish(chunks, output_device)
    logger.debug("embedded %d texts -> %s", result.shape[0], tuple(result.shape))
    return result


def evaluate_retrieval(
    model: nn.Module,
    tokenizer,
    images: Tensor | Iterable,
    captions: Sequence[str],
    caption_to_image: Sequence[int] | Tensor,
    *,
    batch_size: int = 256,
    max_length: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 1024,
    progress: bool = False,
) -> dict[str, float]:
    """Embed ``images`` and ``captions`` and return :func:`retrieval_metrics` of them.

    ``caption_to_image[c]`` is the position of caption c's image in ``images`` (in the order the
    tensor or loader yields them). Embeddings stay on the model's device for the scoring, so a GPU
    model scores on the GPU. Returns the dict of :func:`retrieval_metrics` (recall in percent).
    """
    if len(captions) != len(caption_to_image):
        raise ValueError(
            f"captions and caption_to_image must have the same length, got {len(captions)} and {len(caption_to_image)}"
        )
    image_emb = embed_images(model, images, batch_size, device, autocast_dtype, progress, output_device=None)
    text_emb = embed_texts(
        model,
        tokenizer,
        captions,
        batch_size,
        max_length,
        device,
        autocast_dtype,
        progress,
        output_device=None,
    )
    metrics = retrieval_metrics(image_emb, text_emb, caption_to_image, ks, block_size=block_size)
    logger.info(
        "retrieval on %d images / %d captions: %s",
        metrics["n_images"],
        metrics["n_texts"],
        ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if "@" in k and "chance" not in k),
    )
    return metrics


def embed_documents(
    model,
    texts: Sequence[str],
    batch_size: int = 8,
    mode: str = "auto",
    progress: bool = False,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(len(texts), E) float32 unit-length document embeddings (``model.encode_document``),
    ``batch_size`` documents per encoder call, in eval mode under ``torch.inference_mode()``.
    ``names`` (one per text, default "document i", 1-based) name documents in chunk-cap errors."""
    names = list(names) if names is not None else [f"document {i + 1}" for i in range(len(texts))]
    collator = model.document_collator()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="embedding documents", unit="batch")
    out = []
    with eval_mode(model), torch.inference_mode():
        for s in starts:
            ids = model.tokenizer.encode_batch(list(texts[s : s + batch_size]))
            batch = collator.collate_ids(ids, names[s : s + batch_size])
            out.append(model.encode_document(batch, mode=mode).float().cpu())
    return torch.cat(out).clone()
