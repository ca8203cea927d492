"""PNG answers, written here instead of by Pillow, so that one image can use several threads.

A PNG holds its pixels as one zlib stream of filtered rows. This writer cuts the rows into
horizontal bands and compresses each band on its own:

- Every row gets PNG's "Up" filter: each byte minus the byte above it, modulo 256. A band reads
  the row above its first row straight from the image, so no band waits for another.
- Each band is a raw deflate stream. All but the last end with a full flush, so they stop on a
  byte boundary without the final-block bit. Raw deflate streams joined that way form one valid
  deflate stream: the same trick as pigz.
- zlib's Adler-32 checksum of the whole stream is combined from the bands' checksums with a little
  arithmetic (``adler32_combine``).

The bands are independent, so a lone answer can be split across the worker's codec threads
(``zlib`` releases the GIL while it compresses). Even on one thread this is faster than Pillow at
the same zlib level: Pillow tries every filter on every row, and Up alone costs only a subtraction.
At zlib level 1, photos came out 0.4-4 % larger than Pillow's file, and 8 % at level 6 (docs/PERF.md,
"PNG answers in bands"). The pixels are the same: PNG is lossless.

Only 8-bit grey, RGB and RGBA, without interlacing: what the service answers with.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import NamedTuple

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA
UP_FILTER = 2
# Each band costs a compressor of its own and a flush: bands shorter than this would be mostly that.
MIN_BAND_ROWS = 32
ADLER_BASE = 65521  # the largest prime below 2**16


class Band(NamedTuple):
    """One band's raw deflate bytes, the Adler-32 of its filtered rows, and their length."""

    deflated: bytes
    adler: int
    length: int


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of X + Y from adler32(X), adler32(Y) and len(Y).

    Adler-32 keeps A = 1 + the sum of the bytes and B = the sum of A after each byte, modulo
    ADLER_BASE. Y's own checksum started from A = 1. Started from X's A instead, each of Y's
    bytes adds A_x - 1 more to A, so A = A_x + A_y - 1. B gains A_x - 1 for each of Y's
    len(Y) steps, so B = B_x + B_y + len(Y) * (A_x - 1).
    """
    a_first, b_first = first & 0xFFFF, first >> 16
    a_second, b_second = second & 0xFFFF, second >> 16
    a = (a_first + a_second - 1) % ADLER_BASE
    b = (b_first + b_second + second_length * (a_first - 1)) % ADLER_BASE
    return (b << 16) | a


def band_bounds(height: int, bands: int) -> list[tuple[int, int]]:
    """(top, bottom) rows of up to ``bands`` bands of at least MIN_BAND_ROWS rows (one band at least)."""
    count = max(1, min(bands, height // MIN_BAND_ROWS))
    edges = [height * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _pixels(image: np.ndarray) -> np.ndarray:
    """``image`` as uint8 [H, W, C] with C in COLOUR_TYPES; ValueError otherwise."""
    if image.dtype != np.uint8:
        raise ValueError(f"PNG answers are 8-bit: got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in COLOUR_TYPES or min(image.shape[:2]) < 1:
        raise ValueError(f"PNG answers are [H, W] grey or [H, W, 3 | 4]: got shape {image.shape}")
    return image


def deflate_band(image: np.ndarray, top: int, bottom: int, level: int, last: bool) -> Band:
    """Rows top..bottom of ``image`` (uint8 [H, W, C]) Up-filtered and deflated (raw deflate).

    The last band finishes the deflate stream; the others end with a full flush.
    """
    rows = image[top:bottom].reshape(bottom - top, -1)
    above = image[top - 1:bottom - 1].reshape(bottom - top, -1) if top > 0 else None
    filtered = np.empty((bottom - top, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = UP_FILTER
    if above is None:  # the image's first row: the row above it is all zeros
        filtered[0, 1:] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256
    else:
        np.subtract(rows, above, out=filtered[:, 1:])
    data = filtered.data  # the filtered rows as a buffer, without a copy
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: no zlib header or checksum
    deflated = compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)
    return Band(deflated, zlib.adler32(data), filtered.size)


def assemble(width: int, height: int, channels: int, level: int, bands: list[Band]) -> bytes:
    """The PNG file: signature, IHDR, one IDAT holding the zlib stream of the bands, IEND."""
    adler = bands[0].adler
    for band in bands[1:]:
        adler = adler32_combine(adler, band.adler, band.length)
    # zlib header: deflate with a 32 KiB window; the level hint (FLEVEL) and the check bits.
    flevel = 0 if level <= 1 else 1 if level <= 5 else 2 if level == 6 else 3
    cmf, flg = 0x78, flevel << 6
    flg |= 31 - ((cmf << 8) | flg) % 31
    stream = bytes((cmf, flg)) + b"".join(band.deflated for band in bands) + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_TYPES[channels], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def encode_png(image: np.ndarray, level: int = 1, bands: int = 1) -> bytes:
    """PNG bytes of ``image`` (uint8 [H, W] or [H, W, 3 | 4]) at zlib ``level``, its bands compressed
    one after another on this thread."""
    image = _pixels(image)
    height, width, channels = image.shape
    spans = band_bounds(height, bands)
    parts = [deflate_band(image, top, bottom, level, i == len(spans) - 1) for i, (top, bottom) in enumerate(spans)]
    return assemble(width, height, channels, level, parts)


def submit_png(pool: Executor, image: np.ndarray, level: int = 1, bands: int = 1) -> Future[bytes]:
    """Encode ``image`` on ``pool``, each band a task of its own; the future holds the PNG bytes.

    No task waits for another: the last band to finish assembles the file. So the future can be
    awaited from a thread of ``pool`` itself without a deadlock.
    """
    result: Future[bytes] = Future()
    try:
        image = _pixels(image)
    except ValueError as exc:
        result.set_exception(exc)
        return result
    height, width, channels = image.shape
    spans = band_bounds(height, bands)
    parts: list[Band | None] = [None] * len(spans)
    left, lock = [len(spans)], threading.Lock()

    def on_done(index: int) -> Callable[[Future[Band]], None]:
        def done(band: Future[Band]) -> None:
            error = band.exception()
            with lock:
                if result.done():
                    return
                if error is not None:
                    result.set_exception(error)
                    return
                parts[index] = band.result()
                left[0] -= 1
                if left[0]:
                    return
            try:
                result.set_result(assemble(width, height, channels, level, parts))  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - the caller sees it on the future
                result.set_exception(exc)
        return done

    for index, (top, bottom) in enumerate(spans):
        task = pool.submit(deflate_band, image, top, bottom, level, index == len(spans) - 1)
        task.add_done_callback(on_done(index))
    return result
