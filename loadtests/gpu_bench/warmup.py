"""The real worker's warm-up on a configuration, then image sizes it never saw.

Counts dynamo's compiled frames per phase: with ``torch_compile`` the warm-up (the bench's size at
the batch sizes the worker serves, then the size probe) should leave none for the sizes after it;
a new size's first batch still pays cuDNN's search and a CUDA-graph capture per stage.
"""

from __future__ import annotations

import asyncio
import time

import engines

from .configs import synthetic_image
from .report import log


def _frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def run_warmup(rec: dict, config: engines.EngineConfig, model_dir, size: int, max_batch: int) -> None:
    from service.imaging import encode_image
    from service.metrics import Metrics
    from service.queue import MemoryJobQueue
    from service.runner import PipelineRunner
    from service.settings import load_settings
    from service.worker import Worker

    sys_path_bench()
    from worker_bench import make_jobs

    runner = PipelineRunner({"bfr": engines.build_pipeline(model_dir, config)}, config)
    rec.update(engine=config.describe(), size=size, probe=runner.shape_probe("bfr", size, size), phases=[])
    settings = load_settings(max_batch=max_batch, max_wait_ms=200.0, warmup=f"{size}x{size}", device=config.device)
    queue = MemoryJobQueue(16, 3600)
    worker = Worker(queue, lambda: runner, settings, Metrics())

    def jobs_of(h: int, w: int, n: int, seed: int) -> list:
        pixels = synthetic_image(max(h, w), seed)[:h, :w].copy()
        return make_jobs(n, pixels, encode_image(pixels, "png", None, 1))

    phases = [("new size, batch 1", jobs_of(size + 128, size + 192, 1, 5)),
              ("another size, batch 2", jobs_of(size + 64, size, 2, 6)),
              ("the first new size again", jobs_of(size + 128, size + 192, 1, 7)),
              ("the warm-up size", jobs_of(size, size, 1, 8))]

    async def scenario() -> None:
        before, t0 = _frames(), time.perf_counter()
        task = asyncio.create_task(worker.run())
        while not worker.ready:
            if task.done():
                task.result()  # the worker's own error
            await asyncio.sleep(0.05)
        rec["warm_up"] = {"s": time.perf_counter() - t0, "frames_compiled": _frames() - before}
        log(f"warmup: {rec['warm_up']['s']:.1f} s, {rec['warm_up']['frames_compiled']} frames compiled")
        try:
            for name, jobs in phases:
                before, t0 = _frames(), time.perf_counter()
                for job in jobs:
                    await queue.submit(job, wait=False)
                results = [await queue.wait(job.id, 3600) for job in jobs]
                row = {"phase": name, "shape": list(jobs[0].pixels.shape[:2]), "batch": len(jobs),
                       "s": time.perf_counter() - t0, "frames_compiled": _frames() - before,
                       "states": [r.state if r else None for r in results]}
                rec["phases"].append(row)
                log(f"warmup: {name} {row['shape']} x{row['batch']}: {row['s'] * 1000:.0f} ms, "
                    f"{row['frames_compiled']} frames compiled, {row['states']}")
        finally:
            worker.request_stop()
            await task

    try:
        asyncio.run(scenario())
    finally:
        runner.pipelines.clear()
    rec["frames_compiled_after_warm_up"] = sum(r["frames_compiled"] for r in rec["phases"])


def sys_path_bench() -> None:
    """loadtests/ on the import path: its worker_bench makes the jobs."""
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parents[1])
    if here not in sys.path:
        sys.path.insert(0, here)
