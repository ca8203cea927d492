#!/usr/bin/env python3
"""How long a worker takes to encode a batch of answers, by format, zlib level and codec threads.

The worker encodes every answer after its batch computes, on the path of every request; on a GPU
this CPU work can rival the compute itself. This times the worker's own call
(``service.imaging.submit_encode`` on a pool of codec threads, each PNG in the bands the worker
gives it: the threads shared out among the batch's answers) on a 512 x 512 photo (scikit-image's
astronaut, resized: a stand-in for a restored face) for a batch of answers, and Pillow's PNG
encoder (the simple alternative to the banded encoder) the same way (one task per answer). It prints
the median of the repeats, ms per batch and per image, and bytes per image.

    python loadtests/encode_bench.py [--batch 4] [--threads 1,2] [--levels 6,1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.imaging import submit_encode  # noqa: E402


def photo(size: int) -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BICUBIC))


def pillow_png(image: np.ndarray, level: int) -> bytes:
    """Pillow's one-thread PNG encoder, the baseline the banded encoder is compared with."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def time_batch(images: list[np.ndarray], fmt: str, level: int, threads: int, repeats: int) -> tuple[float, int]:
    """(median seconds to encode the batch, bytes of one answer). ``fmt`` "pillow" is Pillow's PNG."""
    bands = max(1, threads // len(images))  # as the worker shares its codec threads out

    def submit(pool: ThreadPoolExecutor, image: np.ndarray):
        if fmt == "pillow":
            return pool.submit(pillow_png, image, level)
        return submit_encode(pool, image, fmt, None, level, bands)

    times = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            encoded = [answer.result() for answer in [submit(pool, image) for image in images]]
            times.append(time.perf_counter() - start)
    return statistics.median(times), len(encoded[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", default="1,2", help="comma list of codec thread counts")
    parser.add_argument("--levels", default="6,1", help="comma list of PNG zlib levels")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    images = [photo(args.size)] * args.batch
    print(f"{args.batch} answers of {args.size}x{args.size}, median of {args.repeats}")
    print(f"{'format':15s} {'threads':>7s} {'ms/batch':>9s} {'ms/img':>7s} {'KiB/img':>8s}")
    levels = [int(level) for level in args.levels.split(",")]
    cases = [(fmt, level) for level in levels for fmt in ("png", "pillow")] + [("jpeg", 0), ("webp", 0)]
    for fmt, level in cases:
        for threads in (int(t) for t in args.threads.split(",")):
            seconds, size = time_batch(images, fmt, level, threads, args.repeats)
            name = f"{fmt} level {level}" if fmt in ("png", "pillow") else fmt
            print(f"{name:15s} {threads:7d} {seconds * 1000:9.1f} {seconds * 1000 / args.batch:7.1f} {size / 1024:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
