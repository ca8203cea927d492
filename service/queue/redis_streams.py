"""The Redis Streams queue that joins `flowie api` processes and `flowie worker` processes.

Keys (``P`` = ``FLOWIE_KEY_PREFIX``)::

    P:jobs:{task}      stream, one per task; consumer group "workers"; entry = meta JSON + image bytes
                       (+ the decoded pixels of a small upload, raw uint8, so the worker need not decode)
    P:dead:{task}      dead-letter stream (meta of jobs that exhausted FLOWIE_MAX_DELIVERIES)
    P:job:{id}         hash: state, task, entry id, reply_to, progress JSON while it computes
                       (TTL: deadline + result TTL)
    P:result:{id}      hash: meta JSON + encoded image + trace JSON (TTL: FLOWIE_RESULT_TTL_S)
    P:reply:{api}      list of wake-ups for one API process (its listener BLPOPs it): a finished
                       job's id, or (when its submit asked for it) the id with the whole result
    P:workers          set of worker ids; P:worker:{id} their heartbeat (TTL 3 x heartbeat)
    P:spj:{task}       recent seconds per job (Retry-After estimates)

Why it is shaped like this:

* Admission is one Lua script (XLEN check + XADD + job hash), so API replicas cannot overshoot
  ``max_queue`` together. Depth counts waiting and delivered-but-unacknowledged entries, because
  finished entries are deleted from the stream when acknowledged.
* Wake-up: each API process owns one reply list and one listener connection doing BLPOP. A worker
  pushes the job id *after* storing the result, in the same script; a list keeps the push until
  it is popped, so a wake-up that arrives before the handler waits is not lost, and the number of
  connections does not grow with the number of waiting requests (they wait on in-process futures).
* Round trips on a request's path: admission (1 script), the worker's read, one script before
  compute ("which of these already have a result; mark the rest running"), one script to store
  and acknowledge, and the reply list's pop. The API does not look for a result before waiting
  when `submit` registered the wake-up (the push cannot be missed then), and a result of at most
  ``INLINE_REPLY_BYTES`` travels inside the wake-up itself (id, meta, trace and image joined by newlines),
  so the handler does not read it back; the result hash is stored all the same (GET /jobs, other
  API processes, duplicates). A job says whether its API takes such wake-ups (``reply_inline``),
  so processes of the previous release, which expect bare ids, keep working during an update.
* A small upload (at most ``SHIP_PIXELS_BYTES`` decoded) travels decoded too, beside its bytes:
  the API has decoded it already, and decoding it again in the worker cost about as much as the
  rest of the hop before compute. Its shape rides in the meta (``pixels_shape``), a key that
  processes of the previous release ignore (they decode ``image`` as before); a worker that finds
  no usable pixels decodes ``image``.
* Cancelling a job deletes its stream entry (after storing the "cancelled" result): a job
  cancelled while queued is never delivered. A worker that already holds it learns it from
  ``begin`` and skips it (or, for a lone job whose ``begin`` travels alongside its compute,
  drops the output: the stored "cancelled" result is kept).
* At-least-once: the result is stored and the entry acknowledged in one script (store first;
  a result that already exists is kept, so a duplicate delivery changes nothing). Workers keep
  the entries they hold fresh with ``XCLAIM ... JUSTID`` (resets idle time, not the delivery
  count) and reclaim entries idle past the visibility timeout with XAUTOCLAIM; past
  ``max_deliveries`` an entry is dead-lettered and its client gets a problem response.
* Memory: every job and result key has a TTL (deadline + ``result_ttl_s``; ``result_ttl_s``), a
  synchronous request's result is deleted once its handler has answered (`delivered`), and the
  streams hold at most ``max_queue`` entries per task. The deployment caps Redis with
  ``maxmemory`` and ``noeviction``: a full Redis refuses writes, so admission and result stores raise
  QueueUnavailableError ("redis is full") and the API answers 503 with Retry-After until TTLs and
  deliveries make room; queued jobs are never evicted silently.
* A Redis restart is survived when Redis persists (AOF): streams, groups and pending lists come
  back; clients see QueueUnavailableError (503) meanwhile and every process reconnects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.queue.base import (
    TERMINAL_STATES,
    Delivery,
    Job,
    JobQueue,
    JobResult,
    QueueFullError,
    QueueUnavailableError,
    retry_after_estimate,
)

log = logging.getLogger("flowie.service.queue")

GROUP = "workers"
REPLY_TTL_MS = 600_000
DEAD_LETTER_MAXLEN = 10_000
# Waits shorter than this (the batching window) are polled instead of a blocking XREADGROUP.
SHORT_WAIT_S = 0.2
SHORT_POLL_S = 0.002
# Results up to this size ride inside the wake-up of a handler that asked for it (saves reading the
# result back); larger ones are read from the result hash. The list keeps such an item at most
# REPLY_TTL_MS when the API process is gone.
INLINE_REPLY_BYTES = 1 << 20
# Decoded uploads up to this size travel beside their bytes (65,536 RGB pixels: the size the API and
# worker decode on their event loops, where decoding twice costs most against the hop).
SHIP_PIXELS_BYTES = 3 << 16
# Event-loop turns the reply listener yields after waking a handler (see `_listen`).
HANDOFF_TURNS = 6
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)
# A Redis that refuses writes for a while is treated like an outage: the API answers 503 with
# Retry-After and a worker keeps its job and tries again, instead of failing the request with a
# 500 or stopping the worker. It refuses them at its `maxmemory` with `noeviction` (the
# deployment's setting) until results expire, and as a replica (a client still connected to a
# primary that a failover demoted) until the client reconnects to the new primary.
FULL_RETRY_AFTER_S = 5.0

_SUBMIT = """
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {0, depth} end
local entry
if ARGV[7] ~= '' then
  entry = redis.call('XADD', KEYS[1], '*', 'meta', ARGV[2], 'image', ARGV[3], 'pixels', ARGV[7])
else
  entry = redis.call('XADD', KEYS[1], '*', 'meta', ARGV[2], 'image', ARGV[3])
end
redis.call('HSET', KEYS[2], 'state', 'queued', 'task', ARGV[4], 'entry', entry, 'reply_to', ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {1, depth + 1}
"""

# KEYS: result, job, stream, reply list. ARGV: meta, image, ttl_ms, state, job id,
# notify (1 = the job id, 2 = the id with the result, 0 = none), entry (1 = acknowledge and delete
# it: a worker finished it; 2 = delete it: a cancel, the entry is no longer work; 0 = leave it),
# group, entry id, reply list TTL ms, trace. A result that exists already is kept (and nobody is
# woken again).
_STORE = """
local stored = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'image', ARGV[2], 'trace', ARGV[11])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[2], 'state', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  if ARGV[6] == '1' then
    redis.call('LPUSH', KEYS[4], ARGV[5])
    redis.call('PEXPIRE', KEYS[4], ARGV[10])
  elseif ARGV[6] == '2' then
    redis.call('LPUSH', KEYS[4], ARGV[5] .. '\\n' .. ARGV[1] .. '\\n' .. ARGV[11] .. '\\n' .. ARGV[2])
    redis.call('PEXPIRE', KEYS[4], ARGV[10])
  end
  stored = 1
end
if ARGV[7] == '1' then
  redis.call('XACK', KEYS[3], ARGV[8], ARGV[9])
end
if ARGV[7] ~= '0' then
  redis.call('XDEL', KEYS[3], ARGV[9])
end
return stored
"""

# Before compute, one round trip. KEYS: result key, job key of each job, in pairs. Returns the
# 1-based positions of the jobs that already have a result (the worker skips them); the others
# are marked running. A job hash that has expired is not re-created (it would have no TTL).
_BEGIN = """
local finished = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    finished[#finished + 1] = (i + 1) / 2
  elseif redis.call('EXISTS', KEYS[i + 1]) == 1 then
    redis.call('HSET', KEYS[i + 1], 'state', 'running')
  end
end
return finished
"""


# A computing batch's progress (service.progress), one round trip. KEYS: the job key of each job;
# ARGV: the report JSON. Written only into the hashes of running jobs, so an expired hash is not
# re-created (it would have no TTL) and a finished job shows no progress.
_PROGRESS = """
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'state') == 'running' then
    redis.call('HSET', KEYS[i], 'progress', ARGV[1])
  end
end
return 0
"""

def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(job: Job) -> tuple[str, bytes]:
    """A stream entry's meta JSON and the raw pixels that travel with it (empty: none)."""
    pixels = job.pixels
    if pixels is None or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.nbytes > SHIP_PIXELS_BYTES:
        return job.meta_json(), b""
    meta = {**job.meta(), "pixels_shape": list(pixels.shape)}
    return json.dumps(meta, separators=(",", ":")), np.ascontiguousarray(pixels).tobytes()


def _shipped_pixels(shape: Any, data: bytes | None) -> np.ndarray | None:
    """The decoded upload that travelled with an entry, or None (then the worker decodes ``image``)."""
    if not data or not isinstance(shape, list) or len(shape) != 3 or shape[2] != 3:
        return None
    if not all(isinstance(n, int) and n > 0 for n in shape) or shape[0] * shape[1] * 3 != len(data):
        return None
    # A writable copy: the pipeline may work on its input in place.
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()


class RedisJobQueue(JobQueue):
    """JobQueue over Redis Streams (see the module docstring for the key layout)."""

    def __init__(self, url: str, *, tasks: list[str], prefix: str = "flowie", max_queue: int = 64,
                 result_ttl_s: float = 3600, visibility_timeout_s: float = 60, max_deliveries: int = 3,
                 max_connections: int = 32, instance_id: str | None = None, listen: bool = True) -> None:
        self.url = url
        self.tasks = list(tasks)
        self.prefix = prefix
        self.max_queue = max_queue
        self.result_ttl_ms = int(result_ttl_s * 1000)
        self.visibility_timeout_ms = int(visibility_timeout_s * 1000)
        self.max_deliveries = max_deliveries
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.listen = listen  # API processes wait for results; workers do not
        # A connection broken by a Redis restart is reconnected and the command retried (twice);
        # the scripts are idempotent enough for that (a result that exists is kept).
        common = {"socket_connect_timeout": 2.0, "health_check_interval": 10,
                  "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                  "retry_on_error": [RedisConnectionError]}
        # One pool shared by every command of this process, bounded; blocking reads use their own.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max(1, max_connections - 1), timeout=5.0, socket_timeout=10.0, **common)
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._listener_redis = aioredis.Redis.from_url(url, socket_timeout=10.0, **common)
        self._submit_script = self._redis.register_script(_SUBMIT)
        self._store_script = self._redis.register_script(_STORE)
        self._begin_script = self._redis.register_script(_BEGIN)
        self._progress_script = self._redis.register_script(_PROGRESS)
        # job id -> the handler's future: set to the result (inline wake-up) or to None (read it)
        self._waiters: dict[str, asyncio.Future[JobResult | None]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._groups_ready: set[str] = set()

    # --- keys -------------------------------------------------------------------------
    def stream_key(self, task: str) -> str:
        return f"{self.prefix}:jobs:{task}"

    def dead_key(self, task: str) -> str:
        return f"{self.prefix}:dead:{task}"

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def result_key(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def reply_key(self, instance_id: str) -> str:
        return f"{self.prefix}:reply:{instance_id}"

    def worker_key(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def workers_key(self) -> str:
        return f"{self.prefix}:workers"

    def spj_key(self, task: str) -> str:
        return f"{self.prefix}:spj:{task}"

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._closing = False
        try:
            await self._ensure_groups(self.tasks)
        except QueueUnavailableError as exc:  # the API may start before Redis; readiness says so
            log.warning("redis not reachable at start-up: %s", exc)
        if self.listen:
            self._listener = asyncio.create_task(self._listen(), name="flowie-reply-listener")

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing anyway
                pass
        for future in self._waiters.values():
            if not future.done():
                future.cancel()
        await self._listener_redis.aclose()
        await self._redis.aclose()
        await self._pool.disconnect()

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except _UNREACHABLE as exc:
            raise QueueUnavailableError(f"redis unreachable: {type(exc).__name__}") from exc
        except OutOfMemoryError as exc:
            raise QueueUnavailableError("redis is full (maxmemory reached; it refuses writes until results "
                                        "expire or memory is raised)", retry_after_s=FULL_RETRY_AFTER_S) from exc
        except ReadOnlyError as exc:
            # The connections may still lead to a primary that a failover demoted: drop them, so the
            # next command connects again (to wherever the URL's name leads now).
            await self._pool.disconnect()
            raise QueueUnavailableError("redis is a read-only replica (a failover?); writes are refused; "
                                        "reconnecting") from exc

    async def _ensure_groups(self, tasks: list[str], force: bool = False) -> None:
        for task in tasks:
            stream = self.stream_key(task)
            if stream in self._groups_ready and not force:
                continue
            try:
                # id 0: entries added before the group existed are delivered too.
                await self._call(self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True))
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups_ready.add(stream)

    # --- API side -----------------------------------------------------------------------
    async def submit(self, job: Job, *, wait: bool) -> int:
        if wait:
            job.reply_to, job.reply_inline = self.instance_id, True
            self._waiters[job.id] = asyncio.get_running_loop().create_future()
        ttl_ms = int(max(1.0, job.deadline - time.time()) * 1000) + self.result_ttl_ms
        meta, pixels = _entry(job)
        try:
            admitted, depth = await self._call(self._submit_script(
                keys=[self.stream_key(job.task), self.job_key(job.id)],
                args=[self.max_queue, meta, job.image, job.task, job.reply_to, ttl_ms, pixels]))
        except BaseException:
            self._waiters.pop(job.id, None)
            raise
        if not admitted:
            self._waiters.pop(job.id, None)
            workers = await self._safe(self.live_workers(), 1)
            spj = await self._safe(self.seconds_per_job(job.task), None)
            raise QueueFullError(job.task, int(depth), self.max_queue,
                                 retry_after_estimate(int(depth), spj, workers))
        return int(depth)

    async def _safe(self, coro: Any, default: Any) -> Any:
        try:
            return await coro
        except QueueUnavailableError:
            return default

    async def wait(self, job_id: str, timeout_s: float) -> JobResult | None:
        future = self._waiters.get(job_id)
        if future is None:  # register first, then look: a result stored in between is not missed
            future = self._waiters[job_id] = asyncio.get_running_loop().create_future()
            stored = await self.result(job_id)
            if stored is not None:
                self._waiters.pop(job_id, None)
                return stored
        # else `submit(wait=True)` registered the job before it was visible, with this process as
        # its reply_to: whoever stores its result pushes to our reply list, and the list keeps the
        # push until the listener pops it, so no look is needed (after a Redis restart that lost the
        # push, the listener's `_reconcile` wakes the handler).
        try:
            delivered = await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, timeout_s))
        except asyncio.TimeoutError:
            return None
        self._waiters.pop(job_id, None)
        return delivered if delivered is not None else await self.result(job_id)

    async def forget(self, job_id: str) -> None:
        future = self._waiters.pop(job_id, None)
        if future is not None and not future.done():
            future.cancel()

    def _wake(self, job_id: str, result: JobResult | None = None) -> None:
        future = self._waiters.get(job_id)
        if future is not None and not future.done():
            future.set_result(result)

    def _on_reply(self, item: bytes) -> None:
        """A reply-list item: a bare job id, or id, meta, trace and image joined by newlines (_STORE)."""
        if b"\n" not in item:
            self._wake(_text(item))
            return
        job_id, meta, trace, image = item.split(b"\n", 3)
        self._wake(_text(job_id), JobResult.from_meta(json.loads(meta), image,
                                                      json.loads(trace) if trace else None))

    async def _listen(self) -> None:
        """Pop finished job ids for this process and wake their handlers; survive Redis restarts."""
        key = self.reply_key(self.instance_id)
        backoff = 0.1
        lost_connection = False
        while not self._closing:
            try:
                item = await self._listener_redis.blpop([key], timeout=1)
                if lost_connection:
                    # Pushes may have been lost with a non-persistent Redis: look for results.
                    lost_connection = False
                    await self._reconcile()
                    log.info("redis reachable again; reply listener resumed")
                backoff = 0.1
                if item:
                    self._on_reply(item[1])
                    # Let the woken handler answer before this loop re-arms: its wake-up passes through
                    # a few callbacks (future, wait, the handler's task), and the next BLPOP's send
                    # would otherwise run first (about 0.2 ms here). A reply that comes meanwhile
                    # waits in the list.
                    for _ in range(HANDOFF_TURNS):
                        await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except (*_UNREACHABLE, ReadOnlyError) as exc:
                if not lost_connection:
                    log.warning("redis unreachable (%s); retrying", type(exc).__name__)
                lost_connection = True
                if isinstance(exc, ReadOnlyError):  # a demoted primary (see `_call`): connect again
                    await self._listener_redis.connection_pool.disconnect()
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
            except Exception:  # noqa: BLE001 - the listener must outlive any one bad reply
                log.exception("reply listener error")
                await asyncio.sleep(backoff)

    async def _reconcile(self) -> None:
        pending = [job_id for job_id, f in self._waiters.items() if not f.done()]
        if not pending:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in pending:
                pipe.exists(self.result_key(job_id))
            found = await pipe.execute()
        for job_id, exists in zip(pending, found, strict=True):
            if exists:
                self._wake(job_id)

    async def state(self, job_id: str) -> str | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.result_key(job_id), "meta")
            pipe.hget(self.job_key(job_id), "state")
            meta, state = await self._call(pipe.execute())
        if meta is not None:
            return str(json.loads(meta)["state"])
        return _text(state) if state is not None else None

    async def delivered(self, job_id: str) -> None:
        """Delete the answered job's result and job hash; while Redis is unreachable their TTL does it."""
        try:
            await self._call(self._redis.delete(self.result_key(job_id), self.job_key(job_id)))
        except QueueUnavailableError:
            pass

    async def result(self, job_id: str) -> JobResult | None:
        fields = await self._call(self._redis.hgetall(self.result_key(job_id)))
        if not fields or b"meta" not in fields:
            return None
        trace = json.loads(fields[b"trace"]) if fields.get(b"trace") else None
        return JobResult.from_meta(json.loads(fields[b"meta"]), fields.get(b"image", b""), trace)

    async def cancel(self, job_id: str, *, state: str = "cancelled", detail: str = "") -> str | None:
        current = await self.state(job_id)
        if current is None:
            return None
        if current in TERMINAL_STATES:
            await self._call(self._redis.delete(self.result_key(job_id)))
            return current
        job = await self._call(self._redis.hgetall(self.job_key(job_id)))
        task = _text(job.get(b"task", b""))
        reply_to = _text(job.get(b"reply_to", b""))
        entry = _text(job.get(b"entry", b"")) or None
        status, title, slug = (504, "Deadline exceeded", "deadline-exceeded") if state == "expired" \
            else (409, "Job cancelled", "job-cancelled")
        result = JobResult.failure(job_id, state, status, slug, title, detail or f"the job was {state}")
        # The entry leaves the stream, so no worker takes it now; one that holds it already finds
        # the result in `begin` and skips it.
        await self._store(result, task=task, reply_to=reply_to, ack=None, delete=entry)
        return await self.state(job_id)

    async def _store(self, result: JobResult, *, task: str, reply_to: str, ack: str | None,
                     inline: bool = False, delete: str | None = None) -> bool:
        """Store ``result`` unless one exists, wake ``reply_to`` (with the result itself when
        ``inline``: only for a job whose submit asked for it), acknowledge and delete entry ``ack``,
        or only delete entry ``delete``."""
        notify = ("2" if inline and len(result.image) <= INLINE_REPLY_BYTES else "1") if reply_to else "0"
        entry_mode, entry = ("1", ack) if ack else ("2", delete) if delete else ("0", "0-0")
        stored = await self._call(self._store_script(
            keys=[self.result_key(result.id), self.job_key(result.id), self.stream_key(task or "_"),
                  self.reply_key(reply_to or "_")],
            args=[result.meta_json(), result.image, self.result_ttl_ms, result.state, result.id,
                  notify, entry_mode, GROUP, entry, REPLY_TTL_MS,
                  json.dumps(result.trace(), separators=(",", ":"))]))
        if stored and reply_to == self.instance_id:
            self._wake(result.id, result)  # same process (cancel): no round trip needed
        return bool(stored)

    async def depth(self, task: str) -> int:
        return int(await self._call(self._redis.xlen(self.stream_key(task))))

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def live_workers(self) -> int:
        members = await self._call(self._redis.smembers(self.workers_key))
        if not members:
            return 0
        ids = sorted(_text(m) for m in members)
        async with self._redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.exists(self.worker_key(worker_id))
            alive = await self._call(pipe.execute())
        dead = [w for w, ok in zip(ids, alive, strict=True) if not ok]
        if dead:
            await self._call(self._redis.srem(self.workers_key, *dead))
        return sum(1 for ok in alive if ok)

    async def seconds_per_job(self, task: str) -> float | None:
        value = await self._call(self._redis.get(self.spj_key(task)))
        return float(value) if value is not None else None

    # --- worker side ----------------------------------------------------------------------
    def _delivery(self, task: str, entry_id: Any, fields: dict[bytes, bytes], deliveries: int) -> Delivery:
        meta = json.loads(fields[b"meta"])
        job = Job.from_meta(meta, fields.get(b"image", b""))
        job.task = task
        job.pixels = _shipped_pixels(meta.get("pixels_shape"), fields.get(b"pixels"))
        return Delivery(job=job, token=_text(entry_id), deliveries=deliveries)

    async def take(self, tasks: list[str], worker_id: str, max_n: int, timeout_s: float) -> list[Delivery]:
        await self._ensure_groups(tasks)
        streams = {self.stream_key(t): ">" for t in tasks}
        by_stream = {self.stream_key(t): t for t in tasks}
        try:
            if timeout_s >= SHORT_WAIT_S:
                response = await self._call(self._redis.xreadgroup(
                    GROUP, worker_id, streams, count=max_n, block=max(1, int(timeout_s * 1000))))
            else:
                # Redis ends a timed-out BLOCK only on its timer tick (every 1000/hz ms: 100 ms at the
                # default hz 10), which would stretch a 10 ms batching window to up to 110 ms. Short
                # windows are therefore polled here with non-blocking reads.
                deadline = time.monotonic() + timeout_s
                while True:
                    response = await self._call(self._redis.xreadgroup(GROUP, worker_id, streams, count=max_n))
                    left = deadline - time.monotonic()
                    if any(entries for _, entries in response or []) or left <= 0:
                        break
                    await asyncio.sleep(min(SHORT_POLL_S, left))
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis came back without our groups (no persistence)
                await self._ensure_groups(tasks, force=True)
                return []
            raise
        deliveries = []
        for stream, entries in response or []:
            task = by_stream[_text(stream)]
            for entry_id, fields in entries:
                if fields and b"meta" in fields:
                    deliveries.append(self._delivery(task, entry_id, fields, 1))
                else:  # deleted under us: nothing to do
                    await self._call(self._redis.xack(self.stream_key(task), GROUP, entry_id))
        return deliveries

    async def reclaim(self, tasks: list[str], worker_id: str, max_n: int) -> list[Delivery]:
        claimed: list[Delivery] = []
        for task in tasks:
            stream = self.stream_key(task)
            try:
                response = await self._call(self._redis.xautoclaim(
                    stream, GROUP, worker_id, self.visibility_timeout_ms, start_id="0-0", count=max_n))
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await self._ensure_groups([task], force=True)
                    continue
                raise
            entries = response[1] if len(response) > 1 else []
            for entry_id, fields in entries:
                if not fields or b"meta" not in fields:
                    await self._call(self._redis.xack(stream, GROUP, entry_id))
                    continue
                info = await self._call(self._redis.xpending_range(
                    stream, GROUP, min=entry_id, max=entry_id, count=1))
                deliveries = int(info[0]["times_delivered"]) if info else self.max_deliveries + 1
                delivery = self._delivery(task, entry_id, fields, deliveries)
                if deliveries > self.max_deliveries:
                    await self._dead_letter(delivery)
                else:
                    log.warning("reclaimed job %s (delivery %d)", delivery.job.id, deliveries,
                                extra={"job_id": delivery.job.id, "request_id": delivery.job.request_id})
                    claimed.append(delivery)
        return claimed

    async def _dead_letter(self, delivery: Delivery) -> None:
        job = delivery.job
        log.error("dead-lettering job %s after %d deliveries", job.id, delivery.deliveries,
                  extra={"job_id": job.id, "request_id": job.request_id})
        await self._call(self._redis.xadd(
            self.dead_key(job.task), {"meta": job.meta_json(), "deliveries": delivery.deliveries,
                                      "at": time.time()},
            maxlen=DEAD_LETTER_MAXLEN, approximate=True))
        result = JobResult.failure(
            job.id, "failed", 500, "dead-letter", "Job failed",
            f"the job was delivered {delivery.deliveries} times and no worker finished it "
            f"(limit {self.max_deliveries}); it was moved to the dead-letter stream",
            deliveries=delivery.deliveries)
        await self._store(result, task=job.task, reply_to=job.reply_to, ack=delivery.token)

    async def heartbeat(self, worker_id: str, info: dict[str, Any], held: list[Delivery], ttl_s: float) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self.worker_key(worker_id), json.dumps(info), px=int(ttl_s * 1000))
            pipe.sadd(self.workers_key, worker_id)
            by_stream: dict[str, list[str]] = {}
            for delivery in held:
                by_stream.setdefault(self.stream_key(delivery.job.task), []).append(delivery.token)
            for stream, ids in by_stream.items():
                # Resets the idle time of entries we hold without counting a delivery.
                pipe.xclaim(stream, GROUP, worker_id, 0, ids, justid=True)
            await self._call(pipe.execute(raise_on_error=False))

    async def leave(self, worker_id: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.worker_key(worker_id))
            pipe.srem(self.workers_key, worker_id)
            await self._call(pipe.execute())

    async def finished(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(self.result_key(job_id))
            found = await self._call(pipe.execute())
        return {job_id for job_id, exists in zip(job_ids, found, strict=True) if exists}

    async def mark_running(self, deliveries: list[Delivery]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for delivery in deliveries:
                pipe.hset(self.job_key(delivery.job.id), "state", "running")
            await self._call(pipe.execute())

    async def begin(self, deliveries: list[Delivery]) -> set[str]:
        if not deliveries:
            return set()
        keys = []
        for delivery in deliveries:
            keys += [self.result_key(delivery.job.id), self.job_key(delivery.job.id)]
        positions = await self._call(self._begin_script(keys=keys, args=[]))
        return {deliveries[int(i) - 1].job.id for i in positions or []}

    async def set_progress(self, job_ids: list[str], progress: dict[str, Any]) -> None:
        if job_ids:
            await self._call(self._progress_script(keys=[self.job_key(j) for j in job_ids],
                                                   args=[json.dumps(progress, separators=(",", ":"))]))

    async def progress(self, job_id: str) -> dict[str, Any] | None:
        state, report = await self._call(self._redis.hmget(self.job_key(job_id), ["state", "progress"]))
        if report is None or _text(state or b"") != "running":
            return None
        return dict(json.loads(report))

    async def finish(self, delivery: Delivery, result: JobResult) -> None:
        await self._store(result, task=delivery.job.task, reply_to=delivery.job.reply_to, ack=delivery.token,
                          inline=delivery.job.reply_inline)

    async def release(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            job = delivery.job
            stream = self.stream_key(job.task)
            meta, pixels = _entry(job)
            fields = {"meta": meta, "image": job.image, **({"pixels": pixels} if pixels else {})}
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(stream, fields)
                pipe.xack(stream, GROUP, delivery.token)
                pipe.xdel(stream, delivery.token)
                new_entry, *_ = await self._call(pipe.execute())
            await self._call(self._redis.hset(self.job_key(job.id), "entry", new_entry))

    async def record_seconds_per_job(self, task: str, seconds: float) -> None:
        await self._call(self._redis.set(self.spj_key(task), f"{seconds:.4f}", ex=3600))
