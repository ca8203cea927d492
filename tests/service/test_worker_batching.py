"""The worker's dynamic batcher on the real pipeline: grouping, skipping dead jobs, graceful stop."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict

from svc_helpers import png

from flowie.params import EnhanceParams
from service.metrics import Metrics
from service.queue.base import Job
from service.queue.memory import MemoryJobQueue
from service.worker import Worker


class Recording:
    """The real runner, recording what each batch held (and running a hook as a batch starts)."""

    def __init__(self, runner, on_batch=None) -> None:
        self.runner, self.on_batch, self.batches = runner, on_batch, []
        self.backend = runner.backend

    @property
    def tasks(self):
        return self.runner.tasks

    def padded_shape(self, *args):
        return self.runner.padded_shape(*args)

    def memory_bytes(self):
        return self.runner.memory_bytes()

    def enhance(self, task, images, params, seeds):
        self.batches.append((params.sampler, [image.shape[:2] for image in images], list(seeds)))
        if self.on_batch:
            self.on_batch()
        return self.runner.enhance(task, images, params, seeds)


def make_job(width: int, height: int, deadline_s: float = 60, **params) -> Job:
    filled = EnhanceParams(sampler="mean_value", steps=5, color_fix="wavelet", upscale=1.0, min_side=128,
                           tile="auto", seed=len(params) + width)
    now = time.time()
    return Job(id=uuid.uuid4().hex, task="bfr", params={**asdict(filled), **params}, output_format="png",
               quality=None, image=png(width, height), created_at=now, deadline=now + deadline_s)


def test_jobs_batch_by_params_and_padded_shape_and_dead_jobs_never_compute(tiny_runner, make_settings):
    settings = make_settings(max_batch=4, max_wait_ms=300.0)
    queue, metrics = MemoryJobQueue(16, 60), Metrics()
    runner = Recording(tiny_runner)
    worker = Worker(queue, lambda: runner, settings, metrics)
    same = [make_job(90, 90), make_job(100, 100), make_job(90, 90)]  # all pad to 128 x 128
    other_params = make_job(90, 90, sampler="euler", steps=2)
    expired = make_job(90, 90, deadline_s=-1)
    cancelled = make_job(90, 90)

    async def scenario():
        for job in (*same, other_params, expired, cancelled):
            await queue.submit(job, wait=False)
        await queue.cancel(cancelled.id)
        task = asyncio.create_task(worker.run())
        results = [await queue.wait(j.id, 120) for j in (*same, other_params, expired, cancelled)]
        worker.request_stop()
        await task
        return results

    results = asyncio.run(scenario())
    assert [r.state for r in results] == ["done"] * 4 + ["expired", "cancelled"]
    assert sorted((sampler, len(shapes)) for sampler, shapes, _ in runner.batches) == [("euler", 1), ("mean_value", 3)]
    assert {r.batch_size for r in results[:3]} == {3}
    assert (results[1].width, results[1].height) == (100, 100)
    seeds = next(seeds for sampler, _, seeds in runner.batches if sampler == "mean_value")
    assert seeds == [j.params["seed"] for j in same]  # each job keeps its own seed inside a batch
    outcomes = {s.labels["outcome"]: s.value for s in metrics.jobs.collect()[0].samples if s.name.endswith("_total")}
    # In memory a cancelled job leaves the queue at once; the worker never even takes it.
    assert outcomes == {"done": 4.0, "expired": 1.0}
    assert sum(len(shapes) for _, shapes, _ in runner.batches) == 4


def test_stop_finishes_the_batch_in_progress_and_hands_back_the_rest(tiny_runner, make_settings):
    settings = make_settings(max_batch=4, max_wait_ms=0.0)
    queue, metrics = MemoryJobQueue(16, 60), Metrics()
    worker = Worker(queue, lambda: runner, settings, metrics)
    runner = Recording(tiny_runner, on_batch=worker.request_stop)  # SIGTERM arrives as the batch starts
    first, second = make_job(90, 90, sampler="restore_only"), make_job(90, 90, sampler="euler", steps=2)

    async def scenario():
        await queue.submit(first, wait=False)
        await queue.submit(second, wait=False)
        await worker.run()
        return await queue.result(first.id), await queue.state(second.id), await queue.depth("bfr")

    done, second_state, depth = asyncio.run(scenario())
    assert done is not None and done.state == "done"
    assert second_state == "queued" and depth == 1  # handed back, not computed
    assert len(runner.batches) == 1
