"""The in-process queue of `flowie serve`: the JobQueue interface on asyncio, one event loop.

Everything of the Redis queue that makes sense in one process holds: bounded admission with a
Retry-After estimate, wake-up by future registered before the job is visible, results with a
TTL, cancellation and deadlines checked by the worker before compute, graceful release.
There is nothing to reclaim: a dead worker here is a dead process.

Memory is bounded: live jobs by ``max_queue`` per task; stored results by count
(``max_results``) and by the bytes of their images (``max_result_bytes``), the oldest dropped
first (its job then reads as unknown, as after its TTL); a result the synchronous handler has
answered with is dropped at once (`delivered`), so sync traffic keeps nothing.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from service.queue.base import (
    TERMINAL_STATES,
    Delivery,
    Job,
    JobQueue,
    JobResult,
    QueueFullError,
    retry_after_estimate,
)

_EWMA = 0.3  # weight of the newest service-time sample


class MemoryJobQueue(JobQueue):
    def __init__(self, max_queue: int, result_ttl_s: float, max_results: int = 1024,
                 max_result_bytes: int = 256 << 20) -> None:
        self.max_queue = max_queue
        self.result_ttl_s = result_ttl_s
        self.max_results = max_results
        self.max_result_bytes = max_result_bytes
        self._result_bytes = 0  # sum of len(result.image) over self._results
        self._waiting: dict[str, collections.deque[Job]] = collections.defaultdict(collections.deque)
        self._in_flight: dict[str, Delivery] = {}
        self._states: dict[str, tuple[str, str, float]] = {}  # id -> (state, task, forget at)
        self._results: dict[str, tuple[JobResult, float]] = {}  # id -> (result, expires at)
        self._waiters: dict[str, asyncio.Future[JobResult]] = {}
        self._progress: dict[str, dict[str, Any]] = {}  # id -> last report, while the job computes
        self._available: asyncio.Event | None = None
        self._heartbeats: dict[str, float] = {}
        self._seconds_per_job: dict[str, float] = {}
        self._last_purge = 0.0

    def _event(self) -> asyncio.Event:
        if self._available is None:  # created lazily: it binds to the running loop
            self._available = asyncio.Event()
        return self._available

    def _purge(self) -> None:
        now = time.time()
        if now - self._last_purge < 1.0:
            return
        self._last_purge = now
        for job_id in [k for k, (_, expires) in self._results.items() if expires < now]:
            self._drop_result(job_id)
        for job_id in [k for k, (_, _, forget) in self._states.items() if forget < now]:
            del self._states[job_id]

    # --- API side -----------------------------------------------------------------
    async def submit(self, job: Job, *, wait: bool) -> int:
        self._purge()
        depth = await self.depth(job.task)
        if depth >= self.max_queue:
            retry = retry_after_estimate(depth, self._seconds_per_job.get(job.task), await self.live_workers())
            raise QueueFullError(job.task, depth, self.max_queue, retry)
        if wait:
            self._waiters[job.id] = asyncio.get_running_loop().create_future()
        forget_at = job.deadline + self.result_ttl_s
        self._states[job.id] = ("queued", job.task, forget_at)
        self._waiting[job.task].append(job)
        self._event().set()
        return depth + 1

    async def wait(self, job_id: str, timeout_s: float) -> JobResult | None:
        stored = await self.result(job_id)
        if stored is not None:
            return stored
        future = self._waiters.get(job_id)
        if future is None:
            future = self._waiters[job_id] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, timeout_s))
        except asyncio.TimeoutError:
            return None

    async def forget(self, job_id: str) -> None:
        future = self._waiters.pop(job_id, None)
        if future is not None and not future.done():
            future.cancel()

    async def state(self, job_id: str) -> str | None:
        self._purge()
        if job_id in self._results:
            return self._results[job_id][0].state
        entry = self._states.get(job_id)
        return entry[0] if entry else None

    async def result(self, job_id: str) -> JobResult | None:
        entry = self._results.get(job_id)
        if entry is None or entry[1] < time.time():
            return None
        return entry[0]

    async def cancel(self, job_id: str, *, state: str = "cancelled", detail: str = "") -> str | None:
        current = await self.state(job_id)
        if current is None:
            return None
        if current in TERMINAL_STATES:
            self._drop_result(job_id)
            return current
        task = self._states[job_id][1]
        self._waiting[task] = collections.deque(j for j in self._waiting[task] if j.id != job_id)
        status = 504 if state == "expired" else 409
        title = "Deadline exceeded" if state == "expired" else "Job cancelled"
        slug = "deadline-exceeded" if state == "expired" else "job-cancelled"
        self._store(JobResult.failure(job_id, state, status, slug, title, detail or f"the job was {state}"))
        return state

    async def depth(self, task: str) -> int:
        in_flight = sum(1 for d in self._in_flight.values() if d.job.task == task)
        return len(self._waiting.get(task, ())) + in_flight

    async def ping(self) -> None:
        return None

    async def live_workers(self) -> int:
        now = time.monotonic()
        return sum(1 for expires in self._heartbeats.values() if expires > now)

    async def seconds_per_job(self, task: str) -> float | None:
        return self._seconds_per_job.get(task)

    # --- worker side ----------------------------------------------------------------
    async def take(self, tasks: list[str], worker_id: str, max_n: int, timeout_s: float) -> list[Delivery]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        event = self._event()
        while True:
            taken: list[Delivery] = []
            for task in tasks:
                queue = self._waiting.get(task)
                while queue and len(taken) < max_n:
                    job = queue.popleft()
                    delivery = Delivery(job=job, token=job.id)
                    self._in_flight[job.id] = delivery
                    taken.append(delivery)
            if taken:
                return taken
            event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(event.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                return []

    async def heartbeat(self, worker_id: str, info: dict[str, Any], held: list[Delivery], ttl_s: float) -> None:
        self._heartbeats[worker_id] = time.monotonic() + ttl_s

    async def leave(self, worker_id: str) -> None:
        self._heartbeats.pop(worker_id, None)

    async def finished(self, job_ids: list[str]) -> set[str]:
        return {job_id for job_id in job_ids if job_id in self._results}

    async def mark_running(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            entry = self._states.get(delivery.job.id)
            if entry and entry[0] == "queued":
                self._states[delivery.job.id] = ("running", entry[1], entry[2])

    async def set_progress(self, job_ids: list[str], progress: dict[str, Any]) -> None:
        for job_id in job_ids:
            entry = self._states.get(job_id)
            if entry and entry[0] == "running" and job_id not in self._results:
                self._progress[job_id] = dict(progress)

    async def progress(self, job_id: str) -> dict[str, Any] | None:
        return self._progress.get(job_id)

    async def finish(self, delivery: Delivery, result: JobResult) -> None:
        if delivery.job.id not in self._results:
            self._store(result)
        self._in_flight.pop(delivery.job.id, None)

    def _store(self, result: JobResult) -> None:
        self._drop_result(result.id)
        self._results[result.id] = (result, time.time() + self.result_ttl_s)
        self._progress.pop(result.id, None)
        self._result_bytes += len(result.image)
        while len(self._results) > 1 and (len(self._results) > self.max_results
                                          or self._result_bytes > self.max_result_bytes):
            oldest = next(iter(self._results))  # dicts keep insertion order: the oldest first
            self._drop_result(oldest)
            self._states.pop(oldest, None)
        entry = self._states.get(result.id)
        if entry:
            self._states[result.id] = (result.state, entry[1], max(entry[2], time.time() + self.result_ttl_s))
        future = self._waiters.pop(result.id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _drop_result(self, job_id: str) -> None:
        entry = self._results.pop(job_id, None)
        if entry is not None:
            self._result_bytes -= len(entry[0].image)

    async def delivered(self, job_id: str) -> None:
        self._drop_result(job_id)
        self._states.pop(job_id, None)

    def stored_results(self) -> tuple[int, int]:
        return len(self._results), self._result_bytes

    async def release(self, deliveries: list[Delivery]) -> None:
        for delivery in reversed(deliveries):
            self._progress.pop(delivery.job.id, None)
            if self._in_flight.pop(delivery.job.id, None) is not None and delivery.job.id not in self._results:
                self._waiting[delivery.job.task].appendleft(delivery.job)
        if deliveries:
            self._event().set()

    async def record_seconds_per_job(self, task: str, seconds: float) -> None:
        old = self._seconds_per_job.get(task)
        self._seconds_per_job[task] = seconds if old is None else (1 - _EWMA) * old + _EWMA * seconds
