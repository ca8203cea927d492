#!/usr/bin/env python3
"""How long a worker takes to encode a batch of answers, by format, zlib level and codec threads.

The worker encodes every answer after its batch computes, on the path of every request; on a GPU
this CPU work can rival the compute itself. This times ``service.imaging.encode_image`` on a
512 x 512 photo (scikit-image's astronaut, resized: a stand-in for a restored face) for a batch of
answers, one thread after another and on a thread pool as the worker runs it, and prints the
median of the repeats, ms per batch and per image, and bytes per image.

    python loadtests/encode_bench.py [--batch 4] [--threads 1,2] [--levels 6,1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.imaging import encode_image  # noqa: E402


def photo(size: int) -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BICUBIC))


def time_batch(images: list[np.ndarray], fmt: str, level: int, threads: int, repeats: int) -> tuple[float, int]:
    """(median seconds to encode the batch, bytes of one answer)."""
    def encode(image: np.ndarray) -> bytes:
        return encode_image(image, fmt, None, png_compress_level=level)

    times = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            encoded = list(pool.map(encode, images)) if threads > 1 else [encode(i) for i in images]
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
    print(f"{'format':14s} {'threads':>7s} {'ms/batch':>9s} {'ms/img':>7s} {'KiB/img':>8s}")
    cases = [("png", int(level)) for level in args.levels.split(",")] + [("jpeg", 0), ("webp", 0)]
    for fmt, level in cases:
        for threads in (int(t) for t in args.threads.split(",")):
            seconds, size = time_batch(images, fmt, level, threads, args.repeats)
            name = f"png level {level}" if fmt == "png" else fmt
            print(f"{name:14s} {threads:7d} {seconds * 1000:9.1f} {seconds * 1000 / args.batch:7.1f} {size / 1024:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
