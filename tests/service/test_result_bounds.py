"""The queues hold bounded results: the in-process queue by count and bytes, a delivered sync result
not at all; Redis by TTL, with a delivered sync result deleted at once. One test drives a real
`flowie serve` process with a few hundred synchronous requests and reads what it holds from /metrics.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx
from svc_helpers import flowie, free_port, png, stop, wait_http

from service.queue.base import Delivery, Job, JobResult
from service.queue.memory import MemoryJobQueue

KEY = "bounds-test-key-0123456789abcdef"


def job() -> Job:
    now = time.time()
    return Job(id=uuid.uuid4().hex, task="bfr", params={}, output_format="png", quality=None, image=b"up",
               created_at=now, deadline=now + 60)


def done(job_id: str, size: int) -> JobResult:
    return JobResult(id=job_id, state="done", image=b"\0" * size, media_type="image/png", format="png")


async def run_jobs(queue: MemoryJobQueue, sizes: list[int]) -> list[str]:
    """Submit one job per size, and finish each with a result of that many image bytes."""
    ids = []
    for size in sizes:
        submitted = job()
        await queue.submit(submitted, wait=False)
        (delivery,) = await queue.take(["bfr"], "w", 1, 0)
        await queue.finish(delivery, done(delivery.job.id, size))
        ids.append(submitted.id)
    return ids


def test_the_in_process_queue_keeps_at_most_max_results_the_oldest_dropped_first():
    async def scenario():
        queue = MemoryJobQueue(8, 3600, max_results=3, max_result_bytes=1 << 20)
        ids = await run_jobs(queue, [10] * 5)
        assert queue.stored_results() == (3, 30)
        assert [await queue.state(i) for i in ids] == [None, None, "done", "done", "done"]
        assert (await queue.result(ids[-1])).image == b"\0" * 10

    asyncio.run(scenario())


def test_the_in_process_queue_keeps_at_most_max_result_bytes_of_images():
    async def scenario():
        queue = MemoryJobQueue(8, 3600, max_results=100, max_result_bytes=250)
        ids = await run_jobs(queue, [100, 100, 100])
        assert queue.stored_results() == (2, 200)  # 100 + 100 + 100 > 250: the first went
        ids += await run_jobs(queue, [40, 60])
        assert queue.stored_results() == (3, 200)  # 240 fits; 300 does not: the second went
        assert [await queue.result(i) is not None for i in ids] == [False, False, True, True, True]

    asyncio.run(scenario())


def test_a_delivered_sync_result_is_dropped_and_its_job_forgotten():
    async def scenario():
        queue = MemoryJobQueue(8, 3600)
        submitted = job()
        await queue.submit(submitted, wait=True)
        waiting = asyncio.ensure_future(queue.wait(submitted.id, 5))
        (delivery,) = await queue.take(["bfr"], "w", 1, 0)
        await queue.finish(delivery, done(submitted.id, 64))
        assert (await waiting).state == "done"
        assert queue.stored_results() == (1, 64)
        await queue.delivered(submitted.id)
        assert queue.stored_results() == (0, 0)
        assert await queue.state(submitted.id) is None

    asyncio.run(scenario())


def test_redis_deletes_a_delivered_result_and_gives_the_others_a_ttl(redis_server):
    from service.queue.redis_streams import RedisJobQueue

    async def scenario():
        prefix = f"bounds{uuid.uuid4().hex[:6]}"
        queue = RedisJobQueue(redis_server.url, tasks=["bfr"], prefix=prefix, max_queue=8, result_ttl_s=60,
                              listen=False)
        await queue.start()
        try:
            kept, answered = job(), job()
            for submitted in (kept, answered):
                await queue.submit(submitted, wait=False)
            deliveries: list[Delivery] = await queue.take(["bfr"], "w", 2, 1)
            for delivery in deliveries:
                await queue.finish(delivery, done(delivery.job.id, 16))
            await queue.delivered(answered.id)
            client = redis_server.client()
            assert not client.exists(queue.result_key(answered.id), queue.job_key(answered.id))
            assert 0 < client.ttl(queue.result_key(kept.id)) <= 60
            assert 0 < client.ttl(queue.job_key(kept.id)) <= 60 + 60
            assert await queue.state(answered.id) is None and await queue.state(kept.id) == "done"
        finally:
            await queue.close()

    asyncio.run(scenario())


def stored(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=5).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in ("flowie_stored_results", "flowie_stored_result_bytes")}


def test_serve_holds_no_delivered_sync_result_and_at_most_the_bound_of_the_others(tiny_model_dir, tmp_path):
    """256 sync requests (16 at a time) leave nothing stored; then 20 async ones leave exactly the bound."""
    port = free_port()
    process = flowie(["serve", "--model", str(tiny_model_dir), "--port", str(port)], tmp_path / "serve.log",
                     FLOWIE_API_KEYS=KEY, FLOWIE_MAX_STORED_RESULTS="5", FLOWIE_MAX_QUEUE="64",
                     FLOWIE_MAX_BATCH="8", FLOWIE_LOG_JSON="false")
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    image = png(32, 32)
    form = {"min_side": "128", "sampler": "restore_only"}
    try:
        wait_http(f"{base}/readyz", timeout=120, process=process)

        async def sync_requests(total: int, concurrency: int) -> list:
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
                gate = asyncio.Semaphore(concurrency)

                async def one() -> int:
                    async with gate:
                        answer = await client.post("/enhance", files={"image": ("a.png", image, "image/png")},
                                                   data=form)
                        return answer.status_code if answer.status_code == 200 else answer.text

                return list(await asyncio.gather(*(one() for _ in range(total))))

        samples: list[float] = []
        running = threading.Event()
        running.set()

        def sample() -> None:  # what the process holds while the requests run
            while running.is_set():
                samples.append(stored(base)["flowie_stored_results"])
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            statuses = asyncio.run(sync_requests(256, 16))
        finally:
            running.clear()
            sampler.join()
        assert statuses == [200] * 256
        assert len(samples) >= 10 and max(samples) <= 5
        assert stored(base) == {"flowie_stored_results": 0.0, "flowie_stored_result_bytes": 0.0}

        job_ids = []
        for _ in range(20):
            accepted = httpx.post(f"{base}/enhance", files={"image": ("a.png", image, "image/png")}, data=form,
                                  headers={**headers, "Prefer": "respond-async"}, timeout=30)
            assert accepted.status_code == 202
            job_ids.append(accepted.headers["Location"])
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}{job_ids[-1]}", headers=headers, timeout=5).json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held = stored(base)
        assert held["flowie_stored_results"] == 5
        assert httpx.get(f"{base}{job_ids[0]}", headers=headers, timeout=5).status_code == 404  # dropped first
        kept = [httpx.get(f"{base}{location}/result", headers=headers, timeout=5) for location in job_ids[-5:]]
        assert [answer.status_code for answer in kept] == [200] * 5
        assert held["flowie_stored_result_bytes"] == sum(len(answer.content) for answer in kept)
    finally:
        stop(process)
