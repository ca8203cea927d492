"""service.png: PNG answers compressed in bands, side by side. Decoded by Pillow and by zlib
(which check every chunk's CRC and the stream's Adler-32), never by the writer itself."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from service import png


def photo_like(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: runs of similar bytes, as in a photo, and some that are not."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (np.sin(x / 9.0)[..., None] * 60 + np.cos(y / 13.0)[..., None] * 60 + 128
            + np.arange(channels) * 20)
    return np.clip(base + rng.normal(0, 6, (height, width, channels)), 0, 255).astype(np.uint8)


def decoded(data: bytes) -> np.ndarray:
    # The service's decoder tightens Pillow's global bomb guard to its own pixel limit (other tests);
    # these are our own files.
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    found, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        found.append((kind, body))
        at += 12 + length
    return found


@pytest.mark.parametrize(("height", "width", "bands"), [
    (1, 1, 1), (1, 7, 4), (31, 5, 3), (64, 64, 2), (97, 41, 3), (256, 200, 8), (300, 129, 64)])
def test_the_pixels_come_back_exactly_at_any_size_and_band_count(height, width, bands):
    image = photo_like(height, width, seed=height + width)
    data = png.encode_png(image, level=1, bands=bands)
    assert np.array_equal(decoded(data), image)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_grey_rgb_and_rgba(channels):
    image = photo_like(70, 33, channels)
    data = png.encode_png(image[..., 0] if channels == 1 else image, level=6, bands=2)
    expected = image[..., 0] if channels == 1 else image
    assert np.array_equal(decoded(data), expected)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]


def test_the_bands_make_one_zlib_stream_of_up_filtered_rows():
    image = photo_like(128, 50)
    data = png.encode_png(image, level=1, bands=4)
    kinds = [kind for kind, _ in chunks(data)]
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    idat = dict(chunks(data))[b"IDAT"]
    assert (idat[0] * 256 + idat[1]) % 31 == 0 and idat[0] == 0x78  # a zlib header: deflate, 32 KiB window
    raw = zlib.decompress(idat)  # raises if the joined bands were not one stream or the Adler-32 were wrong
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(128, 1 + 50 * 3)
    assert (rows[:, 0] == 2).all()  # the Up filter on every row
    pixels = image.reshape(128, -1).astype(np.int16)
    above = np.vstack([np.zeros((1, pixels.shape[1]), np.int16), pixels[:-1]])
    assert np.array_equal(rows[:, 1:], ((pixels - above) % 256).astype(np.uint8))  # the first row of each band too


def test_bands_are_at_least_min_band_rows_and_cover_every_row_once():
    assert png.band_bounds(100, 8) == [(0, 33), (33, 66), (66, 100)]  # 100 // 32 = 3 bands at most
    assert png.band_bounds(10, 4) == [(0, 10)]
    assert png.band_bounds(512, 8) == [(i * 64, (i + 1) * 64) for i in range(8)]
    assert png.band_bounds(512, 0) == [(0, 512)]


@pytest.mark.parametrize("split", [0, 1, 100, 65521, 70000, 200000])
def test_adler32_combine_matches_zlib_on_the_joined_bytes(split):
    data = np.random.default_rng(split).integers(0, 256, 200001, dtype=np.uint8).tobytes()
    first, second = data[:split], data[split:]
    combined = png.adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
    assert combined == zlib.adler32(data)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_every_zlib_level_decodes_and_says_its_level(level):
    image = photo_like(96, 96)
    data = png.encode_png(image, level=level, bands=3)
    assert np.array_equal(decoded(data), image)
    idat = dict(chunks(data))[b"IDAT"]
    assert idat[1] >> 6 == {0: 0, 1: 0, 6: 2, 9: 3}[level]  # FLEVEL, as zlib writes it


def test_bands_on_a_pool_give_the_bytes_of_bands_one_after_another():
    image = photo_like(512, 512)
    with ThreadPoolExecutor(max_workers=3) as pool:
        data = png.submit_png(pool, image, level=1, bands=8).result(timeout=60)
    assert data == png.encode_png(image, level=1, bands=8)
    assert np.array_equal(decoded(data), image)


def test_awaiting_the_answer_on_the_pool_s_only_thread_does_not_deadlock():
    """The worker's codec threads may wait for a PNG whose bands are queued on those same threads:
    no band task waits for another, the last one to finish assembles the file."""
    image = photo_like(256, 64)
    with ThreadPoolExecutor(max_workers=1) as pool:
        outer = pool.submit(lambda: png.submit_png(pool, image, 1, 8))
        inner = outer.result(timeout=60)  # submitted from the pool's one thread
        assert np.array_equal(decoded(inner.result(timeout=60)), image)


def test_a_failing_band_fails_the_answer_and_nothing_else(monkeypatch):
    calls = []
    real = png.deflate_band

    def broken(image, top, bottom, level, last):
        calls.append(threading.current_thread().name)
        if top > 0:
            raise MemoryError("no room for this band")
        return real(image, top, bottom, level, last)

    monkeypatch.setattr(png, "deflate_band", broken)
    with ThreadPoolExecutor(max_workers=2) as pool:
        answer = png.submit_png(pool, photo_like(128, 16), 1, 4)
        with pytest.raises(MemoryError, match="no room"):
            answer.result(timeout=60)
        assert pool.submit(lambda: 1).result(timeout=60) == 1  # the pool still works
    assert len(calls) == 4


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((4, 4, 3), np.float32), "8-bit"),
    (np.zeros((4, 4, 2), np.uint8), "grey or"),
    (np.zeros((0, 4, 3), np.uint8), "grey or"),
    (np.zeros((2, 4, 4, 3), np.uint8), "grey or"),
])
def test_what_is_not_an_8_bit_image_is_refused(image, message):
    with pytest.raises(ValueError, match=message):
        png.encode_png(image)
    with ThreadPoolExecutor(max_workers=1) as pool, pytest.raises(ValueError, match=message):
        png.submit_png(pool, image).result(timeout=60)
