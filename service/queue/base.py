"""The queue between the HTTP handlers and the workers: one interface, two implementations.

`memory.MemoryJobQueue` keeps everything in one process (`flowie serve`); `redis_streams.
RedisJobQueue` joins any number of `flowie api` and `flowie worker` processes (docs/ARCHITECTURE.md, the queue).
Both give the same guarantees where one process allows them:

* admission control: `submit` refuses with `QueueFull` (carrying a Retry-After estimate) when a
  task has `max_queue` jobs waiting or in progress;
* a waiting handler is woken by the worker, never by polling, and cannot miss a wake-up that
  came before it started waiting (it is registered before the job becomes visible);
* a worker `finish`es a job by storing its result first and acknowledging it after; a result that
  already exists (cancelled, or done by another delivery) is kept. A job cancelled while queued is
  never computed (Redis: it leaves the stream); one cancelled just after a worker took it is
  skipped by the check before compute (`begin`), except a lone job, whose check the worker runs
  alongside compute: its output is then dropped;
* results are kept for `result_ttl_s`.

Torch-free: the API process imports this.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

TERMINAL_STATES = ("done", "failed", "cancelled", "expired")
STATES = ("queued", "running", *TERMINAL_STATES)


class QueueError(Exception):
    """Base of queue errors the HTTP layer turns into problem responses."""


class QueueFullError(QueueError):
    """The task's queue is at its bound; try again after ``retry_after_s`` seconds."""

    def __init__(self, task: str, depth: int, limit: int, retry_after_s: float) -> None:
        super().__init__(f"the {task!r} queue holds {depth} jobs (limit {limit}); try again later")
        self.task, self.depth, self.limit, self.retry_after_s = task, depth, limit, retry_after_s


class QueueUnavailableError(QueueError):
    """The queue back end cannot be reached (Redis down); try again after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    """One enhancement request as it travels to a worker.

    ``params`` holds every `flowie.params.EnhanceParams` field, filled (seed included);
    ``image`` is the upload as received (bounded by the request limits); ``pixels`` is the
    decoded array [H, W, 3] uint8 when the API has it: the in-memory queue hands it over as is,
    the Redis queue ships it beside ``image`` for small uploads (so the worker need not decode
    again); a worker without it decodes ``image``.
    """

    id: str
    task: str
    params: dict[str, Any]
    output_format: str
    quality: int | None
    image: bytes
    created_at: float  # unix seconds at admission (the upload is parsed and decoded by then)
    deadline: float  # unix seconds; past it the job is dropped
    request_id: str = ""
    reply_to: str = ""  # which API process waits for it (Redis mode)
    reply_inline: bool = False  # that process takes the result inside its wake-up (Redis mode)
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)

    def meta(self) -> dict[str, Any]:
        return {
            "id": self.id, "task": self.task, "params": self.params, "output_format": self.output_format,
            "quality": self.quality, "created_at": self.created_at, "deadline": self.deadline,
            "request_id": self.request_id, "reply_to": self.reply_to, "reply_inline": self.reply_inline,
        }

    def meta_json(self) -> str:
        return json.dumps(self.meta(), separators=(",", ":"))

    @classmethod
    def from_meta(cls, meta: dict[str, Any], image: bytes) -> Job:
        return cls(image=image, reply_inline=bool(meta.get("reply_inline", False)), **{k: meta[k] for k in (
            "id", "task", "params", "output_format", "quality", "created_at", "deadline",
            "request_id", "reply_to")})


@dataclass
class JobResult:
    """The outcome of a job: the encoded image when ``state == "done"``, else a problem body."""

    id: str
    state: str  # one of TERMINAL_STATES
    image: bytes = b""
    media_type: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    queue_s: float = 0.0  # admission -> compute start
    compute_s: float = 0.0  # this job's batch, wall clock
    batch_size: int = 0
    finished_at: float = 0.0  # unix seconds when the result was ready to store
    problem: dict[str, Any] | None = None  # status, title, slug, detail when not done
    # Tracing only (Server-Timing); kept out of `meta()` so that processes of the previous
    # release, which build results from `meta()` strictly, still read ours during a rolling update.
    pickup_s: float = 0.0  # admission -> a worker received the job (part of queue_s)
    # Whole photos: each restored face's box, score and 5 landmarks in output pixels (None: no
    # detection ran). Beside the trace for the same reason: older processes ignore it.
    faces: list[dict[str, Any]] | None = None

    TRACE_FIELDS: ClassVar[tuple[str, ...]] = ("pickup_s", "faces")

    def meta(self) -> dict[str, Any]:
        """The fields every release reads (not the image, not the trace), for JSON: a shallow view
        (`dataclasses.asdict` deep-copies, 20x slower, on the path of every result)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "image" and f.name not in self.TRACE_FIELDS}

    def meta_json(self) -> str:
        return json.dumps(self.meta(), separators=(",", ":"))

    def trace(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.TRACE_FIELDS}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], image: bytes = b"", trace: dict[str, Any] | None = None) -> JobResult:
        """Build from ``meta()`` (+ ``trace()``); keys this release does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**meta, **(trace or {})}.items() if k in known and k != "image"}
        return cls(image=image, **values)

    @classmethod
    def failure(cls, job_id: str, state: str, status: int, slug: str, title: str, detail: str,
                **extra: Any) -> JobResult:
        return cls(id=job_id, state=state, finished_at=time.time(),
                   problem={"status": status, "slug": slug, "title": title, "detail": detail, **extra})


@dataclass
class Delivery:
    """A job handed to a worker: ``token`` acknowledges it (a stream entry id in Redis)."""

    job: Job
    token: str
    deliveries: int = 1
    received_at: float = field(default_factory=time.monotonic)
    picked_at: float = field(default_factory=time.time)  # unix seconds, for the pickup time


def retry_after_estimate(depth: int, seconds_per_job: float | None, workers: int) -> float:
    """Seconds until a slot is likely free: queue depth x recent service time / workers, 1..120 s."""
    per_job = seconds_per_job if seconds_per_job and seconds_per_job > 0 else 1.0
    return float(min(120.0, max(1.0, depth * per_job / max(1, workers))))


class JobQueue(abc.ABC):
    """What the API handlers and the workers need from a queue (see the module docstring)."""

    # --- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections / start background tasks (inside the running event loop)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background tasks and close connections."""

    # --- API side -----------------------------------------------------------------
    @abc.abstractmethod
    async def submit(self, job: Job, *, wait: bool) -> int:
        """Admit ``job`` (QueueFullError / QueueUnavailableError otherwise); return the new depth.

        ``wait=True`` registers this process for the job's wake-up *before* the job is visible
        to workers, so a result that comes back at once is not missed.
        """

    @abc.abstractmethod
    async def wait(self, job_id: str, timeout_s: float) -> JobResult | None:
        """The job's result once it is stored, or None after ``timeout_s`` (no polling)."""

    @abc.abstractmethod
    async def forget(self, job_id: str) -> None:
        """Drop this process's wake-up registration (the handler stopped waiting)."""

    async def delivered(self, job_id: str) -> None:  # noqa: B027 - optional hook
        """The synchronous handler has answered with this job's result: drop the stored result (no
        one else asked for it). Default: keep it until its TTL."""

    def stored_results(self) -> tuple[int, int] | None:
        """(results, bytes of their images) this process holds, or None where they live elsewhere."""
        return None

    @abc.abstractmethod
    async def state(self, job_id: str) -> str | None:
        """queued | running | done | failed | cancelled | expired, or None for an unknown job."""

    @abc.abstractmethod
    async def result(self, job_id: str) -> JobResult | None:
        """The stored result, or None when there is none (yet, or any more)."""

    @abc.abstractmethod
    async def cancel(self, job_id: str, *, state: str = "cancelled", detail: str = "") -> str | None:
        """Stop a job that has not finished (its result becomes ``state``); delete a finished
        job's result. Return the job's state afterwards, or None for an unknown job."""

    @abc.abstractmethod
    async def depth(self, task: str) -> int:
        """Jobs of ``task`` waiting or in progress."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise QueueUnavailableError when the back end cannot be reached."""

    @abc.abstractmethod
    async def live_workers(self) -> int:
        """Workers whose heartbeat has not expired."""

    @abc.abstractmethod
    async def seconds_per_job(self, task: str) -> float | None:
        """Recent service time of one job of ``task`` (for Retry-After), if known."""

    # --- worker side ----------------------------------------------------------------
    @abc.abstractmethod
    async def take(self, tasks: list[str], worker_id: str, max_n: int, timeout_s: float) -> list[Delivery]:
        """Up to ``max_n`` new deliveries, waiting at most ``timeout_s`` for the first
        (``timeout_s=0``: only what is waiting now)."""

    async def reclaim(self, tasks: list[str], worker_id: str, max_n: int) -> list[Delivery]:
        """Deliveries abandoned by dead workers (idle past the visibility timeout); jobs past
        ``max_deliveries`` are dead-lettered here and their clients told. In-process: none."""
        return []

    @abc.abstractmethod
    async def heartbeat(self, worker_id: str, info: dict[str, Any], held: list[Delivery], ttl_s: float) -> None:
        """Mark the worker alive for ``ttl_s`` and keep ``held`` deliveries from being reclaimed."""

    @abc.abstractmethod
    async def leave(self, worker_id: str) -> None:
        """Remove the worker's heartbeat (graceful shutdown)."""

    @abc.abstractmethod
    async def finished(self, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` already have a result (cancelled, expired, done elsewhere)."""

    @abc.abstractmethod
    async def mark_running(self, deliveries: list[Delivery]) -> None:
        """Record that these jobs' compute started (GET /jobs shows `running`)."""

    async def begin(self, deliveries: list[Delivery]) -> set[str]:
        """Just before compute: the ids of ``deliveries`` that already have a result (cancelled,
        expired, done by another delivery: skip them); the others are marked running.

        What `finished` + `mark_running` do, in one step; the Redis queue makes it one round trip.
        """
        finished = await self.finished([d.job.id for d in deliveries])
        await self.mark_running([d for d in deliveries if d.job.id not in finished])
        return finished

    @abc.abstractmethod
    async def set_progress(self, job_ids: list[str], progress: dict[str, Any]) -> None:
        """Record where the running jobs ``job_ids`` are (a batch shares one report: stage, step,
        steps, tiles_done, tiles; jobs not running are left alone); one small write, a few times a
        second at most (service.progress)."""

    @abc.abstractmethod
    async def progress(self, job_id: str) -> dict[str, Any] | None:
        """The last progress report of a running job, or None."""

    @abc.abstractmethod
    async def finish(self, delivery: Delivery, result: JobResult) -> None:
        """Store ``result`` (unless one exists), wake the waiter, then acknowledge the delivery."""

    @abc.abstractmethod
    async def release(self, deliveries: list[Delivery]) -> None:
        """Give back deliveries whose compute never started, for other workers (shutdown)."""

    @abc.abstractmethod
    async def record_seconds_per_job(self, task: str, seconds: float) -> None:
        """Publish recent service time per job (exponential average) for Retry-After."""
