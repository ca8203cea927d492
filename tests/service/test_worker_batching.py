"""The worker's dynamic batcher on the real pipeline: grouping, skipping dead jobs, graceful stop,
and when it waits for batch mates (only when more work is likely; a lone job starts at once)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import uuid

import numpy as np
import pytest
from worker_helpers import Recording, make_job

from service.imaging import INLINE_DECODE_PIXELS, tighten_bomb_guard
from service.metrics import Metrics
from service.queue.memory import MemoryJobQueue
from service.queue.redis_streams import RedisJobQueue
from service.worker import IDLE_WAIT_S, Worker

# A batching window far longer than any test may take: a test that finishes did not wait it out.
LONG_WINDOW_MS = 60_000.0


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


def encode_with(monkeypatch, encode) -> None:
    """Make the worker encode each answer with ``encode(image, fmt, quality, level)``, one task per
    answer on its codec threads (a lone answer with one PNG band: on the compute thread)."""
    import service.worker as worker_module

    monkeypatch.setattr(worker_module, "encode_image", encode)
    monkeypatch.setattr(worker_module, "submit_encode",
                        lambda pool, image, fmt, quality, level, bands: pool.submit(encode, image, fmt, quality, level))


def test_a_batch_is_encoded_on_the_codec_threads_each_job_in_its_own_format(tiny_runner, make_settings, monkeypatch):
    import service.imaging as imaging
    import service.png as png

    threads: list[str] = []

    def spy(real):  # the real encoder, noting the thread it runs on
        def run(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(png, "deflate_band", spy(png.deflate_band))  # PNG answers: one band each here
    monkeypatch.setattr(imaging, "encode_image", spy(imaging.encode_image))  # the JPEG one
    settings = make_settings(max_batch=3, max_wait_ms=300.0, engine_overrides="png_compress_level=9,codec_threads=2")
    queue, metrics = MemoryJobQueue(16, 60), Metrics()
    worker = Worker(queue, lambda: tiny_runner, settings, metrics)
    jobs = [make_job(90, 90), make_job(90, 90), make_job(90, 90)]
    jobs[1].output_format = "jpeg"

    async def scenario():
        for job in jobs:
            await queue.submit(job, wait=False)
        task = asyncio.create_task(worker.run())
        results = [await queue.wait(j.id, 120) for j in jobs]
        worker.request_stop()
        await task
        return results

    results = asyncio.run(scenario())
    assert [r.state for r in results] == ["done"] * 3 and {r.batch_size for r in results} == {3}
    assert [r.format for r in results] == ["png", "jpeg", "png"]
    assert results[1].image[:2] == b"\xff\xd8"  # JPEG
    assert all(r.image[r.image.index(b"IDAT") + 5] >> 6 == 3 for r in (results[0], results[2]))  # zlib level 9
    assert len(threads) == 3 and all(name.startswith("flowie-codec") for name in threads)
    assert all(r.timings["encode"] > 0 for r in results)
    encode_samples = [s for s in metrics.stage_duration.collect()[0].samples
                      if s.labels.get("stage") == "encode" and s.name.endswith("_count")]
    assert encode_samples and encode_samples[0].value == 1  # one batch


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


class TakeLog(MemoryJobQueue):
    """The real in-memory queue, recording the timeout of every `take` (and an optional hook)."""

    def __init__(self, *args, on_take=None) -> None:
        super().__init__(*args)
        self.timeouts: list[float] = []
        self.on_take = on_take

    async def take(self, tasks, worker_id, max_n, timeout_s):
        self.timeouts.append(timeout_s)
        if self.on_take:
            await self.on_take(timeout_s)
        return await super().take(tasks, worker_id, max_n, timeout_s)


def window_takes(timeouts: list[float]) -> list[float]:
    """The takes that waited for batch mates (not the idle read, not a look at what is queued)."""
    return [t for t in timeouts if t not in (0.0, IDLE_WAIT_S)]


def test_a_lone_job_starts_at_once_instead_of_waiting_the_window(tiny_runner, make_settings):
    settings = make_settings(max_batch=4, max_wait_ms=LONG_WINDOW_MS)
    queue, metrics = TakeLog(16, 60), Metrics()
    runner = Recording(tiny_runner)
    worker = Worker(queue, lambda: runner, settings, metrics)
    lone = make_job(300, 240)  # more pixels than INLINE_DECODE_PIXELS: decoded in a thread
    assert 300 * 240 > INLINE_DECODE_PIXELS
    tighten_bomb_guard(settings.max_pixels)  # Pillow's guard is global; other tests' apps lower it

    async def scenario():
        await queue.submit(lone, wait=False)
        task = asyncio.create_task(worker.run())
        result = await queue.wait(lone.id, LONG_WINDOW_MS / 1000 / 4)
        worker.request_stop()
        await task
        return result

    result = asyncio.run(scenario())
    assert result is not None and result.state == "done" and (result.width, result.height) == (300, 240)
    assert (worker.started_at_once, worker.windows_waited) == (1, 0)
    assert window_takes(queue.timeouts) == [], queue.timeouts
    assert [len(shapes) for _, shapes, _ in runner.batches] == [1]


def run_with_jobs_arriving_during_the_first_batch(queue, tiny_runner, settings, first, during, later=(),
                                                  wait_s: float = 60.0):
    """Submit ``first``; while its batch computes, submit ``during``; wait for every job (also ``later``,
    which the test submits itself). Returns (results in that order, the recording runner, the worker)."""
    loop_holder: dict = {}

    def submit_during_first_batch():  # runs in the compute thread while the first batch computes
        if len(runner.batches) == 1:
            for job in during:
                asyncio.run_coroutine_threadsafe(queue.submit(job, wait=False), loop_holder["loop"]).result()

    runner = Recording(tiny_runner, on_batch=submit_during_first_batch)
    worker = Worker(queue, lambda: runner, settings, Metrics())

    async def scenario():
        loop_holder["loop"] = asyncio.get_running_loop()
        await queue.submit(first, wait=False)
        task = asyncio.create_task(worker.run())
        results = [await queue.wait(j.id, wait_s) for j in (first, *during, *later)]
        worker.request_stop()
        await task
        return results

    return asyncio.run(scenario()), runner, worker


def test_jobs_queued_while_the_worker_computes_wait_for_batch_mates(tiny_runner, make_settings):
    settings = make_settings(max_batch=3, max_wait_ms=LONG_WINDOW_MS)
    first, during = make_job(90, 90), [make_job(90, 90), make_job(100, 100)]
    late = make_job(96, 96)  # comes while the worker waits for batch mates of `during`
    late_sent: list = []

    async def submit_late_once(timeout_s):
        if timeout_s not in (0.0, IDLE_WAIT_S) and not late_sent:
            late_sent.append(True)
            await queue.submit(late, wait=False)

    queue = TakeLog(16, 60, on_take=submit_late_once)
    results, runner, worker = run_with_jobs_arriving_during_the_first_batch(
        queue, tiny_runner, settings, first, during, later=[late], wait_s=LONG_WINDOW_MS / 1000 / 4)
    assert [r.state if r else None for r in results] == ["done"] * 4
    # The first job came to an idle worker: alone, at once. The next two queued behind it (a
    # backlog), so the worker waited for a third, and started as soon as the batch was full.
    assert [len(shapes) for _, shapes, _ in runner.batches] == [1, 3]
    assert (worker.started_at_once, worker.windows_waited) == (1, 1)
    assert len(window_takes(queue.timeouts)) == 1
    assert {r.batch_size for r in results[1:]} == {3}


def _mixed_backlog_batches(tiny_runner, make_settings, lookahead: int) -> list[int]:
    """Sizes of the batches a worker runs for a backlog of four interleaved groups (A B C D A B C D)."""
    settings = make_settings(max_batch=2, max_wait_ms=LONG_WINDOW_MS, batch_lookahead=lookahead)
    groups = [dict(sampler="one_step"), dict(sampler="euler", steps=1), dict(sampler="euler", steps=2),
              dict(sampler="restore_only")]
    first = make_job(90, 90, deadline_s=600)  # a busy CI machine must not expire them
    backlog = [make_job(90, 90, deadline_s=600, **groups[i % 4]) for i in range(8)]
    results, runner, _ = run_with_jobs_arriving_during_the_first_batch(
        MemoryJobQueue(32, 60), tiny_runner, settings, first, backlog, wait_s=600)
    assert [r.state if r else None for r in results] == ["done"] * 9
    return [len(shapes) for _, shapes, _ in runner.batches]


def test_a_mixed_backlog_fills_batches_when_the_worker_reads_ahead(tiny_runner, make_settings):
    # Reading 8 ahead, every group of the backlog finds its mate: four full batches of two.
    assert _mixed_backlog_batches(tiny_runner, make_settings, lookahead=8) == [1, 2, 2, 2, 2]


def test_a_buffer_of_two_batches_runs_a_mixed_backlog_one_job_at_a_time(tiny_runner, make_settings):
    # The previous behaviour (a buffer of 2 x max_batch = 4 jobs): the oldest job's mate is always
    # further back than the buffer reaches, so the window ends as soon as the buffer is full and
    # every job runs alone. This is what the read-ahead (batch_lookahead) fixes.
    assert _mixed_backlog_batches(tiny_runner, make_settings, lookahead=4) == [1] * 9


def test_an_error_in_the_worker_loop_is_logged_and_reported_not_silent(tiny_runner, make_settings, caplog):
    async def broken_take(timeout_s):
        raise RuntimeError("a bug in take")

    queue = TakeLog(16, 60, on_take=broken_take)
    worker = Worker(queue, lambda: tiny_runner, make_settings(), Metrics())

    async def scenario():
        try:
            await worker.run()
        except RuntimeError as exc:
            return str(exc)
        return None

    with caplog.at_level("ERROR", logger="flowie.service.worker"):
        raised = asyncio.run(scenario())
    assert raised == "a bug in take"
    assert worker.crashed == "RuntimeError: a bug in take" and not worker.ready
    assert any("worker loop stopped" in r.getMessage() for r in caplog.records)


# --- on Redis ------------------------------------------------------------------------------------
class CommandLog(threading.Thread):
    """Every command clients send to the redis-server (MONITOR), by name, until `stop`."""

    SENTINEL = "flowie-test-monitor-end"

    def __init__(self, redis_server) -> None:
        super().__init__(daemon=True)
        self.server, self.started = redis_server, threading.Event()
        self.counts: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        with self.server.client().monitor() as monitor:
            self.started.set()
            for info in monitor.listen():
                command = info["command"]
                if self.SENTINEL in command:
                    return
                if info["client_type"] != "lua":  # commands a script runs are not round trips
                    self.counts[command.split(" ", 1)[0].upper()] += 1

    def __enter__(self) -> CommandLog:
        self.start()
        assert self.started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.server.client().echo(self.SENTINEL)
        self.join(10)


def redis_pair(redis_server, prefix: str) -> tuple[RedisJobQueue, RedisJobQueue]:
    """(API side that waits for results, worker side) on one prefix."""
    return (RedisJobQueue(redis_server.url, tasks=["bfr"], prefix=prefix, result_ttl_s=60),
            RedisJobQueue(redis_server.url, tasks=["bfr"], prefix=prefix, result_ttl_s=60, listen=False))


@contextlib.asynccontextmanager
async def running_worker(api: RedisJobQueue, queue: RedisJobQueue, worker: Worker):
    """Both queues started and the worker's loop running (the task); all stopped afterwards."""
    await api.start()
    await queue.start()
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.request_stop()
        await task
        await api.close()
        await queue.close()


def test_on_redis_a_lone_request_costs_one_round_trip_before_compute_and_no_result_read(
        redis_server, tiny_runner, make_settings, monkeypatch):
    from service import progress

    # Progress reports (one write every PUBLISH_INTERVAL_S during compute) are off the request's path.
    monkeypatch.setattr(progress, "PUBLISH_INTERVAL_S", 3600.0)
    settings = make_settings(max_batch=4, max_wait_ms=LONG_WINDOW_MS, heartbeat_s=30.0)
    api, queue = redis_pair(redis_server, "w" + uuid.uuid4().hex[:8])
    worker = Worker(queue, lambda: tiny_runner, settings, Metrics())

    async def one(job):
        await api.submit(job, wait=True)
        try:
            return await api.wait(job.id, LONG_WINDOW_MS / 1000 / 4)
        finally:
            await api.forget(job.id)

    async def scenario():
        async with running_worker(api, queue, worker):
            warm = await one(make_job(90, 90))  # loads the scripts; the worker is ready after it
            while worker.batches_done < 1:  # its bookkeeping after the result (service time)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            with CommandLog(redis_server) as log:
                result = await one(make_job(90, 90))
                while worker.batches_done < 2:
                    await asyncio.sleep(0.01)
            return warm, result, log.counts

    warm, result, counts = asyncio.run(scenario())
    assert warm.state == result.state == "done"
    assert (worker.started_at_once, worker.windows_waited) == (2, 0)  # the 60 s window was never waited
    # admission, the worker's one call before compute, storing the result: three scripts
    assert counts["EVALSHA"] == 3, counts
    assert counts["EXISTS"] == counts["HSET"] == 0, counts  # no separate checks before compute
    assert counts["HGETALL"] == 0, counts  # the result came inside the handler's wake-up
    assert result.pickup_s > 0 and result.pickup_s <= result.queue_s


class CancelAtBegin(RedisJobQueue):
    """The real worker-side Redis queue; the job ``victim`` is cancelled (through ``api``) just before
    the worker's check before compute reaches Redis: after the worker took it."""

    def __init__(self, *args, api: RedisJobQueue, victim: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.api, self.victim = api, victim

    async def begin(self, deliveries):
        if self.victim:
            victim, self.victim = self.victim, ""
            assert await self.api.cancel(victim) == "cancelled"
        return await super().begin(deliveries)


def cancel_at_begin_pair(redis_server, victim: str) -> tuple[RedisJobQueue, CancelAtBegin]:
    """(API side, worker side that has the API cancel ``victim`` just before its check) on one prefix."""
    prefix = "w" + uuid.uuid4().hex[:8]
    api = RedisJobQueue(redis_server.url, tasks=["bfr"], prefix=prefix, result_ttl_s=60)
    return api, CancelAtBegin(redis_server.url, tasks=["bfr"], prefix=prefix, result_ttl_s=60, listen=False,
                              api=api, victim=victim)


def recording_worker(queue, tiny_runner, settings) -> tuple[Worker, Recording, Metrics]:
    """A worker on ``queue`` whose runner records its batches, and its metrics."""
    metrics, runner = Metrics(), Recording(tiny_runner)
    return Worker(queue, lambda: runner, settings, metrics), runner, metrics


def job_outcomes(metrics: Metrics) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for s in metrics.jobs.collect()[0].samples if s.name.endswith("_total")}


def test_on_redis_a_job_cancelled_in_a_workers_hands_never_computes_and_its_batch_mate_does(
        redis_server, tiny_runner, make_settings):
    settings = make_settings(max_batch=4, max_wait_ms=0.0)
    cancelled, alive = make_job(90, 90), make_job(90, 90)
    api, queue = cancel_at_begin_pair(redis_server, cancelled.id)
    worker, runner, metrics = recording_worker(queue, tiny_runner, settings)

    async def scenario():
        await api.start()
        await queue.start()
        try:
            await api.submit(cancelled, wait=False)
            await api.submit(alive, wait=True)
            task = asyncio.create_task(worker.run())  # one read brings both: a batch, checked first
            result = await api.wait(alive.id, 60)
            worker.request_stop()
            await task
            return result, await api.result(cancelled.id), await api.depth("bfr")
        finally:
            await api.close()
            await queue.close()

    result, gone, depth = asyncio.run(scenario())
    assert result.state == "done" and gone.state == "cancelled"
    assert [len(shapes) for _, shapes, _ in runner.batches] == [1]
    assert job_outcomes(metrics) == {"done": 1.0, "cancelled": 1.0}
    assert depth == 0  # both entries acknowledged


def test_on_redis_a_job_cancelled_while_queued_is_never_delivered(redis_server, tiny_runner, make_settings):
    settings = make_settings(max_batch=4, max_wait_ms=LONG_WINDOW_MS)
    api, queue = redis_pair(redis_server, "w" + uuid.uuid4().hex[:8])
    worker, runner, metrics = recording_worker(queue, tiny_runner, settings)
    lone, later = make_job(90, 90), make_job(100, 100)

    async def scenario():
        await api.start()
        await queue.start()
        try:
            await api.submit(lone, wait=False)
            await api.cancel(lone.id)
            depth_after_cancel = await api.depth("bfr")
            task = asyncio.create_task(worker.run())
            await api.submit(later, wait=True)
            done = await api.wait(later.id, 60)
            worker.request_stop()
            await task
            return depth_after_cancel, await api.result(lone.id), done
        finally:
            await api.close()
            await queue.close()

    depth_after_cancel, result, done = asyncio.run(scenario())
    assert depth_after_cancel == 0  # it left the stream with the cancel
    assert result.state == "cancelled" and done.state == "done"
    assert [shapes for _, shapes, _ in runner.batches] == [[(100, 100)]]  # only the later job computed
    assert job_outcomes(metrics) == {"done": 1.0}  # the worker never saw the cancelled one


@pytest.mark.parametrize("overlap", ["off", "on"])  # the answer is dropped before or in the answers' task
def test_on_redis_a_lone_job_cancelled_as_its_compute_starts_keeps_the_cancelled_result(
        redis_server, tiny_runner, make_settings, overlap):
    """A lone job's check travels alongside its compute: a cancel of that instant drops the output."""
    settings = make_settings(max_batch=4, max_wait_ms=LONG_WINDOW_MS, engine_overrides=f"encode_overlap={overlap}")
    lone = make_job(90, 90)
    api, queue = cancel_at_begin_pair(redis_server, lone.id)
    worker, runner, metrics = recording_worker(queue, tiny_runner, settings)

    async def scenario():
        async with running_worker(api, queue, worker):
            await api.submit(lone, wait=True)
            woken = await api.wait(lone.id, 60)
            while await api.depth("bfr"):  # until the worker has acknowledged the entry
                await asyncio.sleep(0.02)
            return woken, await api.result(lone.id)

    woken, stored = asyncio.run(scenario())
    assert woken.state == stored.state == "cancelled"
    assert len(runner.batches) == 1  # it computed (the check came back meanwhile) ...
    assert job_outcomes(metrics) == {"cancelled": 1.0}  # ... and dropped the output


def test_on_redis_a_small_upload_is_not_decoded_again_by_the_worker(redis_server, tiny_runner, make_settings):
    settings = make_settings(max_batch=4, max_wait_ms=LONG_WINDOW_MS)
    api, queue = redis_pair(redis_server, "w" + uuid.uuid4().hex[:8])
    worker = Worker(queue, lambda: tiny_runner, settings, Metrics())
    shipped = make_job(90, 90)
    shipped.pixels = np.full((90, 90, 3), 128, dtype=np.uint8)  # as the API decoded it
    shipped.image = shipped.image[: len(shipped.image) // 2]  # bytes a worker could not decode

    async def scenario():
        async with running_worker(api, queue, worker):
            await api.submit(shipped, wait=True)
            return await api.wait(shipped.id, 60)

    result = asyncio.run(scenario())
    assert result.state == "done" and (result.width, result.height) == (90, 90)


def test_on_redis_a_lone_job_the_worker_cannot_decode_fails_without_compute(redis_server, tiny_runner, make_settings):
    settings = make_settings(max_batch=4, max_wait_ms=LONG_WINDOW_MS)
    api, queue = redis_pair(redis_server, "w" + uuid.uuid4().hex[:8])
    runner = Recording(tiny_runner)
    worker = Worker(queue, lambda: runner, settings, Metrics())
    broken = make_job(90, 90)
    broken.image = broken.image[: len(broken.image) // 2]  # a truncated PNG (the API would refuse it)

    async def scenario():
        async with running_worker(api, queue, worker):
            await api.submit(broken, wait=True)
            return await api.wait(broken.id, 60), await api.state(broken.id)

    result, state = asyncio.run(scenario())
    assert result.state == state == "failed" and result.problem["status"] == 400
    assert runner.batches == []


def test_on_a_full_redis_the_worker_keeps_its_result_and_stores_it_once_there_is_room(
        own_redis_server, tiny_runner, make_settings):
    settings = make_settings(max_batch=4, max_wait_ms=LONG_WINDOW_MS, heartbeat_s=30.0)
    api, queue = redis_pair(own_redis_server, "w" + uuid.uuid4().hex[:8])
    computing, go_on = threading.Event(), threading.Event()
    worker, runner, metrics = recording_worker(queue, tiny_runner, settings)
    runner.on_batch = lambda: (computing.set(), go_on.wait(60))  # the batch waits for the test
    lone = make_job(90, 90)
    client = own_redis_server.client()

    def refused_writes() -> int:
        return int(client.info("errorstats").get("errorstat_OOM", {}).get("count", 0))

    async def scenario():
        async with running_worker(api, queue, worker) as task:
            await api.submit(lone, wait=True)
            await asyncio.to_thread(computing.wait, 60)
            while await api.state(lone.id) != "running":  # the check before compute is through
                await asyncio.sleep(0.01)
            own_redis_server.fill_up()
            go_on.set()  # the compute ends, and storing its result is refused
            while refused_writes() < 1:
                await asyncio.sleep(0.01)
            during = (await api.state(lone.id), task.done(), worker.crashed)
            own_redis_server.make_room()
            return during, await api.wait(lone.id, 30)

    (state, stopped, crashed), result = asyncio.run(scenario())
    assert state == "running" and not stopped and crashed is None  # waiting for room, not dead
    assert result is not None and result.state == "done"
    assert job_outcomes(metrics) == {"done": 1.0} and len(runner.batches) == 1
