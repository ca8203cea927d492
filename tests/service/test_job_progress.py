"""Job progress: the pipeline reports stage, step and tiles; the worker writes them to the queue a few
times a second; GET /jobs/{id} shows them for a running job, in the memory and the Redis queue alike
(a real redis-server)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from svc_helpers import png

from flowie import tiling
from flowie.params import EnhanceParams
from flowie.progress import Progress, watching
from service.queue.base import Job, JobResult
from service.queue.memory import MemoryJobQueue
from service.queue.redis_streams import RedisJobQueue

# About 2 s of flow steps on the tiny model on a 2-core CPU: several reports at 4 a second.
SLOW = {"min_side": "128", "sampler": "euler", "steps": "40"}


class StageLog(Progress):
    """A Progress that also keeps every stage it was told, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stages: list[str] = []

    def stage(self, name: str) -> None:
        self.stages.append(name)
        super().stage(name)


def test_a_tiled_network_reports_its_tiles_to_the_watcher():
    # 20 px with 8 px tiles at stride 6: tiles start at 0, 6 and 12 on each axis, 9 tiles in all.
    seen: list[tuple[int, int]] = []

    class TileLog(Progress):
        def tiles(self, done: int, total: int) -> None:
            seen.append((done, total))
            super().tiles(done, total)

    with watching(TileLog()) as progress:
        tiling.tiled_apply(lambda x: x * 2, [torch.ones(1, 1, 20, 20)], tile=8, stride=6)
    assert seen[-1] == (9, 9) and [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert progress.snapshot()[1]["tiles_done"] == 9
    reports = len(seen)
    tiling.tiled_apply(lambda x: x * 2, [torch.ones(1, 1, 20, 20)], tile=8, stride=6)  # nobody watching now
    assert len(seen) == reports


def test_the_pipeline_reports_each_stage_in_order_and_every_sampler_step(tiny_runner):
    image = np.full((64, 64, 3), 120, dtype=np.uint8)
    params = EnhanceParams(sampler="euler", steps=3, min_side=128)
    with watching(StageLog()) as progress:
        tiny_runner.enhance(tiny_runner.tasks[0], [image], params, [5])
    assert progress.stages == ["swinir", "cond_encoder", "flow_unet", "vae_decoder", "colour_fix"]
    _, report = progress.snapshot()
    assert (report["step"], report["steps"]) == (3, 3)


def _job() -> Job:
    now = time.time()
    return Job(id=uuid.uuid4().hex, task="bfr", params={"seed": 1}, output_format="png", quality=None,
               image=b"\x89PNG-bytes", created_at=now, deadline=now + 60, request_id="r")


REPORT = {"stage": "flow_unet", "step": 2, "steps": 4, "tiles_done": 3, "tiles": 6}


async def _progress_round_trip(api: Any, worker: Any) -> None:
    """Submit two jobs, take one: only the taken one keeps a report; it is gone once finished."""
    taken, waiting = _job(), _job()
    await api.submit(taken, wait=False)
    [delivery] = await worker.take(["bfr"], "w1", 1, 1.0)
    await api.submit(waiting, wait=False)
    assert await worker.begin([delivery]) == set()
    await worker.set_progress([taken.id, waiting.id], REPORT)
    assert await api.progress(taken.id) == REPORT
    assert await api.progress(waiting.id) is None  # queued, not computing: nothing was written for it
    await worker.finish(delivery, JobResult(id=taken.id, state="done", image=b"x", media_type="image/png",
                                            format="png", seed=1))
    assert await api.progress(taken.id) is None
    await worker.set_progress([taken.id], REPORT)  # a late report of a finished job changes nothing
    assert await api.progress(taken.id) is None
    assert await api.progress("no-such-job") is None


def test_the_memory_queue_keeps_the_progress_of_computing_jobs_only():
    queue = MemoryJobQueue(max_queue=8, result_ttl_s=60)
    asyncio.run(_progress_round_trip(queue, queue))


def test_the_redis_queue_keeps_the_progress_of_computing_jobs_only(redis_server):
    async def scenario() -> None:
        prefix = "p" + uuid.uuid4().hex[:8]
        api = RedisJobQueue(redis_server.url, tasks=["bfr"], prefix=prefix)
        worker = RedisJobQueue(redis_server.url, tasks=["bfr"], prefix=prefix, listen=False)
        await api.start()
        await worker.start()
        try:
            await _progress_round_trip(api, worker)
            # A report for a job whose hash has expired does not bring the hash back.
            gone = uuid.uuid4().hex
            await worker.set_progress([gone], REPORT)
            assert redis_server.client().exists(worker.job_key(gone)) == 0
        finally:
            await api.close()
            await worker.close()

    asyncio.run(scenario())


def _watch_a_slow_job(client: TestClient) -> list[dict[str, Any]]:
    """Submit a slow job asynchronously and poll it until done: the progress reports seen, in order."""
    accepted = client.post("/enhance", files={"image": ("a.png", png(96, 80), "image/png")}, data=SLOW,
                           headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job_id}")
        if status.status_code == 200:
            assert "progress" not in status.json()  # a finished job reports its result, not progress
            return seen
        assert status.status_code == 202, status.text
        if "progress" in status.json():
            assert status.json()["status"] == "running"
            seen.append(status.json()["progress"])
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish; progress seen: {seen}")


def _check_reports(seen: list[dict[str, Any]]) -> None:
    in_flow = [p for p in seen if p["stage"] == "flow_unet"]
    # Entering the stage reports 0 of 0 (no step done yet); every later report counts steps of 40.
    started = [i for i, p in enumerate(in_flow) if p["steps"] == 0]
    assert all(p["step"] == 0 for p in in_flow if p["steps"] == 0), seen
    assert started == list(range(len(started))), seen  # only before the first counted step
    flow = in_flow[len(started):]
    assert len({p["step"] for p in flow}) >= 2, seen  # it moved while we watched
    assert all(p["steps"] == 40 and 1 <= p["step"] <= 40 for p in flow), seen
    steps = [p["step"] for p in flow]
    assert steps == sorted(steps), seen
    assert all(p["tiles"] == 0 and p["tiles_done"] == 0 for p in seen), seen  # 128 px: not tiled


def test_get_jobs_shows_a_running_jobs_progress_on_the_memory_queue(client):
    _check_reports(_watch_a_slow_job(client))


def test_get_jobs_shows_a_running_jobs_progress_on_the_redis_queue(redis_server, make_app):
    queue = RedisJobQueue(redis_server.url, tasks=["bfr"], prefix="p" + uuid.uuid4().hex[:8])
    with TestClient(make_app(queue=queue)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.05)
        _check_reports(_watch_a_slow_job(client))


def test_the_worker_writes_progress_only_when_it_changed():
    from service.progress import publishing

    interval_s = 0.05

    class CountingQueue(MemoryJobQueue):
        def __init__(self) -> None:
            super().__init__(max_queue=8, result_ttl_s=60)
            self.writes: list[dict[str, Any]] = []

        async def set_progress(self, job_ids, progress):
            self.writes.append(progress)

    async def scenario() -> list[dict[str, Any]]:
        queue = CountingQueue()
        async with publishing(queue, ["j"], interval_s=interval_s) as progress:
            progress.stage("swinir")
            await asyncio.sleep(interval_s * 4)  # several intervals, one change: one write
            progress.step(1, 4)
            await asyncio.sleep(interval_s * 3)
        await asyncio.sleep(interval_s * 2)  # the block ended: no more writes
        return queue.writes

    writes = asyncio.run(scenario())
    assert [(w["stage"], w["step"]) for w in writes] == [("swinir", 0), ("swinir", 1)]
