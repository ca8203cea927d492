"""Safe image decoding and encoding for the service (torch-free; used by the API and the worker).

Decoding is deliberately narrow:

* The format is decided by magic bytes, never by file name or Content-Type, and only PNG, JPEG,
  WebP, BMP, TIFF and GIF (first frame) are accepted; Pillow is told to try only those plugins,
  so EPS (Ghostscript), SVG, HTML and the rest never reach a parser.
* Pillow's decompression-bomb guard stays on and is tightened to ``max_pixels``; anything larger
  than ``max_pixels`` is refused before its pixels are decoded (413).
* Truncated or corrupt files are errors, never half images (``LOAD_TRUNCATED_IMAGES`` stays off).
* EXIF orientation is applied (an unreadable EXIF block is ignored, the pixels still decode).
* Every mode becomes 8-bit RGB: alpha (RGBA, LA, PA, P with transparency) is **composited over
  white**, CMYK/YCbCr/LAB are converted by Pillow, 16-bit and 32-bit grey (I;16*, I) are scaled
  to 8 bits by their top byte, float (F) is taken as [0, 1] when its maximum is <= 1.
"""

from __future__ import annotations

import io
import math
import warnings
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from engines.config import PNG_COMPRESS_LEVEL
from service import png

# Pillow plugin names we let Image.open try; nothing else is ever parsed.
PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_QUALITY = {"png": None, "jpeg": 95, "webp": 90}
# zlib level of PNG outputs: the engine configuration's default (lossless at every level).
DEFAULT_PNG_COMPRESS_LEVEL = PNG_COMPRESS_LEVEL
# Smallest padded work side the networks accept: the latent (1/8 of the image) is halved three
# times in the UNet, and its GroupNorms fail on a 1 x 1 map (a 64 px side). Measured with the
# tiny reference model; full-size models have the same depth.
MIN_WORK_SIDE = 128

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Between 1x and 2x the limit Pillow only warns; we refuse those images ourselves (413).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """Base of decode errors; ``kind`` says which HTTP answer fits."""

    kind = "corrupt"


class UnsupportedImage(ImageError):
    kind = "unsupported"  # 415


class ImageTooLarge(ImageError):
    kind = "too_large"  # 413


class CorruptImage(ImageError):
    kind = "corrupt"  # 400


def sniff_format(data: bytes) -> str | None:
    """Pillow format name from the first bytes, or None when it is not one we accept."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    return None


def tighten_bomb_guard(max_pixels: int) -> None:
    """Pillow refuses (DecompressionBombError) above 2x this; we refuse above 1x ourselves."""
    Image.MAX_IMAGE_PIXELS = int(max_pixels)


@dataclass(frozen=True)
class Probe:
    """What the header says, before any pixel is decoded."""

    format: str
    width: int
    height: int


def probe_image(data: bytes, max_pixels: int) -> Probe:
    """Check format and size from the header only; raise UnsupportedImage / ImageTooLarge."""
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImage(
            f"not an accepted image ({len(data)} bytes); send PNG, JPEG, WebP, BMP, TIFF or GIF"
        )
    with _open(data, fmt, max_pixels) as im:
        return Probe(fmt, im.width, im.height)


# Uploads of at most this many pixels are decoded on the caller's event loop: about a millisecond of
# work (0.1 ms for 64 x 64 here), less than the hand-off to a thread and back costs on a busy machine.
INLINE_DECODE_PIXELS = 1 << 16


def pixels_to_decode(data: bytes, max_pixels: int) -> int:
    """How many pixels decoding ``data`` makes, by its header; 0 when the header already refuses it
    (decode_image raises the same error just as cheaply)."""
    try:
        probe = probe_image(data, max_pixels)
    except ImageError:
        return 0
    return probe.width * probe.height


def _open(data: bytes, fmt: str, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image header claims more than {max_pixels} pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as exc:
        raise CorruptImage(f"the {fmt} file cannot be read: {_short(exc)}") from exc
    if im.width < 1 or im.height < 1:
        im.close()
        raise CorruptImage(f"the {fmt} file has an empty size {im.width}x{im.height}")
    if im.width * im.height > max_pixels:
        im.close()
        raise ImageTooLarge(
            f"image is {im.width}x{im.height} = {im.width * im.height} pixels; the limit is {max_pixels}"
        )
    return im


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes of an accepted format -> uint8 array [H, W, 3] RGB with EXIF orientation applied.

    Raises UnsupportedImage (415), ImageTooLarge (413) or CorruptImage (400).
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImage(
            f"not an accepted image ({len(data)} bytes); send PNG, JPEG, WebP, BMP, TIFF or GIF"
        )
    with _open(data, fmt, max_pixels) as im:
        try:
            im.seek(0)  # GIF / multi-page TIFF: the first frame only
            im.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(str(exc)) from exc
        except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError,
                MemoryError) as exc:
            raise CorruptImage(f"the {fmt} file is truncated or corrupt: {_short(exc)}") from exc
        oriented = _apply_orientation(im)
        try:
            rgb = _to_rgb(oriented)
        except (OSError, ValueError) as exc:
            raise CorruptImage(f"the {fmt} image mode {im.mode} cannot be converted: {_short(exc)}") from exc
    if rgb.shape[0] * rgb.shape[1] > max_pixels:  # orientation cannot grow it, but be exact
        raise ImageTooLarge(f"image is {rgb.shape[1]}x{rgb.shape[0]} pixels; the limit is {max_pixels}")
    return rgb


def _apply_orientation(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose a decodable photo
        return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(im).astype(np.int64)
        top = 65535 if mode.startswith("I;16") or grey.max(initial=0) > 255 else 255
        grey8 = (np.clip(grey, 0, top) * 255 // top).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[..., None], 3, axis=2))
    if mode == "F":
        grey = np.asarray(im, dtype=np.float64)
        grey = np.nan_to_num(grey, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if grey.max(initial=0.0) <= 1.0 else 1.0
        grey8 = np.clip(np.round(grey * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[..., None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.ascontiguousarray(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def encode_image(rgb: np.ndarray, fmt: str, quality: int | None = None,
                 png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL) -> bytes:
    """uint8 [H, W, 3] RGB -> bytes of png | jpeg | webp (quality 1..100; PNG ignores it and is
    compressed at zlib level ``png_compress_level``, 0..9, by ``service.png`` on this thread)."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    pixels = np.ascontiguousarray(rgb, dtype=np.uint8)
    if fmt == "png":
        return png.encode_png(pixels, int(png_compress_level))
    image = Image.fromarray(pixels, mode="RGB") if rgb.ndim == 3 else Image.fromarray(pixels)
    buffer = io.BytesIO()
    q = quality if quality is not None else DEFAULT_QUALITY[fmt]
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=int(q), subsampling=0 if int(q) >= 90 else 2)
    else:
        image.save(buffer, format="WEBP", quality=int(q), method=4)
    return buffer.getvalue()


def submit_encode(pool: Executor, rgb: np.ndarray, fmt: str, quality: int | None = None,
                  png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL, png_bands: int = 1) -> Future[bytes]:
    """``encode_image`` on ``pool``; a PNG in up to ``png_bands`` bands compressed side by side (a lone
    answer can use every codec thread). Errors come back on the future. Awaiting the future from a
    thread of ``pool`` cannot deadlock: no task of it waits for another."""
    if fmt == "png":
        return png.submit_png(pool, np.ascontiguousarray(rgb, dtype=np.uint8), int(png_compress_level), png_bands)
    return pool.submit(encode_image, rgb, fmt, quality, png_compress_level)


def plan_sizes(height: int, width: int, upscale: float, min_side: int,
               multiple: int = 64) -> tuple[tuple[int, int], tuple[int, int]]:
    """((out_h, out_w), (padded_h, padded_w)): requested output size and padded work size, pixels.

    The same arithmetic as ``flowie.imageops.plan_resize`` (which imports torch, so the API
    cannot use it): output = ceil(size x upscale); short side enlarged to min_side (integer
    ceil for the long side); padded to a multiple of ``multiple``. The API enforces the pixel
    limits with it; the worker batches by the pipeline's own padded shape.
    """
    out_h = math.ceil(round(height * upscale, 6))
    out_w = math.ceil(round(width * upscale, 6))
    work_h, work_w = out_h, out_w
    if min_side > 0 and min(out_h, out_w) < min_side:
        if out_h <= out_w:
            work_h, work_w = min_side, -(-out_w * min_side // out_h)
        else:
            work_h, work_w = -(-out_h * min_side // out_w), min_side
    return (out_h, out_w), (-(-work_h // multiple) * multiple, -(-work_w // multiple) * multiple)
