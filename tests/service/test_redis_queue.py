"""The Redis Streams queue against a real redis-server: wake-ups, at-least-once, dead letters, bounds.

These drive `RedisJobQueue` directly (no model): each test plays API and workers itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import pytest

from service.queue import redis_streams
from service.queue.base import Job, JobResult, QueueFullError, QueueUnavailableError
from service.queue.redis_streams import RedisJobQueue


def make_queue(redis_server, prefix: str, **kwargs) -> RedisJobQueue:
    options = {"max_queue": 50, "visibility_timeout_s": 0.3, "max_deliveries": 2, "result_ttl_s": 60}
    options.update(kwargs)
    return RedisJobQueue(redis_server.url, tasks=["bfr"], prefix=prefix, **options)


@contextlib.asynccontextmanager
async def worker_queue(redis_server, prefix: str):
    """A started worker-side queue (no wake-up listener), closed afterwards."""
    q = make_queue(redis_server, prefix, listen=False)
    await q.start()
    try:
        yield q
    finally:
        await q.close()


@contextlib.asynccontextmanager
async def api_and_worker(redis_server, prefix: str, **api_kwargs):
    """An API-side queue (listening for wake-ups) and a worker-side one on the same prefix, started and closed."""
    api, worker = make_queue(redis_server, prefix, **api_kwargs), make_queue(redis_server, prefix, listen=False)
    await api.start()
    await worker.start()
    try:
        yield api, worker
    finally:
        await api.close()
        await worker.close()


def job(deadline_s: float = 60) -> Job:
    now = time.time()
    return Job(id=uuid.uuid4().hex, task="bfr", params={"seed": 1}, output_format="png", quality=None,
               image=b"\x89PNG-bytes", created_at=now, deadline=now + deadline_s, request_id="r")


def done(job_id: str) -> JobResult:
    return JobResult(id=job_id, state="done", image=b"result", media_type="image/png", format="png", seed=1)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture()
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:8]


def test_a_result_stored_before_the_handler_waits_still_wakes_it(redis_server, prefix):
    async def scenario():
        async with api_and_worker(redis_server, prefix) as (api, worker):
            j = job()
            await api.submit(j, wait=True)
            [delivery] = await worker.take(["bfr"], "w1", 4, 1.0)
            await worker.finish(delivery, done(j.id))
            await asyncio.sleep(0.2)  # the wake-up arrives before anyone waits
            started = time.monotonic()
            result = await api.wait(j.id, timeout_s=5)
            assert result is not None and result.image == b"result"
            assert time.monotonic() - started < 1.0
            assert await api.state(j.id) == "done"
            assert await api.depth("bfr") == 0  # acknowledged and deleted from the stream

    run(scenario())


def test_many_waiting_requests_share_a_bounded_number_of_connections(redis_server, prefix):
    async def scenario():
        async with api_and_worker(redis_server, prefix, max_connections=4) as (api, worker):
            jobs = [job() for _ in range(40)]
            for j in jobs:
                await api.submit(j, wait=True)
            waits = [asyncio.ensure_future(api.wait(j.id, timeout_s=20)) for j in jobs]
            await asyncio.sleep(0.2)
            clients = redis_server.client().client_list()
            assert len(clients) <= 4 + 2 + 1, len(clients)  # api pool + listener, worker, this probe
            for _ in range(20):
                for delivery in await worker.take(["bfr"], "w1", 10, 0.5):
                    await worker.finish(delivery, done(delivery.job.id))
                if all(w.done() for w in waits):
                    break
            results = await asyncio.gather(*waits)
            assert all(r is not None and r.state == "done" for r in results)

    run(scenario())


def test_abandoned_job_is_reclaimed_and_a_late_duplicate_changes_nothing(redis_server, prefix):
    async def scenario():
        async with worker_queue(redis_server, prefix) as q:
            j = job()
            await q.submit(j, wait=False)
            [first] = await q.take(["bfr"], "dies", 1, 1.0)
            assert await q.reclaim(["bfr"], "alive", 4) == []  # not idle long enough yet
            await asyncio.sleep(0.4)
            [again] = await q.reclaim(["bfr"], "alive", 4)
            assert again.job.id == j.id and again.deliveries == 2
            await q.finish(again, done(j.id))
            late = JobResult(id=j.id, state="done", image=b"late duplicate")
            await q.finish(first, late)  # the "dead" worker wakes up after all
            assert (await q.result(j.id)).image == b"result"

    run(scenario())


def test_heartbeats_keep_a_long_batch_from_being_stolen(redis_server, prefix):
    async def scenario():
        async with worker_queue(redis_server, prefix) as q:
            await q.submit(job(), wait=False)
            held = await q.take(["bfr"], "busy", 1, 1.0)
            for _ in range(5):  # 0.5 s > visibility timeout, with a heartbeat every 0.1 s
                await q.heartbeat("busy", {"id": "busy"}, held, ttl_s=1)
                await asyncio.sleep(0.1)
                assert await q.reclaim(["bfr"], "thief", 4) == []
            assert await q.live_workers() == 1
            await q.leave("busy")
            assert await q.live_workers() == 0

    run(scenario())


def test_job_past_max_deliveries_is_dead_lettered_and_its_client_told(redis_server, prefix):
    async def scenario():
        api = make_queue(redis_server, prefix)
        q = make_queue(redis_server, prefix, listen=False)
        await api.start()
        await q.start()
        try:
            j = job()
            await api.submit(j, wait=True)
            await q.take(["bfr"], "w1", 1, 1.0)  # delivery 1: dies
            await asyncio.sleep(0.4)
            assert len(await q.reclaim(["bfr"], "w2", 4)) == 1  # delivery 2: dies
            await asyncio.sleep(0.4)
            assert await q.reclaim(["bfr"], "w3", 4) == []  # delivery 3 > 2: dead letter
            result = await api.wait(j.id, timeout_s=5)
            assert result is not None and result.state == "failed"
            assert result.problem["slug"] == "dead-letter" and result.problem["status"] == 500
            r = redis_server.client()
            assert r.xlen(f"{prefix}:dead:bfr") == 1 and r.xlen(f"{prefix}:jobs:bfr") == 0
        finally:
            await api.close()
            await q.close()

    run(scenario())


def test_admission_bound_holds_across_concurrent_submitters(redis_server, prefix):
    async def scenario():
        replicas = [make_queue(redis_server, prefix, max_queue=3) for _ in range(3)]
        for replica in replicas:
            await replica.start()
        try:
            outcomes = await asyncio.gather(*(replicas[i % 3].submit(job(), wait=False) for i in range(12)),
                                            return_exceptions=True)
            full = [o for o in outcomes if isinstance(o, QueueFullError)]
            assert len(full) == 9 and all(e.retry_after_s >= 1 for e in full)
            assert await replicas[0].depth("bfr") == 3
        finally:
            for replica in replicas:
                await replica.close()

    run(scenario())


def test_cancelled_and_released_jobs(redis_server, prefix):
    async def scenario():
        async with worker_queue(redis_server, prefix) as q:
            queued, held, handed_back = job(), job(), job()
            await q.submit(queued, wait=False)
            assert await q.cancel(queued.id) == "cancelled"
            assert await q.depth("bfr") == 0  # a job cancelled while queued leaves the stream
            await q.submit(held, wait=False)
            await q.submit(handed_back, wait=False)
            taken = await q.take(["bfr"], "w1", 3, 1.0)
            assert [d.job.id for d in taken] == [held.id, handed_back.id]  # never delivered
            assert await q.cancel(held.id) == "cancelled"  # cancelled in a worker's hands
            assert await q.finished([d.job.id for d in taken]) == {held.id}
            await q.release([d for d in taken if d.job.id == handed_back.id])
            [again] = await q.take(["bfr"], "w2", 2, 1.0)  # at once, no visibility timeout
            assert again.job.id == handed_back.id
            assert await q.cancel("0" * 32) is None
            assert (await q.result(queued.id)).state == "cancelled"

    run(scenario())


def test_begin_skips_jobs_with_a_result_and_marks_the_rest_running_in_one_call(redis_server, prefix):
    async def scenario():
        async with worker_queue(redis_server, prefix) as q:
            cancelled, alive, expired_hash = job(), job(), job()
            for j in (cancelled, alive, expired_hash):
                await q.submit(j, wait=False)
            taken = await q.take(["bfr"], "w1", 3, 1.0)
            assert len(taken) == 3
            await q.cancel(cancelled.id)  # after the worker took it, before its compute
            redis_server.client().delete(q.job_key(expired_hash.id))  # its hash's TTL ran out
            assert await q.begin(taken) == {cancelled.id}
            assert await q.state(alive.id) == "running"
            assert await q.state(cancelled.id) == "cancelled"
            assert not redis_server.client().exists(q.job_key(expired_hash.id))  # not re-created without a TTL
            assert await q.begin([]) == set()

    run(scenario())


def test_a_result_stored_before_an_unregistered_wait_is_found(redis_server, prefix):
    async def scenario():
        async with api_and_worker(redis_server, prefix) as (api, worker):
            j = job()
            await api.submit(j, wait=False)  # nobody registered: wait() must look for the result itself
            [delivery] = await worker.take(["bfr"], "w1", 4, 1.0)
            await worker.finish(delivery, done(j.id))
            result = await api.wait(j.id, timeout_s=5)
            assert result is not None and result.image == b"result"

    run(scenario())


def test_trace_timings_travel_beside_the_result_meta_that_older_readers_parse(redis_server, prefix):
    async def scenario():
        async with worker_queue(redis_server, prefix) as q:
            j = job()
            await q.submit(j, wait=False)
            [delivery] = await q.take(["bfr"], "w1", 1, 1.0)
            result = done(j.id)
            result.pickup_s, result.queue_s = 0.0012, 0.003
            await q.finish(delivery, result)
            stored = await q.result(j.id)
            assert stored.pickup_s == 0.0012 and stored.queue_s == 0.003
            meta = json.loads(redis_server.client().hget(q.result_key(j.id), "meta"))
            # A reader of the previous release builds JobResult(**meta) strictly: only fields it knows.
            assert "pickup_s" not in meta and set(meta) <= OLD_RESULT_FIELDS

    run(scenario())


OLD_RESULT_FIELDS = {"id", "state", "media_type", "format", "width", "height", "seed", "timings", "queue_s",
                     "compute_s", "batch_size", "finished_at", "problem"}


def test_results_with_fields_this_release_does_not_know_still_parse():
    meta = {**done("x").meta(), "some_future_field": 1}
    assert JobResult.from_meta(meta, b"img").image == b"img"
    assert JobResult.from_meta({k: v for k, v in meta.items() if k != "timings"}).timings == {}


@pytest.mark.parametrize("inline_limit", [1 << 20, 4], ids=["inside-the-wake-up", "too-large-read-back"])
def test_a_waiting_handler_gets_the_stored_result_small_or_large(redis_server, prefix, monkeypatch, inline_limit):
    monkeypatch.setattr(redis_streams, "INLINE_REPLY_BYTES", inline_limit)

    async def scenario():
        async with api_and_worker(redis_server, prefix) as (api, worker):
            j = job()
            await api.submit(j, wait=True)
            [delivery] = await worker.take(["bfr"], "w1", 4, 1.0)
            assert delivery.job.reply_inline and delivery.job.reply_to == api.instance_id
            result = done(j.id)
            result.image = b"line one\nline two\n\x00"  # newlines inside the image bytes
            result.pickup_s = 0.002
            await worker.finish(delivery, result)
            got = await api.wait(j.id, timeout_s=5)
            assert got is not None and got.image == result.image and got.pickup_s == 0.002
            assert got.meta() == (await api.result(j.id)).meta()  # the same as the stored result

    run(scenario())


def test_jobs_of_an_api_that_expects_bare_ids_are_woken_with_bare_ids(redis_server, prefix):
    """A worker of this release and an API of the previous one (no `reply_inline` in the job)."""
    async def scenario():
        async with api_and_worker(redis_server, prefix) as (api, worker):
            j = job()
            j.reply_to = "old-api"  # submitted as the previous release does: reply_to, no reply_inline
            await api.submit(j, wait=False)
            [delivery] = await worker.take(["bfr"], "w1", 4, 1.0)
            assert not delivery.job.reply_inline
            await worker.finish(delivery, done(j.id))
            assert redis_server.client().lrange(api.reply_key("old-api"), 0, -1) == [j.id.encode()]

    run(scenario())


def pixels(height: int, width: int):
    import numpy as np

    return np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)


def test_a_small_upload_travels_decoded_and_a_large_one_as_bytes_only(redis_server, prefix):
    async def scenario():
        async with worker_queue(redis_server, prefix) as q:
            small, large, released = job(), job(), job()
            small.pixels = pixels(64, 48)
            large.pixels = pixels(300, 300)  # 270,000 bytes decoded: the worker decodes the upload
            released.pixels = pixels(8, 8)
            for j in (small, large, released):
                await q.submit(j, wait=False)
            got = {d.job.id: d for d in await q.take(["bfr"], "w1", 3, 1.0)}
            assert got[small.id].job.pixels.tolist() == small.pixels.tolist()
            assert got[small.id].job.pixels.flags.writeable
            assert got[large.id].job.pixels is None and got[large.id].job.image == large.image
            await q.release([got[released.id]])  # handed back: the pixels go with it
            [again] = await q.take(["bfr"], "w2", 1, 1.0)
            assert again.job.pixels.tolist() == released.pixels.tolist()
            fields = redis_server.client().xrange(q.stream_key("bfr"))[0][1]
            meta = json.loads(fields[b"meta"])
            assert meta["pixels_shape"] == [64, 48, 3] and fields[b"image"] == small.image
            # A worker of the previous release reads the same entry: the upload, and a meta it accepts.
            assert Job.from_meta(meta, fields[b"image"]).image == small.image

    run(scenario())


@pytest.mark.parametrize("shape", [[64, 48], [64, 48, 4], [48, 64, 3], [64, "48", 3], None],
                         ids=["two-dims", "four-channels", "wrong-size", "not-ints", "missing"])
def test_shipped_pixels_that_do_not_fit_their_shape_are_ignored(shape):
    data = pixels(64, 48).tobytes()
    if shape == [48, 64, 3]:
        data = data[:-3]
    assert redis_streams._shipped_pixels(shape, data) is None
    assert redis_streams._shipped_pixels([64, 48, 3], data[:-1]) is None
    assert redis_streams._shipped_pixels([64, 48, 3], pixels(64, 48).tobytes()).shape == (64, 48, 3)


def test_a_full_redis_makes_the_queue_unavailable_for_a_while_not_broken(own_redis_server, prefix):
    """At maxmemory with noeviction Redis refuses writes: callers get QueueUnavailableError (the API's
    503 + Retry-After, the worker's back-off), never Redis's own error (a 500, a stopped worker)."""
    async def scenario():
        async with api_and_worker(own_redis_server, prefix) as (api, worker):
            queued = job()
            await api.submit(queued, wait=True)
            [delivery] = await worker.take(["bfr"], "w1", 1, 1.0)
            own_redis_server.fill_up()
            refused = []
            for call in (api.submit(job(), wait=False), worker.begin([delivery]),
                         worker.finish(delivery, done(queued.id)), api.cancel(queued.id)):
                with pytest.raises(QueueUnavailableError, match="redis is full") as caught:
                    await call
                refused.append(caught.value.retry_after_s)
            assert await api.state(queued.id) == "queued"  # reads still work
            own_redis_server.make_room()
            await worker.finish(delivery, done(queued.id))  # the worker's retry
            result = await api.wait(queued.id, timeout_s=5)
            return refused, result

    refused, result = run(scenario())
    assert refused == [redis_streams.FULL_RETRY_AFTER_S] * 4
    assert result is not None and result.state == "done"


def test_a_redis_demoted_to_a_replica_makes_the_queue_unavailable_not_broken(own_redis_server, prefix):
    """After a failover, a client still on the old primary gets READONLY: an outage, not an error."""
    async def scenario():
        async with api_and_worker(own_redis_server, prefix) as (api, worker):
            queued = job()
            await api.submit(queued, wait=True)
            [delivery] = await worker.take(["bfr"], "w1", 1, 1.0)
            connection_before = await worker._redis.client_id()
            own_redis_server.client().replicaof("127.0.0.1", "1")  # a primary that is not there
            try:
                for call in (api.submit(job(), wait=False), worker.take(["bfr"], "w1", 1, 0.0),
                             worker.finish(delivery, done(queued.id))):
                    with pytest.raises(QueueUnavailableError, match="read-only replica"):
                        await call
            finally:
                own_redis_server.client().replicaof("NO", "ONE")
            connection_after = await worker._redis.client_id()
            await worker.finish(delivery, done(queued.id))  # the worker's retry
            return connection_before, connection_after, await api.wait(queued.id, timeout_s=5)

    before, after, result = run(scenario())
    assert after != before  # the connections to the demoted server were dropped, not kept
    assert result is not None and result.state == "done"
