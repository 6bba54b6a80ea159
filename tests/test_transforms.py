"""mmformer.data.transforms: robust image loading (modes, EXIF, bad files) and the v2 pipelines."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmformer.data.errors import CorruptSample
from mmformer.data.transforms import DEFAULT_MAX_PIXELS, build_transforms, load_image


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose IHDR declares ``width x height`` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


# -- modes --------------------------------------------------------------------------------------


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent -> white
    img.putpixel((1, 0), (200, 0, 0, 255))  # opaque -> unchanged
    img.putpixel((2, 0), (0, 0, 0, 128))  # half black -> 255 * (1 - 128/255) = 127
    out = pixels(load_image(png_bytes(img)))
    assert out[0].tolist() == [[255, 255, 255], [200, 0, 0], [127, 127, 127]]


def test_la_composited_on_white():
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (40, 255))
    assert pixels(load_image(png_bytes(img)))[0].tolist() == [[255, 255, 255], [40, 40, 40]]


def test_palette_with_transparency_composited_on_white():
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0  # palette entry 0 (red) is transparent
    data = png_bytes(img)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert pixels(load_image(data))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_grey_l_to_rgb():
    img = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L")
    assert pixels(load_image(png_bytes(img)))[0].tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]


def test_cmyk_jpeg_to_rgb():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=100)
    out = pixels(load_image(buf.getvalue()))
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_16bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = png_bytes(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = pixels(load_image(data))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_32bit_int_and_float_grey():
    as_int = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), mode="I")
    assert pixels(load_image(_tiff_bytes(as_int)))[0, :, 0].tolist() == [0, 128, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert pixels(load_image(_tiff_bytes(as_float)))[0, :, 0].tolist() == [0, 128, 255]


def _tiff_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


def test_exif_orientation_6_rotates_clockwise():
    img = Image.new("RGB", (32, 16), (255, 0, 0))  # stored: top half red, bottom half blue
    img.paste((0, 0, 255), (0, 8, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    out = load_image(buf.getvalue())
    assert out.size == (16, 32)  # width and height swapped
    arr = pixels(out).astype(int)
    assert arr[16, 12, 0] > 200 and arr[16, 12, 2] < 50  # right half: the stored top (red)
    assert arr[16, 3, 2] > 200 and arr[16, 3, 0] < 50  # left half: the stored bottom (blue)


# -- bad files ----------------------------------------------------------------------------------


def test_truncated_png_raises_corrupt_sample_naming_file(tmp_path: Path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptSample) as info:
        load_image(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: cannot decode image")
    assert "truncated" in info.value.reason


def test_random_bytes_raise_corrupt_sample(tmp_path: Path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptSample, match="noise.png: cannot decode image: UnidentifiedImageError"):
        load_image(path)


def test_missing_file_raises_corrupt_sample(tmp_path: Path):
    with pytest.raises(CorruptSample, match="gone.png: file not found"):
        load_image(tmp_path / "gone.png")


def test_header_bomb_beyond_pil_limit_is_refused():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(CorruptSample, match="bomb.png: image too large") as info:
        load_image(png_claiming_size(100_000, 100_000), name="bomb.png")
    assert "decompression bomb" in info.value.reason
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's global limit untouched


def test_header_over_our_limit_but_under_pils_is_refused():
    with pytest.raises(CorruptSample) as info:
        load_image(png_claiming_size(9000, 9000), name="big.png")
    assert info.value.reason == (
        f"image too large: 9000x9000 = 81000000 pixels exceeds "
        f"max_pixels={DEFAULT_MAX_PIXELS} (possible decompression bomb)"
    )


def test_tiny_max_pixels_and_none():
    data = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    with pytest.raises(CorruptSample, match="4096 pixels exceeds max_pixels=4095"):
        load_image(data, max_pixels=4095)
    assert load_image(data, max_pixels=4096).size == (64, 64)
    assert load_image(data, max_pixels=None).getpixel((0, 0)) == (1, 2, 3)


def test_file_object_source_named_in_errors(tmp_path: Path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"not an image at all")
    with open(path, "rb") as f, pytest.raises(CorruptSample) as info:
        load_image(f)
    assert info.value.path == str(path)


# -- pipelines ----------------------------------------------------------------------------------


def test_eval_pipeline_exact_values_and_shape():
    img = Image.new("RGB", (40, 20), (255, 0, 51))
    out = build_transforms(16, train=False)(img)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert type(out) is torch.Tensor  # not a tv_tensors.Image subclass
    expected = torch.tensor([1.0, -1.0, 51 / 255 / 0.5 - 1.0]).view(3, 1, 1).expand(3, 16, 16)
    torch.testing.assert_close(out, expected)


def test_eval_pipeline_custom_mean_std():
    out = build_transforms(8, train=False, mean=(0.25, 0.5, 0.75), std=(0.5, 0.25, 0.25))(
        Image.new("RGB", (8, 8), (255, 255, 255))
    )
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.5, 2.0, 1.0]))


def test_pipeline_accepts_uint8_tensor_like_pil():
    arr = np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    t = build_transforms(12, train=False)
    from_pil = t(Image.fromarray(arr))
    from_tensor = t(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
    torch.testing.assert_close(from_pil, from_tensor)


def test_train_pipeline_keeps_hue():
    torch.manual_seed(0)
    t = build_transforms(16, train=True)
    for _ in range(10):
        out = t(Image.new("RGB", (32, 32), (255, 0, 0)))
        assert out.shape == (3, 16, 16)
        torch.testing.assert_close(out[1], out[2])  # G == B: no hue/saturation change
        assert (out[0] > out[1] + 1.0).all()  # still red


def _half_black_half_white() -> Image.Image:
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 32))
    return img


def test_train_pipeline_no_flip_by_default_and_flip_flag():
    torch.manual_seed(0)
    kw = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "brightness": 0.0, "contrast": 0.0}
    img = _half_black_half_white()

    def flipped(out: torch.Tensor) -> bool:  # left column white -> the image was mirrored
        return bool(out[0, 0, 0] > out[0, 0, -1])

    plain = build_transforms(32, train=True, **kw)
    assert not any(flipped(plain(img)) for _ in range(20))
    flip = build_transforms(32, train=True, hflip=True, **kw)
    n_flipped = sum(flipped(flip(img)) for _ in range(40))
    assert 5 <= n_flipped <= 35


def test_train_pipeline_random_crop_varies():
    torch.manual_seed(0)
    t = build_transforms(16, train=True, brightness=0.0, contrast=0.0)
    arr = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    outs = [t(Image.fromarray(arr)) for _ in range(4)]
    assert not torch.equal(outs[0], outs[1])


def test_batch_train_transform_crops_and_normalises_like_the_per_image_pipeline():
    import torch

    from mmformer.data.transforms import BatchTrainTransform

    torch.manual_seed(0)
    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    images[:, 0] = 255  # pure red
    out = BatchTrainTransform(scale=(0.5, 1.0), brightness=0, contrast=0)(images)
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    # normalised with mean = std = 0.5: red channel 1.0, others -1.0, whatever the crop
    torch.testing.assert_close(out[:, 0], torch.ones(8, 16, 16))
    torch.testing.assert_close(out[:, 1:], -torch.ones(8, 2, 16, 16))
    # a left/right split image: crops move the edge, so samples differ but stay within range
    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    images[..., 8:] = 255
    out = BatchTrainTransform(scale=(0.3, 0.6))(images)
    assert out.min() >= -1 and out.max() <= 1
    assert len({tuple(o[0, 8].tolist()) for o in out}) > 1
    with pytest.raises(TypeError, match="uint8 batch"):
        BatchTrainTransform()(images.float())


def test_crop_grid_is_affine_grid_for_axis_aligned_crops():
    import torch
    import torch.nn.functional as F

    from mmformer.data.transforms import crop_grid

    g = torch.Generator().manual_seed(0)
    b, h, w = 6, 12, 20  # not square: rows and columns must not be swapped
    sx = torch.rand(b, generator=g) * torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)  # flips too
    sy, tx, ty = torch.rand(b, generator=g), torch.rand(b, generator=g) - 0.5, torch.rand(b, generator=g) - 0.5
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    expect = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
    torch.testing.assert_close(crop_grid(sx, tx, sy, ty, h, w), expect, rtol=0, atol=3e-7)


# ---- drawing-style augmentations (posterize, blur, greyscale, saturation) --------------------------


def test_batch_style_ops_equal_torchvision_per_image():
    from torchvision.transforms.v2 import functional as TF

    from mmformer.data.transforms import gaussian_blur_batch, grayscale_batch, posterize_batch

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=g)
    x = u8.float() / 255
    for bits in (1, 3, 8):
        torch.testing.assert_close(posterize_batch(x, bits), TF.posterize(u8, bits).float() / 255, atol=1e-6, rtol=0)
    sigma = torch.tensor([0.2, 0.5, 1.0, 2.0])
    blurred = gaussian_blur_batch(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(blurred[i], TF.gaussian_blur(x[i], [5, 5], [s, s]), atol=1e-6, rtol=0)
    torch.testing.assert_close(grayscale_batch(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def _batch_train_transform_reference(t, images):
    """BatchTrainTransform as one op per step (before brightness, contrast and the normalisation
    were folded into one pass): the same random draws, in the same order."""
    import math

    import torch.nn.functional as F

    from mmformer.data.transforms import _chosen, crop_grid, gaussian_blur_batch, grayscale_batch, posterize_batch

    b = images.shape[0]
    x = images.float().div_(255)
    area = torch.empty(b).uniform_(*t.scale)
    r = torch.exp(torch.empty(b).uniform_(math.log(t.ratio[0]), math.log(t.ratio[1])))
    w, h = torch.sqrt(area * r).clamp(max=1.0), torch.sqrt(area / r).clamp(max=1.0)
    cx, cy = (1 - w) * torch.empty(b).uniform_(-1, 1), (1 - h) * torch.empty(b).uniform_(-1, 1)
    flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if t.hflip else torch.ones(b)
    x = F.grid_sample(
        x,
        crop_grid(w * flip, cx, h, cy, x.shape[-2], x.shape[-1]),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    if t.posterize > 0:
        x = torch.where(_chosen(b, t.posterize), posterize_batch(x, t.posterize_bits), x)
    if t.blur > 0:
        on, sigma = _chosen(b, t.blur), torch.empty(b).uniform_(*t.blur_sigma)
        x = torch.where(on, gaussian_blur_batch(x, sigma), x)
    if t.brightness > 0:
        x.mul_(torch.empty(b, 1, 1, 1).uniform_(1 - t.brightness, 1 + t.brightness))
    if t.contrast > 0:
        grey = x.mean(dim=(1, 2, 3), keepdim=True)
        x.sub_(grey).mul_(torch.empty(b, 1, 1, 1).uniform_(1 - t.contrast, 1 + t.contrast)).add_(grey)
    if t.saturation > 0:
        luma = grayscale_batch(x.clamp_(0, 1))
        x.sub_(luma).mul_(torch.empty(b, 1, 1, 1).uniform_(1 - t.saturation, 1 + t.saturation)).add_(luma)
    if t.grayscale > 0:
        x = torch.where(_chosen(b, t.grayscale), grayscale_batch(x.clamp_(0, 1)).expand_as(x), x)
    return x.clamp_(0, 1).sub_(t.mean).div_(t.std)


@pytest.mark.parametrize(
    "augment",
    [
        {},  # the defaults: crop, brightness, contrast
        {"hflip": True, "brightness": 0.4, "contrast": 0.4, "saturation": 0.5},
        {"posterize": 0.5, "blur": 0.5, "grayscale": 0.5, "saturation": 0.2},
        {"brightness": 0, "contrast": 0},
    ],
)
def test_batch_train_transform_equals_one_op_per_step(augment):
    from mmformer.data.transforms import BatchTrainTransform

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    images[:4] = 255  # saturated images: brightness > 1 must be clamped, not wrapped
    t = BatchTrainTransform(mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), **augment)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        want = _batch_train_transform_reference(t, images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        got = t(images)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_batch_train_transform_style_augmentations():
    from mmformer.data.transforms import BatchTrainTransform

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
    still = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "brightness": 0, "contrast": 0}
    # posterize always: every value on the 3-bit grid k * 32 / 255 (before normalisation)
    out = BatchTrainTransform(**still, posterize=1.0, posterize_bits=3)(images)
    levels = (out * 0.5 + 0.5) * 255 / 32
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    # greyscale always: the three channels are equal
    out = BatchTrainTransform(**still, grayscale=1.0)(images)
    torch.testing.assert_close(out[:, 0], out[:, 1]) and torch.testing.assert_close(out[:, 1], out[:, 2])
    # blur always: a checkerboard loses contrast, the mean stays
    board = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 255).to(torch.uint8).expand(4, 3, 16, 16)
    out = BatchTrainTransform(**still, blur=1.0, blur_sigma=(0.8, 1.0))(board.contiguous())
    assert out.std() < 0.5 * (board.float() / 127.5 - 1).std()
    # saturation: grey pixels stay grey, coloured ones change
    grey = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    torch.testing.assert_close(
        BatchTrainTransform(**still, saturation=0.5)(grey), (grey.float() / 255 - 0.5) / 0.5, atol=1e-4, rtol=0
    )  # the luma weights sum to 0.9999
    # each probability chooses samples independently: about half of them greyscale at p = 0.5
    out = BatchTrainTransform(**still, grayscale=0.5)(images.repeat(4, 1, 1, 1))
    n_grey = sum(bool(torch.equal(o[0], o[1]) and torch.equal(o[1], o[2])) for o in out)
    assert 16 <= n_grey <= 48


def test_per_image_pipeline_style_augmentations():
    torch.manual_seed(0)
    arr = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    still = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "brightness": 0.0, "contrast": 0.0}
    out = build_transforms(16, train=True, grayscale=1.0, **still)(Image.fromarray(arr))
    torch.testing.assert_close(out[0], out[1]) and torch.testing.assert_close(out[1], out[2])
    out = build_transforms(16, train=True, posterize=1.0, posterize_bits=2, **still)(Image.fromarray(arr))
    levels = (out * 0.5 + 0.5) * 255 / 64
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)


def test_augment_args_are_checked_with_useful_errors():
    from mmformer.data.transforms import AUGMENT_DEFAULTS, BatchTrainTransform, augment_args
    from mmformer.training.datamodule import ImageTextDataModule

    assert augment_args(None) == {**AUGMENT_DEFAULTS}
    assert augment_args({"blur": 0.3, "scale": [0.5, 1]})["scale"] == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"ImageTextDataModule augment_args: unknown key\(s\) \['blurr'\]; expected"):
        ImageTextDataModule(augment_args={"blurr": 0.5})
    with pytest.raises(ValueError, match="'grayscale' is a probability in \\[0, 1\\], got 1.5"):
        BatchTrainTransform(grayscale=1.5)
    with pytest.raises(ValueError, match="'scale' is a range"):
        build_transforms(16, train=True, scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="'posterize_bits' is an integer 1..8"):
        augment_args({"posterize_bits": 0})
    with pytest.raises(ValueError, match="'saturation' is a jitter strength"):
        augment_args({"saturation": -0.1})
    assert ImageTextDataModule(hflip=True, augment_args={"blur": 0.2}).augment_settings["hflip"] is True
