"""Safe decoding: allow-listed formats by magic bytes, bomb guard at our limit, every mode -> RGB."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from svc_helpers import decode, encode, gradient, hostile_images, png_claiming

from service.imaging import (
    CorruptImage,
    ImageTooLarge,
    UnsupportedImage,
    decode_image,
    encode_image,
    plan_sizes,
    sniff_format,
)

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # we refuse those images ourselves

LIMIT = 4096 * 4096


def test_only_allow_listed_magic_bytes_are_decoded():
    images = hostile_images()
    for name in ("zero_bytes", "garbage", "svg_disguised_as_png", "html_disguised_as_png", "eps"):
        assert sniff_format(images[name]) is None
        with pytest.raises(UnsupportedImage):
            decode_image(images[name], LIMIT)
    for name, fmt in (("rgba_png", "PNG"), ("cmyk_jpeg", "JPEG"), ("bmp", "BMP"), ("tiff", "TIFF"),
                      ("webp", "WEBP"), ("animated_gif", "GIF")):
        assert sniff_format(images[name]) == fmt


def test_truncated_files_are_errors_not_half_images():
    images = hostile_images()
    for name in ("truncated_png", "truncated_jpeg"):
        with pytest.raises(CorruptImage):
            decode_image(images[name], LIMIT)


def test_bomb_guard_refuses_before_decoding_pixels():
    with pytest.raises(ImageTooLarge):
        decode_image(png_claiming(40000, 40000), LIMIT)  # Pillow's own guard (> 2x the limit)
    with pytest.raises(ImageTooLarge):
        decode_image(png_claiming(5000, 5000), LIMIT)  # between 1x and 2x: our check
    with pytest.raises(ImageTooLarge):
        decode_image(encode(Image.new("RGB", (20, 20)), "PNG"), 399)


@pytest.mark.parametrize("name", ["cmyk_jpeg", "grey_16bit_png", "palette_png", "rgba_png", "bmp", "tiff",
                                  "webp", "animated_gif", "one_pixel"])
def test_every_mode_becomes_uint8_rgb(name):
    rgb = decode_image(hostile_images()[name], LIMIT)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous


def test_alpha_is_composited_over_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half, opaque on the right
    rgba[:, 2:, 3] = 255
    rgb = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMIT)
    assert (rgb[:, :2] == 255).all()
    assert (rgb[:, 2:] == [255, 0, 0]).all()


def test_16_bit_grey_is_scaled_not_clipped():
    grey = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    rgb = decode_image(encode(Image.fromarray(grey), "PNG"), LIMIT)
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied():
    rgb = decode_image(hostile_images()["exif_rotated_jpeg"], LIMIT)
    assert rgb.shape[:2] == (96, 64)  # stored 96 wide x 64 high, displayed rotated


def test_gif_gives_its_first_frame():
    rgb = decode_image(hostile_images()["animated_gif"], LIMIT).astype(int)
    first = gradient(80, 72).astype(int)
    assert np.abs(rgb - first).mean() < np.abs(rgb - (255 - first)).mean()


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encode_formats_round_trip(fmt, pil):
    picture = gradient(40, 30)
    data = encode_image(picture, fmt, 90)
    image = decode(data)
    assert image.format == pil and image.size == (40, 30)
    if fmt == "png":
        assert np.array_equal(np.asarray(image), picture)


def zlib_level(png_bytes: bytes) -> int:
    """The FLEVEL of a PNG's first IDAT stream (zlib writes 0 for levels 0-1, 1 for 2-5, 2 for 6, 3 for 7-9)."""
    at = png_bytes.index(b"IDAT") + 4
    return png_bytes[at + 1] >> 6


def test_png_answers_are_lossless_at_every_compression_level_and_fast_by_default():
    rng = np.random.default_rng(3)
    picture = (gradient(64, 48).astype(int) + rng.integers(0, 8, (48, 64, 3))).clip(0, 255).astype(np.uint8)
    default, level6, level9 = (encode_image(picture, "png"), encode_image(picture, "png", png_compress_level=6),
                               encode_image(picture, "png", png_compress_level=9))
    assert [zlib_level(d) for d in (default, level6, level9)] == [0, 2, 3]  # the default is level 1
    for data in (default, level6, level9):
        assert np.array_equal(np.asarray(decode(data)), picture)
    assert len(level9) <= len(level6) < len(default)


def test_plan_sizes_matches_the_pipeline_plan():
    pytest.importorskip("torch")
    from flowie.imageops import plan_resize

    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        upscale = float(rng.choice([1.0, 1.1, 1.5, 2.0, 3.3, 4.0, 8.0]))
        min_side = int(rng.choice([0, 128, 512, 777]))
        plan = plan_resize(h, w, upscale, min_side)
        assert plan_sizes(h, w, upscale, min_side) == (plan.output_hw, plan.padded_hw)
