"""Image loading and torchvision.transforms.v2 pipelines for train / eval.

``load_image`` turns a file into a plain 8-bit RGB ``PIL.Image`` (or raises
:class:`~mmformer.data.errors.CorruptSample`); ``build_transforms`` turns that image (or a
uint8 ``(3, H, W)`` tensor) into a normalised float tensor ``(3, S, S)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import random
import struct
import warnings
import zlib
from collections.abc import Sequence
from typing import IO, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import v2

from mmformer.data.errors import CorruptSample

__all__ = [
    "AUGMENT_DEFAULTS",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT",
    "BatchNormalize",
    "BatchTrainTransform",
    "CapAspect",
    "ImageSource",
    "SampleKey",
    "augment_args",
    "build_transforms",
    "gaussian_blur_batch",
    "grayscale_batch",
    "posterize_batch",
    "load_image",
    "load_and_transform",
    "sample_random",
    "sample_rng",
    "sample_seed",
    "to_rgb",
]

#: Largest image (width * height) ``load_image`` accepts by default: 8192 x 8192.
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Longest side / shortest side kept before resizing; longer images are centre-cropped to it.
MAX_ASPECT = 4.0
_CHUNK = 1 << 20  # pixels converted at a time from high-depth modes (bounded temporaries)

ImageSource = Union[str, "os.PathLike[str]", bytes, IO[bytes]]

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# What PIL and its plugins raise on broken files (SyntaxError and struct.error come from
# some header parsers, zlib.error from PNG chunks, EOFError from truncated streams).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the augmentation of sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SampleKey(int):
    """A dataset index (an ``int``) that carries the seed of its sample's augmentation, so that
    augmentation depends on (run seed, epoch, sample index) only: not on the global RNG, the
    DataLoader worker or how far a resumed run got (see :class:`mmformer.data.sampler.ResumableSampler`)."""

    seed: int

    def __new__(cls, index: int, seed: int) -> SampleKey:
        key = int.__new__(cls, index)
        key.seed = int(seed)
        return key

    def __reduce__(self):
        return (SampleKey, (int(self), self.seed))


def sample_random(key: int):
    """The Python-level RNG of one sample: a ``random.Random`` seeded from ``key.seed`` (a
    :class:`SampleKey`), or the ``random`` module for a plain ``int``. Touches no torch RNG (for
    samples whose only randomness is a Python-level choice; :func:`sample_rng` yields the same)."""
    seed = getattr(key, "seed", None)
    return random if seed is None else random.Random(seed)


@contextlib.contextmanager
def sample_rng(key: int):
    """Inside: the torch RNG seeded from ``key.seed`` (a :class:`SampleKey`; restored after), and
    :func:`sample_random` (a ``random.Random`` of the same seed) is yielded for Python-level
    choices. A plain ``int`` leaves the global RNGs in use (yields the ``random`` module)."""
    seed = getattr(key, "seed", None)
    if seed is None:
        yield sample_random(key)
        return
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also queue seeding every accelerator
        # backend (CUDA, XPU, MTIA: a formatted stack trace each when none is initialised, a cost
        # per sample) and leave those seeds changed after the block
        torch.default_generator.manual_seed(seed)
        yield sample_random(key)


def _source_name(src: ImageSource, name: str | None) -> str:
    """Name used in error messages: ``name``, the path, or the file object's name."""
    if name is not None:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return str(getattr(src, "name", "<bytes>" if isinstance(src, bytes) else "<file object>"))


def load_image(
    src: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode an image file into an 8-bit RGB ``PIL.Image``, robustly.

    - refuses images with more than ``max_pixels`` pixels (read from the header, before any
      decoding); ``None`` disables our limit (PIL's own ``Image.MAX_IMAGE_PIXELS`` error still
      applies; PIL's warning is silenced because we decide). PIL's global state is not touched.
    - forces decoding (``img.load()``), so truncated files fail here, not in a worker later
      (unless the caller set ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` globally);
    - applies the EXIF orientation (``ImageOps.exif_transpose``);
    - converts every mode to RGB with :func:`to_rgb` (alpha composited onto white,
      16-bit scaled to 8-bit).

    Args:
        src: a path, the encoded bytes, or a binary file object.
        max_pixels: largest accepted ``width * height``.
        name: what to call the source in error messages (default: its path or name).

    Raises:
        CorruptSample: naming the file and the reason, for any unreadable/oversized image.
    """
    label = _source_name(src, name)
    fp = io.BytesIO(src) if isinstance(src, bytes) else src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
        with img:
            _check_pixels(img.size, max_pixels, label)
            img.load()
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except CorruptSample:
        raise
    except FileNotFoundError as err:
        raise CorruptSample(label, f"file not found ({err.strerror})") from err
    except Image.DecompressionBombError as err:
        raise CorruptSample(label, f"image too large, refused as a decompression bomb: {err}") from err
    except _DECODE_ERRORS as err:
        raise CorruptSample(label, f"cannot decode image: {type(err).__name__}: {err}") from err


def load_and_transform(
    src: ImageSource, transform, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> torch.Tensor:
    """``transform(load_image(src))`` where ANY failure of this one input (decoding, an oversized
    or odd image, a transform error, even a ``MemoryError`` or an allocation ``RuntimeError``)
    is a :class:`CorruptSample` naming it, so callers skip and list it instead of stopping."""
    label = _source_name(src, name)
    image = load_image(src, max_pixels=max_pixels, name=name)
    try:
        return transform(image)
    except CorruptSample:
        raise
    except Exception as err:  # noqa: BLE001 - one bad input must never stop a whole run
        raise CorruptSample(
            label,
            f"cannot transform image {image.size[0]}x{image.size[1]}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
        ) from err


def _check_pixels(size: tuple[int, int], max_pixels: int | None, label: str) -> None:
    """Raise ``CorruptSample`` if ``size`` (w, h) has more than ``max_pixels`` pixels."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise CorruptSample(
            label,
            f"image too large: {w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} (possible decompression bomb)",
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency (RGBA, LA, PA, premultiplied modes, or a ``transparency`` entry for P/L/RGB/1)
    is alpha-composited onto white. 16-bit and 32-bit grey (``I;16*``, ``I``, ``F``) is scaled to
    8 bits (65535 -> 255) rather than clipped, see :func:`_high_depth_to_uint8`. Everything else
    (L, 1, CMYK, YCbCr, LAB, HSV) uses PIL's conversion.
    """
    if img.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_high_depth_to_uint8(np.asarray(img), img.mode), mode="L").convert("RGB")
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16/32-bit or float grey array ``(H, W)`` to uint8, rounding to nearest.

    ``I;16*``: 0..65535 -> 0..255 (divide by 257). ``I`` (32-bit int): treated as 16-bit range
    when any value exceeds 255 (what 16-bit PNG/TIFF decoders produce), else as 8-bit.
    ``F``: treated as 0..1 when the maximum is <= 1, as 0..255 when <= 255, else as 16-bit.
    Values outside the assumed range are clipped.

    Works on chunks of ``_CHUNK`` pixels, so the temporaries stay a few MB whatever the image
    size (the output is the only full-size allocation).
    """
    flat = arr.reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint8)
    top = 0.0
    for s in range(0, flat.size, _CHUNK):
        top = max(top, float(np.nan_to_num(flat[s : s + _CHUNK].astype(np.float64), nan=0.0).max()))
    divide = mode.startswith("I;16") or top > 255.0
    for s in range(0, flat.size, _CHUNK):
        a = np.nan_to_num(flat[s : s + _CHUNK].astype(np.float64), nan=0.0)
        if divide:
            a /= 257.0
        elif mode == "F" and top <= 1.0:
            a *= 255.0
        out[s : s + _CHUNK] = np.clip(np.rint(a), 0, 255)
    return out.reshape(arr.shape)


class CapAspect(torch.nn.Module):
    """Centre-crop an image (PIL, tensor or ``tv_tensors.Image`` ``(..., H, W)``) whose long side
    exceeds ``max_aspect`` times its short side, so that a following resize of the short side
    cannot blow up (a 1 x 1,000,000 image resized to 64 would be 64 x 64,000,000).

    Eval keeps only the central square after its resize, which lies inside this crop, so eval
    outputs of ordinary images are unchanged (checked in tests/test_hardening.py).
    """

    def __init__(self, max_aspect: float = MAX_ASPECT) -> None:
        super().__init__()
        if max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
        self.max_aspect = max_aspect

    def forward(self, img):
        h, w = v2.functional.get_size(img)
        ch = min(h, max(1, math.floor(w * self.max_aspect)))
        cw = min(w, max(1, math.floor(h * self.max_aspect)))
        if (ch, cw) == (h, w):
            return img
        return v2.functional.center_crop(img, [ch, cw])


#: The training augmentation's settings and their defaults, shared by :func:`build_transforms` (per
#: image, PIL) and :class:`BatchTrainTransform` (per uint8 batch); :func:`augment_args` checks a
#: partial dict of them (a data module's ``augment_args``). Geometry: ``scale``/``ratio`` of the
#: random resized crop, ``hflip``. Colour: ``brightness``/``contrast``/``saturation`` jitter
#: strengths (a factor uniform in [1 - s, 1 + s]; never hue: colour identifies emoji). Drawing
#: style (off by default): ``posterize`` = probability of keeping ``posterize_bits`` bits per
#: channel (flattens shading into bands), ``blur`` = probability of a 5-tap Gaussian blur with
#: sigma uniform in ``blur_sigma`` pixels (less detail), ``grayscale`` = probability of ITU-R 601
#: luma (shape without colour).
AUGMENT_DEFAULTS: dict[str, object] = {
    "scale": (0.6, 1.0),
    "ratio": (0.85, 1.18),
    "hflip": False,
    "brightness": 0.1,
    "contrast": 0.1,
    "saturation": 0.0,
    "posterize": 0.0,
    "posterize_bits": 3,
    "blur": 0.0,
    "blur_sigma": (0.2, 1.0),
    "grayscale": 0.0,
}
_PROBABILITIES = ("posterize", "blur", "grayscale")
_STRENGTHS = ("brightness", "contrast", "saturation")
_BLUR_TAPS = 5


def augment_args(args: dict | None = None, source: str = "augment_args") -> dict:
    """``args`` (a partial dict of :data:`AUGMENT_DEFAULTS` keys) over the defaults, checked:
    unknown keys, probabilities outside [0, 1], negative strengths and bad ranges raise a
    ``ValueError`` that names ``source``, the key and what was expected."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(AUGMENT_DEFAULTS)}")
    out = {**AUGMENT_DEFAULTS, **args}
    for k in _PROBABILITIES:
        if not isinstance(out[k], (int, float)) or not 0 <= out[k] <= 1:
            raise ValueError(f"{source}: {k!r} is a probability in [0, 1], got {out[k]!r}")
    for k in _STRENGTHS:
        if not isinstance(out[k], (int, float)) or not 0 <= out[k] < 1:
            raise ValueError(f"{source}: {k!r} is a jitter strength in [0, 1), got {out[k]!r}")
    for k, lo in (("scale", 0.0), ("ratio", 0.0), ("blur_sigma", 0.0)):
        v = out[k]
        if not (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(isinstance(e, (int, float)) for e in v)
            and lo < v[0] <= v[1]
        ):
            raise ValueError(f"{source}: {k!r} is a range [low, high] with 0 < low <= high, got {v!r}")
        out[k] = (float(v[0]), float(v[1]))
    if out["scale"][1] > 1:
        raise ValueError(f"{source}: 'scale' is a fraction of the image area, at most 1; got {out['scale']!r}")
    if out["posterize_bits"] not in range(1, 9):
        raise ValueError(f"{source}: 'posterize_bits' is an integer 1..8, got {out['posterize_bits']!r}")
    if not isinstance(out["hflip"], bool):
        raise ValueError(f"{source}: 'hflip' is true or false, got {out['hflip']!r}")
    return out


def build_transforms(
    image_size: int,
    train: bool,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    **augment,
) -> v2.Compose:
    """Image pipeline: ``PIL.Image`` (RGB) or uint8 tensor ``(3, H, W)`` -> float ``(3, S, S)``.

    Train: RandomResizedCrop(scale, ratio, antialias), optional horizontal flip (off by default:
    emoji and text in images are not mirror-symmetric), then with their probabilities posterize,
    Gaussian blur, a mild brightness/contrast(/saturation) jitter (never hue: colour identifies
    emoji; 0 disables) and greyscale; then normalise. ``augment``: keys of
    :data:`AUGMENT_DEFAULTS` (checked by :func:`augment_args`).
    Eval: Resize (shorter side to S, antialias) + CenterCrop(S), then normalise.
    Both first centre-crop images more elongated than ``MAX_ASPECT`` : 1 (:class:`CapAspect`), so
    the memory of one input is bounded by its pixel count, never by its shape.
    The output is ``(x / 255 - mean) / std``.
    """
    a = augment_args(augment, "build_transforms")
    steps: list[v2.Transform] = [v2.ToImage(), CapAspect()]  # PIL or tensor -> tv_tensors.Image uint8 (3, H, W)
    if train:
        steps.append(v2.RandomResizedCrop(image_size, scale=a["scale"], ratio=a["ratio"], antialias=True))
        if a["hflip"]:
            steps.append(v2.RandomHorizontalFlip())
        if a["posterize"] > 0:
            steps.append(v2.RandomPosterize(a["posterize_bits"], p=a["posterize"]))
    else:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))  # uint8 -> float in [0, 1]
    if train:
        if a["blur"] > 0:
            steps.append(v2.RandomApply([v2.GaussianBlur(_BLUR_TAPS, sigma=a["blur_sigma"])], p=a["blur"]))
        if any(a[k] > 0 for k in _STRENGTHS):
            # on float: adjust_contrast on uint8 is far slower with few intra-op threads
            steps.append(v2.ColorJitter(**{k: a[k] or None for k in _STRENGTHS}))
        if a["grayscale"] > 0:
            steps.append(v2.RandomGrayscale(p=a["grayscale"]))
    steps += [v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]  # plain torch.Tensor out
    return v2.Compose(steps)


def posterize_batch(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Float images in [0, 1] with only the top ``bits`` bits of each 8-bit value kept
    (torchvision's ``posterize`` on ``round(255 x)``), as floats in [0, 1]."""
    step = 2 ** (8 - bits)
    return torch.floor(torch.round(x * 255) / step) * (step / 255)


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, taps: int = _BLUR_TAPS) -> torch.Tensor:
    """(B, C, H, W) float blurred by a ``taps``-tap Gaussian of standard deviation ``sigma[b]``
    pixels per sample (separable, reflect padding: torchvision's ``gaussian_blur`` per image)."""
    b, c, h, w = x.shape
    r = taps // 2
    d = torch.linspace(-r, r, taps, dtype=x.dtype)
    k = torch.exp(-0.5 * (d[None, :] / sigma.to(x.dtype)[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, taps)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)  # along W
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)  # along H
    return y.reshape(b, c, h, w)


def grayscale_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) ITU-R 601 luma (torchvision's ``rgb_to_grayscale``)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


class BatchTrainTransform:
    """Train augmentation for a whole uint8 batch at once: (B, 3, S, S) uint8 -> (B, 3, S, S) float.

    The same augmentation family as ``build_transforms(train=True)`` (random resized crop with
    ``scale``/``ratio``, optional horizontal flip, posterize, blur, mild brightness/contrast/
    saturation, greyscale, normalise; ``augment``: keys of :data:`AUGMENT_DEFAULTS`), but done
    with one ``grid_sample`` call for the batch (grid from :func:`crop_grid`): per-sample torchvision
    transforms cost about half a model step for the tiny preset on a 2-core CPU. With the style
    augmentations off (the defaults) it draws no random numbers for them.
    """

    def __init__(
        self, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5), **augment
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        a = augment_args(augment, "BatchTrainTransform")
        self.scale, self.ratio, self.hflip = a["scale"], a["ratio"], a["hflip"]
        self.brightness, self.contrast, self.saturation = a["brightness"], a["contrast"], a["saturation"]
        self.posterize, self.posterize_bits = a["posterize"], a["posterize_bits"]
        self.blur, self.blur_sigma, self.grayscale = a["blur"], a["blur_sigma"], a["grayscale"]

    def __call__(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """``seed``: draw this batch's augmentation from a generator seeded with it (exact resume);
        None: from the global torch RNG.

        ``/ 255``, brightness and contrast are linear per sample, so they are folded into one
        ``x * gain + offset`` after the crop (also linear): with the default augmentation the batch
        is read and written 6 times instead of 9 (the same values within float rounding, tested)."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"expected a uint8 batch (B, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # CPU only (see sample_rng)
                return self(images)
        b = images.shape[0]
        x = images.float()  # (B, 3, S, S) in [0, 255]: the crop is linear, so / 255 can come later
        area = torch.empty(b).uniform_(*self.scale)
        log_r = torch.empty(b).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        r = torch.exp(log_r)
        w = torch.sqrt(area * r).clamp(max=1.0)  # crop width / height as fractions of the image
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = (1 - w) * torch.empty(b).uniform_(-1, 1)  # crop centre in [-1, 1] grid units
        cy = (1 - h) * torch.empty(b).uniform_(-1, 1)
        flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(b)
        grid = crop_grid(w * flip, cx, h, cy, x.shape[-2], x.shape[-1])
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        gain, offset = torch.full((b, 1, 1, 1), 1 / 255), torch.zeros(b, 1, 1, 1)  # [0, 1] units: x * gain + offset
        if self.posterize > 0 or self.blur > 0:  # these work on [0, 1] values
            x, gain = x.mul_(1 / 255), torch.ones(b, 1, 1, 1)
        if self.posterize > 0:
            x = torch.where(_chosen(b, self.posterize), posterize_batch(x, self.posterize_bits), x)
        if self.blur > 0:
            on, sigma = _chosen(b, self.blur), torch.empty(b).uniform_(*self.blur_sigma)
            x = torch.where(on, gaussian_blur_batch(x, sigma), x)
        if self.brightness > 0:
            gain = gain * torch.empty(b, 1, 1, 1).uniform_(1 - self.brightness, 1 + self.brightness)
        if self.contrast > 0:  # blend with the brightened image's mean grey level
            grey = x.mean(dim=(1, 2, 3), keepdim=True) * gain + offset
            c = torch.empty(b, 1, 1, 1).uniform_(1 - self.contrast, 1 + self.contrast)
            gain, offset = gain * c, (offset - grey) * c + grey
        x.mul_(gain).add_(offset)  # in [0, 1] units from here (not clamped yet: clamped where a step needs it)
        if self.saturation > 0:  # blend with each pixel's luma: s * x + (1 - s) * luma
            luma = grayscale_batch(x.clamp_(0, 1))
            x.lerp_(luma, 1 - torch.empty(b, 1, 1, 1).uniform_(1 - self.saturation, 1 + self.saturation))
        if self.grayscale > 0:
            x = torch.where(_chosen(b, self.grayscale), grayscale_batch(x.clamp_(0, 1)).expand_as(x), x)
        return x.clamp_(0, 1).sub_(self.mean).div_(self.std)


def crop_grid(
    sx: torch.Tensor, tx: torch.Tensor, sy: torch.Tensor, ty: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The (B, H, W, 2) sampling grid of ``F.affine_grid(theta, (B, C, H, W), align_corners=False)``
    for the axis-aligned ``theta = [[sx, 0, tx], [0, sy, ty]]`` (per-sample (B,) scales and shifts,
    no rotation), built from two (B, W) and (B, H) rows instead of a batched matmul over every pixel,
    equal to ``affine_grid`` within one float32 rounding (tested)."""
    xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1
    grid = torch.empty(sx.shape[0], height, width, 2)
    grid[..., 0] = (sx[:, None] * xs + tx[:, None])[:, None, :]
    grid[..., 1] = (sy[:, None] * ys + ty[:, None])[:, :, None]
    return grid


def _chosen(b: int, p: float) -> torch.Tensor:
    """(B, 1, 1, 1) bool: each sample independently True with probability ``p``."""
    return (torch.rand(b) < p).view(b, 1, 1, 1)


class BatchNormalize:
    """The un-augmented counterpart of :class:`BatchTrainTransform` for a whole uint8 batch:
    (B, 3, S, S) uint8 -> (B, 3, S, S) float, ``(x / 255 - mean) / std``; the same pixels as
    ``build_transforms(S, train=False)`` on images already S x S. Deterministic: ``seed`` (passed
    by the collator like to :class:`BatchTrainTransform`) is accepted and ignored."""

    def __init__(self, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"expected a uint8 batch (B, 3, S, S), got {images.dtype} {tuple(images.shape)}")
        return (images.float() / 255 - self.mean) / self.std
