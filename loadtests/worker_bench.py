#!/usr/bin/env python3
"""Worker throughput with its answers encoded while the next batch computes, or before it.

The worker encodes every answer (PNG by default) on the CPU. On a GPU host that CPU time, tens of
ms for a 512 x 512 image, would add to every batch; with ``encode_overlap`` on, a batch's
answers are encoded and stored while the next batch computes. This runs the real `Worker` on the
real in-memory queue with a backlog of ``--jobs`` 512 x 512 photos, once per setting, in the same
process and minutes, and prints images per second and the ratio.

What computes (``--compute``):

* ``h200`` (default): a stand-in for a GPU on a host without one: the runner waits, with the
  GIL released as a thread waiting on the card does, for the time the H200 took per batch of that
  size (fp16 + CUDA graphs, the service's settings, docs/PERF.md) and answers with the input.
  Decoding, batching, encoding and storing are the worker's own. It tells whether the worker gets
  the overlap that the arithmetic promises; a real card's numbers come from ``loadtests/gpu_bench``.
* ``wait:MS``: the same with MS per image.
* ``tiny:DIR``: the real pipeline of a converted model directory on the CPU (compute far longer
  than the encoding there: expect no change).

    python loadtests/worker_bench.py [--jobs 32] [--batch 4] [--compute h200] [--codec-threads 0] [--decode]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flowie.params import EnhanceParams  # noqa: E402
from service.imaging import encode_image  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.queue.base import Job  # noqa: E402
from service.queue.memory import MemoryJobQueue  # noqa: E402
from service.settings import load_settings  # noqa: E402
from service.worker import Worker  # noqa: E402

# ms per image at 512 x 512, BFR mean-value, NVIDIA H200, fp16 + CUDA graphs (docs/perf/gpu_bench_h200_2026-11-27_a_pipeline.json).
H200_BFR_MS_PER_IMAGE = {1: 93.0, 4: 49.2, 8: 42.3, 16: 39.2}


def photo(size: int) -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BICUBIC))


@dataclass
class _Output:
    image: np.ndarray
    seed: int
    timings: dict[str, float] = field(default_factory=dict)


class StandInRunner:
    """The runner protocol, computing nothing: it waits ``ms_per_image`` per image (GIL released, as a
    thread waiting on a GPU) and answers with the input image."""

    backend = "stand-in"

    def __init__(self, ms_per_image: float) -> None:
        self.ms_per_image = ms_per_image

    @property
    def tasks(self) -> list[str]:
        return ["bfr"]

    def padded_shape(self, task: str, height: int, width: int, params: EnhanceParams) -> tuple[int, int]:
        return height, width

    def enhance(self, task: str, images: list[np.ndarray], params: EnhanceParams, seeds: list[int]) -> list[Any]:
        seconds = self.ms_per_image * len(images) / 1000.0
        time.sleep(seconds)
        return [_Output(image, seed, {"total": seconds}) for image, seed in zip(images, seeds, strict=True)]

    def memory_bytes(self) -> dict[str, int]:
        return {}

    def default_min_side(self, task: str) -> int:
        return 0

    def tile_rows(self, task: str, height: int, width: int) -> int:
        return 0

    def shape_probe(self, task: str, height: int, width: int) -> tuple[int, int] | None:
        return None

    def warmup_done(self) -> None:
        pass


def make_runner(compute: str, batch: int) -> Any:
    if compute == "h200":
        if batch not in H200_BFR_MS_PER_IMAGE:
            raise SystemExit(f"--compute h200 knows batch sizes {sorted(H200_BFR_MS_PER_IMAGE)}, not {batch}")
        return StandInRunner(H200_BFR_MS_PER_IMAGE[batch])
    if compute.startswith("wait:"):
        return StandInRunner(float(compute.removeprefix("wait:")))
    if compute.startswith("tiny:"):
        from service.runner import PipelineRunner

        return PipelineRunner.load([Path(compute.removeprefix("tiny:"))])
    raise SystemExit(f"--compute: h200, wait:MS or tiny:DIR, not {compute!r}")


def make_jobs(n: int, pixels: np.ndarray, png: bytes, params: EnhanceParams | None = None,
              decode: bool = False) -> list[Job]:
    """``n`` jobs of the photo; with ``decode`` they carry only the upload's bytes, which the worker
    decodes (as uploads over 65,536 px reach it from Redis), else the decoded pixels too (as the
    in-memory queue of `flowie serve` hands them over). By default the model's parameters, at the
    image's own size."""
    params = asdict(dataclasses.replace(params or EnhanceParams(upscale=1.0, min_side=0), seed=0))
    now = time.time()
    return [Job(id=uuid.uuid4().hex, task="bfr", params=dict(params, seed=i), output_format="png", quality=None,
                image=png, created_at=now, deadline=now + 3600, pixels=None if decode else pixels)
            for i in range(n)]


def run_once(runner: Any, overlap: bool, args: argparse.Namespace, pixels: np.ndarray, png: bytes,
             params: EnhanceParams | None = None) -> dict[str, Any]:
    """One backlog of ``args.jobs`` jobs through a fresh worker (``args.batch``, ``args.codec_threads``):
    seconds from start to the last answer stored."""
    threads = f",codec_threads={args.codec_threads}" if args.codec_threads else ""
    settings = load_settings(max_batch=args.batch, max_wait_ms=0.0, batch_lookahead=args.batch,
                             engine_overrides=f"encode_overlap={'on' if overlap else 'off'}{threads}")
    queue = MemoryJobQueue(args.jobs + 1, 3600)
    worker = Worker(queue, lambda: runner, settings, Metrics())
    jobs = make_jobs(args.jobs, pixels, png, params, getattr(args, "decode", False))

    async def scenario() -> tuple[float, list[Any]]:
        for job in jobs:
            await queue.submit(job, wait=False)
        started = time.perf_counter()
        task = asyncio.create_task(worker.run())
        results = [await queue.wait(job.id, 3600) for job in jobs]
        seconds = time.perf_counter() - started
        worker.request_stop()
        await task
        return seconds, results

    seconds, results = asyncio.run(scenario())
    bad = [r.state for r in results if r is None or r.state != "done"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not finish: {bad[:3]}")
    encode_ms = float(np.median([r.timings["encode"] for r in results])) * 1000
    return {"encode_overlap": overlap, "seconds": seconds, "images_per_s": args.jobs / seconds,
            "batches": worker.batches_done, "median_encode_ms_per_batch": encode_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=32, help="jobs in the backlog (a multiple of --batch)")
    parser.add_argument("--batch", type=int, default=4, help="the worker's max_batch")
    parser.add_argument("--size", type=int, default=512, help="side of the square photos")
    parser.add_argument("--compute", default="h200", help="h200 (stand-in), wait:MS per image, or tiny:MODEL_DIR")
    parser.add_argument("--codec-threads", type=int, default=0, help="0 = the worker's default, min(8, cores)")
    parser.add_argument("--decode", action="store_true",
                        help="the worker decodes every upload (Redis, uploads over 65,536 px) instead of "
                        "getting its pixels (flowie serve)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (off, on); the median is reported")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    if args.jobs < args.batch or args.jobs % args.batch:
        parser.error("--jobs must be a positive multiple of --batch")
    pixels = photo(args.size)
    png = encode_image(pixels, "png", None, 1)
    runner = make_runner(args.compute, args.batch)
    runs: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        for overlap in (False, True):
            run = run_once(runner, overlap, args, pixels, png)
            runs.append({**run, "round": round_no})
            print(f"round {round_no + 1}/{args.rounds}, encode_overlap={str(overlap).lower():5}: "
                  f"{run['images_per_s']:.2f} img/s ({run['seconds']:.2f} s, {run['batches']} batches)", flush=True)
    summary: dict[str, Any] = {}
    for overlap in (False, True):
        mine = [r for r in runs if r["encode_overlap"] is overlap]
        summary["on" if overlap else "off"] = {
            "images_per_s": float(np.median([r["images_per_s"] for r in mine])),
            "median_encode_ms_per_batch": float(np.median([r["median_encode_ms_per_batch"] for r in mine]))}
    ratio = summary["on"]["images_per_s"] / summary["off"]["images_per_s"]
    threads = args.codec_threads or load_settings().engine_config().codec_threads
    print(f"\n{args.jobs} jobs of {args.size}x{args.size}, batch {args.batch}, compute {args.compute}, "
          f"{threads} codec threads, uploads {'decoded by the worker' if args.decode else 'as pixels'}")
    print("| encode_overlap | img/s | encode ms per batch |\n|---|---|---|")
    for name in ("off", "on"):
        print(f"| {name} | {summary[name]['images_per_s']:.2f} | {summary[name]['median_encode_ms_per_batch']:.1f} |")
    print(f"on / off: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "summary": summary, "ratio_on_off": ratio,
                                         "codec_threads": threads}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
