"""Helpers for the service tests: image bytes of every kind, free ports, process handling."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

# Small and cheap on the tiny model: 128 px of padded work size, restore_only or one step.
FAST = {"min_side": "128"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gradient(width: int, height: int) -> np.ndarray:
    """A smooth uint8 [H, W, 3] test picture (deterministic)."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(1, width - 1)).astype(np.uint8)
    g = (y * 255 // max(1, height - 1)).astype(np.uint8)
    b = ((x + y) * 255 // max(1, width + height - 2)).astype(np.uint8)
    return np.stack([r, g, b], axis=2)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png(width: int = 96, height: int = 80) -> bytes:
    return encode(Image.fromarray(gradient(width, height)), "PNG")


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG that does not compress (about 3 bytes per pixel)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def jpeg(width: int = 96, height: int = 80, **kwargs) -> bytes:
    return encode(Image.fromarray(gradient(width, height)), "JPEG", quality=90, **kwargs)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWIE_")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
                # The tiny bfr model serves the aligned path here, as in-process (test_faces_http: whole photos).
                "FLOWIE_FACE_MODE": "aligned"})
    env.update(extra)
    return env


def flowie(args: list[str], log_path: Path, **env: str) -> subprocess.Popen:
    """Start `flowie ARGS` (as `python -m service.cli`) with its logs in ``log_path``."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed when the process is reaped
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=subprocess_env(**env),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None, status: int = 200) -> None:
    """Wait until GET url answers ``status`` (raise with the reason after ``timeout``)."""
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} while waiting for {url}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == status:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not {status} after {timeout} s: {last}")


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def hostile_images() -> dict[str, bytes]:
    """Inputs a public endpoint meets, by name (expected answers are in the tests)."""
    picture = Image.fromarray(gradient(96, 64))
    rgba = picture.convert("RGBA")
    rgba.putalpha(Image.fromarray((gradient(96, 64)[..., 0] // 2).astype(np.uint8)))
    palette = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    frames = [Image.fromarray(gradient(80, 72)), Image.fromarray(255 - gradient(80, 72))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    whole = png(96, 64)
    return {
        "zero_bytes": b"",
        "garbage": bytes(range(256)) * 8,
        "truncated_png": whole[: len(whole) // 2],
        "truncated_jpeg": jpeg(96, 64)[:600],
        "bomb_40000x40000": png_claiming(40000, 40000),
        "bomb_between_1x_and_2x_limit": png_claiming(5000, 5000),
        "huge_single_dimension": encode(Image.new("RGB", (30000, 1), (10, 20, 30)), "PNG"),
        "svg_disguised_as_png": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" '
                                b'height="10"><rect width="10" height="10"/></svg>',
        "html_disguised_as_png": b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n",
        "cmyk_jpeg": encode(picture.convert("CMYK"), "JPEG", quality=90),
        "grey_16bit_png": encode(Image.fromarray(gradient(96, 64)[..., 0].astype(np.uint16) * 257), "PNG"),
        "palette_png": encode(palette, "PNG", transparency=0),
        "rgba_png": encode(rgba, "PNG"),
        "exif_rotated_jpeg": encode(picture, "JPEG", quality=90, exif=exif.tobytes()),
        "animated_gif": gif.getvalue(),
        "one_pixel": encode(Image.new("RGB", (1, 1), (200, 100, 50)), "PNG"),
        "bmp": encode(picture, "BMP"),
        "tiff": encode(picture, "TIFF"),
        "webp": encode(picture, "WEBP", quality=90),
    }
