"""The worker's answers: encoded and stored while the next batch computes (encode_overlap),
one batch behind at most, kept alive by heartbeats meanwhile, stored before the worker leaves, and
a job whose answer cannot be encoded fails alone."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from test_worker_batching import (
    Recording,
    encode_with,
    job_outcomes,
    make_job,
    recording_worker,
    redis_pair,
    running_worker,
)

from service.imaging import encode_image
from service.metrics import Metrics
from service.queue.memory import MemoryJobQueue
from service.worker import Worker

# Long enough for a batch of the tiny model on a loaded CI core; a passing test never waits it out.
COMPUTE_S = 60.0


def two_batches():
    """Two jobs that cannot share a batch (different samplers)."""
    return make_job(90, 90, sampler="restore_only"), make_job(90, 90, sampler="euler", steps=2)


@pytest.mark.parametrize("overlap", [True, False])
def test_the_next_batch_computes_while_the_previous_answers_are_encoded(tiny_runner, make_settings,
                                                                         monkeypatch, overlap):
    first, second = two_batches()
    second_started = threading.Event()
    seen: dict[str, object] = {}
    holder: dict[str, Worker] = {}

    def encode_spy(image, fmt, quality, level):
        if not seen:  # the first answer: wait (a while) for the second batch to start computing
            seen["second started while encoding"] = second_started.wait(COMPUTE_S if overlap else 0.5)
            seen["held"] = {d.job.id for d in holder["worker"].held()}  # overlapped: the next batch computes
        return encode_image(image, fmt, quality, level)

    encode_with(monkeypatch, encode_spy)
    settings = make_settings(max_batch=1, max_wait_ms=0.0, engine_overrides=f"encode_overlap={'on' if overlap else 'off'}")
    queue = MemoryJobQueue(16, 60)
    compute_threads: list[str] = []

    def on_batch():
        compute_threads.append(threading.current_thread().name)
        if len(runner.batches) == 2:
            second_started.set()

    runner = Recording(tiny_runner, on_batch=on_batch)
    worker = holder["worker"] = Worker(queue, lambda: runner, settings, Metrics())

    async def scenario():
        await queue.submit(first, wait=False)
        await queue.submit(second, wait=False)
        task = asyncio.create_task(worker.run())
        results = [await queue.wait(j.id, 2 * COMPUTE_S) for j in (first, second)]
        worker.request_stop()
        await task
        return results

    results = asyncio.run(scenario())
    assert [r.state for r in results] == ["done", "done"]
    assert seen["second started while encoding"] is overlap
    # In flight, the first job is still held (heartbeated), so no other worker reclaims it.
    assert first.id in seen["held"]
    assert all(r.compute_s >= r.timings["encode"] > 0 for r in results)
    # Every batch computes on the worker's one compute thread (torch's CPU thread team is per thread).
    assert len(compute_threads) == 2 and set(compute_threads) == {compute_threads[0]}
    assert compute_threads[0].startswith("flowie-compute")


def test_the_next_batchs_uploads_do_not_wait_behind_the_previous_answers(tiny_runner, make_settings,
                                                                         monkeypatch):
    """Uploads are decoded on threads of their own: with every encoding thread busy with the previous
    batch's answers, the next batch is still decoded and computed."""
    first = [make_job(90, 90, sampler="restore_only") for _ in range(2)]  # one batch of two
    second = [make_job(90, 90, sampler="euler", steps=2) for _ in range(2)]  # the next one
    assert all(job.pixels is None for job in first + second)  # the worker decodes every upload
    second_started = threading.Event()
    encode_waits: list[bool] = []
    lock = threading.Lock()

    def encode_spy(image, fmt, quality, level):
        with lock:
            call = len(encode_waits)
            encode_waits.append(False)
        if call < 2:  # both encoding threads hold the first batch's answers until the next batch starts
            encode_waits[call] = second_started.wait(COMPUTE_S)
        return encode_image(image, fmt, quality, level)

    encode_with(monkeypatch, encode_spy)
    settings = make_settings(max_batch=2, max_wait_ms=0.0, engine_overrides="encode_overlap=on,codec_threads=2")
    queue = MemoryJobQueue(16, 60)
    runner = Recording(tiny_runner, on_batch=lambda: len(runner.batches) == 2 and second_started.set())
    worker = Worker(queue, lambda: runner, settings, Metrics())

    async def scenario():
        for job in first + second:
            await queue.submit(job, wait=False)
        task = asyncio.create_task(worker.run())
        results = [await queue.wait(j.id, 3 * COMPUTE_S) for j in first + second]
        worker.request_stop()
        await task
        return results

    results = asyncio.run(scenario())
    assert [r.state for r in results] == ["done"] * 4
    assert [len(shapes) for _, shapes, _ in runner.batches] == [2, 2]
    assert encode_waits[:2] == [True, True]  # the next batch started while both were held


@pytest.mark.parametrize(("overrides", "device", "expected"), [
    ("", "cuda:0", True), ("", "cpu", False), ("encode_overlap=on", "cpu", True),
    ("encode_overlap=off", "cuda:1", False)])
def test_answers_overlap_by_default_only_on_a_gpu(make_settings, overrides, device, expected):
    settings = make_settings(engine_overrides=overrides, device=device)
    assert Worker(MemoryJobQueue(4, 60), lambda: None, settings, Metrics())._overlap is expected


@pytest.mark.parametrize("overlap", [True, False])
def test_a_job_whose_answer_cannot_be_encoded_fails_alone(tiny_runner, make_settings, monkeypatch, overlap):
    def encode_or_fail(image, fmt, quality, level):
        if fmt == "jpeg":
            raise OSError("encoder broke")
        return encode_image(image, fmt, quality, level)

    encode_with(monkeypatch, encode_or_fail)
    settings = make_settings(max_batch=2, max_wait_ms=300.0, engine_overrides=f"encode_overlap={'on' if overlap else 'off'}")
    queue = MemoryJobQueue(16, 60)
    runner = Recording(tiny_runner)
    worker = Worker(queue, lambda: runner, settings, Metrics())
    fine, broken = make_job(90, 90), make_job(90, 90)
    broken.output_format = "jpeg"

    async def scenario():
        await queue.submit(fine, wait=False)
        await queue.submit(broken, wait=False)
        task = asyncio.create_task(worker.run())
        results = [await queue.wait(j.id, COMPUTE_S) for j in (fine, broken)]
        worker.request_stop()
        await task
        return results

    done, failed = asyncio.run(scenario())
    assert len(runner.batches) == 1  # one compute for both: the batch is not run again
    assert done.state == "done" and done.image[:8] == b"\x89PNG\r\n\x1a\n"
    assert failed.state == "failed" and failed.problem["status"] == 500 and "OSError" in failed.problem["detail"]
    assert worker.crashed is None


def test_stop_stores_the_answers_in_flight_before_leaving(tiny_runner, make_settings, monkeypatch):
    release = threading.Event()

    def slow_encode(image, fmt, quality, level):
        release.wait(COMPUTE_S)  # the answer is still being encoded when the stop arrives
        return encode_image(image, fmt, quality, level)

    encode_with(monkeypatch, slow_encode)
    settings = make_settings(max_batch=1, max_wait_ms=0.0, engine_overrides="encode_overlap=on")
    queue = MemoryJobQueue(16, 60)
    job = make_job(90, 90)
    holder: dict[str, Worker] = {}

    def stop_then_release():  # compute done, answers in flight: SIGTERM, and the encoding ends later
        holder["worker"].request_stop()
        threading.Timer(0.5, release.set).start()

    class StopAfterCompute(Recording):
        def enhance(self, *args):
            outputs = super().enhance(*args)
            threading.Timer(0.2, stop_then_release).start()
            return outputs

    worker = holder["worker"] = Worker(queue, lambda: StopAfterCompute(tiny_runner), settings, Metrics())

    async def scenario():
        await queue.submit(job, wait=False)
        await asyncio.wait_for(worker.run(), 2 * COMPUTE_S)
        return await queue.result(job.id)  # stored by the time the worker has left

    result = asyncio.run(scenario())
    assert result is not None and result.state == "done" and result.image[:4] == b"\x89PNG"
    assert worker.held() == []


def test_an_error_storing_answers_stops_the_loop_and_says_so(tiny_runner, make_settings):
    class BrokenFinish(MemoryJobQueue):
        async def finish(self, delivery, result):
            raise RuntimeError("store broke")

    settings = make_settings(max_batch=1, max_wait_ms=0.0, engine_overrides="encode_overlap=on")
    queue = BrokenFinish(16, 60)
    worker = Worker(queue, lambda: tiny_runner, settings, Metrics())

    async def scenario():
        await queue.submit(make_job(90, 90), wait=False)
        await asyncio.wait_for(worker.run(), COMPUTE_S)  # a lost error would leave the loop idling here

    with pytest.raises(RuntimeError, match="store broke"):
        asyncio.run(scenario())
    assert worker.crashed is not None and "store broke" in worker.crashed


def test_on_redis_a_backlog_of_several_batches_is_answered_with_the_answers_overlapping(
        redis_server, tiny_runner, make_settings):
    """The answers' task stores results on the Redis queue while the loop takes, checks and computes
    the next batch: every job ends done with its own image, and every entry is acknowledged."""
    settings = make_settings(max_batch=2, max_wait_ms=0.0, engine_overrides="encode_overlap=on")
    api, queue = redis_pair(redis_server, "w" + uuid.uuid4().hex[:8])
    worker, runner, metrics = recording_worker(queue, tiny_runner, settings)
    # Three groups of two (different samplers or work sizes): three batches, one behind the other.
    jobs = [make_job(90, 90), make_job(90, 90), make_job(90, 90, sampler="restore_only"),
            make_job(90, 90, sampler="restore_only"), make_job(200, 150), make_job(200, 150)]

    async def scenario():
        async with running_worker(api, queue, worker):
            for job in jobs:
                await api.submit(job, wait=True)
            results = [await api.wait(job.id, COMPUTE_S) for job in jobs]
            while await api.depth("bfr"):  # until the worker has acknowledged every entry
                await asyncio.sleep(0.02)
            return results

    results = asyncio.run(scenario())
    assert [r.state for r in results] == ["done"] * 6
    assert [(r.width, r.height) for r in results] == [(90, 90)] * 4 + [(200, 150)] * 2
    assert all(r.image[:4] == b"\x89PNG" and r.batch_size >= 1 for r in results)
    assert sum(len(shapes) for _, shapes, _ in runner.batches) == 6 and len(runner.batches) >= 3
    assert job_outcomes(metrics) == {"done": 6.0}
    assert worker.crashed is None
