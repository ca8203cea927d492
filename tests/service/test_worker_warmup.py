"""The worker's warm-up (service/warmup.py) on the real pipeline: every batch size before ready, the
tile rows of large images, the size probe of compiled networks, failures skipped, /readyz's report."""

from __future__ import annotations

import asyncio
import threading
import time

from worker_helpers import Recording, make_job

from service.metrics import Metrics
from service.queue.base import Job
from service.queue.memory import MemoryJobQueue
from service.worker import Worker


async def one_job_through(worker: Worker, queue: MemoryJobQueue, job: Job):
    """Start the worker (its warm-up first), submit ``job``, wait for its result, stop the worker."""
    task = asyncio.create_task(worker.run())
    await queue.submit(job, wait=False)
    result = await queue.wait(job.id, 120)
    worker.request_stop()
    await task
    return result


def test_the_worker_warms_up_every_batch_size_before_it_reports_ready(tiny_runner, make_settings):
    settings = make_settings(max_batch=2, max_wait_ms=0.0, warmup="128x128,192x128")
    queue = MemoryJobQueue(16, 60)
    seen: list[tuple[bool, str | None]] = []
    worker = Worker(queue, lambda: runner, settings, Metrics())
    runner = Recording(tiny_runner, on_batch=lambda: seen.append((worker.ready, worker.warming)))
    job = make_job(90, 90)

    result = asyncio.run(one_job_through(worker, queue, job))
    assert result.state == "done"
    # each size at batch 1 and 2, blank images at their own size; then the job (padded to 128 x 128 there)
    assert [shapes for _, shapes, _ in runner.batches] == [
        [(128, 128)], [(128, 128)] * 2, [(192, 128)], [(192, 128)] * 2, [(90, 90)]]
    assert [ready for ready, _ in seen] == [False] * 4 + [True]
    assert seen[1][1] == "bfr 128x128, batch 2 of 2 (2/4)" and seen[4][1] is None


def test_the_warm_up_runs_a_large_image_s_tile_size_up_to_the_tiles_per_call(tiny_runner, make_settings):
    """On CUDA a tiled image's network calls stack up to tile_batch tiles: shapes of a batch of
    that many tile-sized images, each new one a cuDNN search and a graph capture. The runner says so
    for the tile size (here 128x128 stands in for it, with 3 rows per call); other sizes stop at
    max_batch."""
    class TileRows(Recording):
        def tile_rows(self, task, height, width):
            return 3 if (height, width) == (128, 128) else 0

    shapes, seen = warm_up_then_one_job(TileRows, tiny_runner, make_settings(max_batch=2, max_wait_ms=0.0, warmup="128x128,192x128"))
    assert shapes == [[(128, 128)], [(128, 128)] * 2, [(128, 128)] * 3, [(192, 128)], [(192, 128)] * 2, [(90, 90)]]
    assert seen[2] == "bfr 128x128, batch 3 of 3 (3/5)" and seen[4] == "bfr 192x128, batch 2 of 2 (5/5)"


def warm_up_then_one_job(runner_class, tiny_runner, settings) -> tuple[list, list[str | None]]:
    """A worker on ``runner_class`` (a Recording) warms up, then serves one 90x90 job: the image shapes
    of every batch it ran, and what /readyz said (``Worker.warming``) at each."""
    queue = MemoryJobQueue(16, 60)
    seen: list[str | None] = []
    worker = Worker(queue, lambda: runner, settings, Metrics())
    runner = runner_class(tiny_runner, on_batch=lambda: seen.append(worker.warming))
    result = asyncio.run(one_job_through(worker, queue, make_job(90, 90)))
    assert result.state == "done"
    return [shapes for _, shapes, _ in runner.batches], seen


def test_with_compiled_networks_the_warm_up_ends_with_a_size_probe_at_batch_1_and_2(tiny_runner, make_settings):
    """A runner whose networks are compiled names a second size (Runner.shape_probe): the warm-up runs
    it after the warm-up sizes, at batch 1 and 2, and says why."""
    class Compiled(Recording):
        def shape_probe(self, task, height, width):
            assert (task, height, width) == ("bfr", 128, 128)  # the first warm-up size
            return (192, 256)

    shapes, seen = warm_up_then_one_job(Compiled, tiny_runner, make_settings(max_batch=3, max_wait_ms=0.0, warmup="128x128"))
    assert shapes == [[(128, 128)], [(128, 128)] * 2, [(128, 128)] * 3, [(192, 256)], [(192, 256)] * 2, [(90, 90)]]
    assert seen[4] == "bfr 192x256, batch 2 of 2, compiling for other sizes (5/5)"


def test_after_the_warm_up_a_compiled_stage_takes_new_image_sizes_without_compiling(tiny_model_dir, make_settings):
    """The real thing on the CPU: the tiny model's cond encoder compiled (FLOWIE_TORCH_COMPILE), the
    worker's warm-up at 128x128 and batch 1-2 plus its size probe, then jobs of sizes and batch sizes
    it never saw: dynamo compiles nothing more (each compile of a full-size stage costs minutes)."""
    from torch._dynamo.utils import counters

    from engines import EngineConfig
    from service.runner import PipelineRunner

    compiled = PipelineRunner.load([tiny_model_dir], EngineConfig.for_device("cpu", overrides="compile_stages=cond_encoder"))
    assert compiled.shape_probe("bfr", 128, 128) == (192, 256)
    settings = make_settings(max_batch=2, max_wait_ms=50.0, warmup="128x128")
    queue = MemoryJobQueue(16, 60)
    worker = Worker(queue, lambda: compiled, settings, Metrics())
    frames: dict[str, int] = {}

    async def scenario():
        frames["before"] = counters["frames"]["ok"]
        task = asyncio.create_task(worker.run())
        while not worker.ready:
            await asyncio.sleep(0.05)
        frames["after_warm_up"] = counters["frames"]["ok"]
        # 320x192 at batch 1, then two 256x448 together (a batch of 2): new heights, widths, batches
        jobs = [make_job(192, 320), make_job(448, 256), make_job(448, 256, seed=1)]
        await queue.submit(jobs[0], wait=False)
        first = await queue.wait(jobs[0].id, 120)
        for job in jobs[1:]:
            await queue.submit(job, wait=False)
        results = [first] + [await queue.wait(job.id, 120) for job in jobs[1:]]
        worker.request_stop()
        await task
        return results

    results = asyncio.run(scenario())
    assert [r.state for r in results] == ["done"] * 3
    # the warm-up compiled: 128x128 at batch 1 and 2, the probe at 1 and 2
    assert frames["after_warm_up"] - frames["before"] >= 4
    assert counters["frames"]["ok"] == frames["after_warm_up"]


def test_a_warm_up_size_that_fails_is_skipped_and_the_worker_serves(tiny_runner, make_settings, caplog):
    settings = make_settings(max_batch=3, max_wait_ms=0.0, warmup="128x128")
    queue = MemoryJobQueue(16, 60)
    worker = Worker(queue, lambda: runner, settings, Metrics())

    def fail_at_batch_two():
        if len(runner.batches) == 2 and not worker.ready:
            raise RuntimeError("out of memory (as a too-large batch would be)")

    runner = Recording(tiny_runner, on_batch=fail_at_batch_two)
    job = make_job(90, 90)

    with caplog.at_level("WARNING", logger="flowie.service.worker"):
        result = asyncio.run(one_job_through(worker, queue, job))
    assert result.state == "done" and worker.crashed is None
    assert [len(shapes) for _, shapes, _ in runner.batches] == [1, 2, 1]  # batch 3 of the failed size skipped
    assert "warm-up of bfr 128x128 failed at batch 2" in caplog.text


def test_readyz_says_the_worker_is_warming_up(tiny_runner, make_settings):
    from fastapi.testclient import TestClient

    from service.app import create_app, load_models

    settings = make_settings(max_batch=1, warmup="128x128")
    queue, metrics = MemoryJobQueue(16, 60), Metrics()
    release = threading.Event()
    runner = Recording(tiny_runner, on_batch=lambda: release.wait(60))  # the warm-up batch waits for the test
    worker = Worker(queue, lambda: runner, settings, metrics)
    app = create_app(settings, queue, load_models(settings), worker=worker, metrics=metrics)
    with TestClient(app) as http:
        try:
            while not runner.batches:
                time.sleep(0.01)
            warming = http.get("/readyz")
        finally:
            release.set()
        deadline = time.monotonic() + 60
        while http.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = http.get("/readyz")
    assert warming.status_code == 503 and warming.headers["content-type"] == "application/problem+json"
    assert "warming up: bfr 128x128, batch 1 of 1 (1/1)" in warming.json()["detail"]
    assert warming.json()["reason"] == "warming_up"
    assert ready.status_code == 200
