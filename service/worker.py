"""The worker: takes jobs from the queue, batches them dynamically, runs the pipeline, stores results.

Batching: jobs are grouped by (task, every parameter except the seed, padded work shape). The
worker waits for batch mates (until the oldest job's group holds ``max_batch`` jobs or the oldest
job has waited ``max_wait_ms``) only when more work is likely: when jobs were already queued as it
came back from its previous batch, when one read brought several jobs, or when jobs are left in
its buffer. A job that arrives at an idle worker is a lone job and starts at once, without paying
the window. The window is kept by the worker's clock: it asks `JobQueue.take` for the time left,
and the Redis queue polls waits that short with non-blocking reads instead of a blocking read,
whose timeout Redis ends only on its timer tick (up to 100 ms late at its default ``hz 10``).
Other groups wait in a local buffer of at most ``batch_lookahead`` jobs (kept alive by heartbeats):
coming back from a batch to a backlog, the worker reads that far ahead, so a mixed workload (many
parameter and size groups) still fills batches; the oldest job's group always runs first.
Just before compute, one queue call (`JobQueue.begin`, one Redis round trip) skips jobs that were
cancelled or finished elsewhere and marks the rest running; jobs past their deadline are
acknowledged without compute. A lone job does not wait for that answer: its check travels
alongside its compute (a job cancelled while queued has left the queue already, so all it could
still find is a cancel of the last instant), and if the answer says the job was finished
meanwhile, the output is dropped and the stored result kept. Waiting for it would put one more
round trip between a lone request and its compute. Inference runs in a thread, so the event loop
keeps heartbeating while a batch computes; a failing batch is retried one job at a time so one
bad job cannot fail its neighbours.

Compute runs on one thread of its own (torch's CPU thread team and CUDA's current device and stream
belong to the calling thread). Answers (the engine configuration's ``encode_overlap``, on with CUDA): once the
pipeline is done with a batch, the compute thread hands its outputs to the codec threads and takes
the next batch while a task stores the answers; at most one batch's answers are in flight, so the
next batch's are stored only after them. On a GPU the encoding (a 512 x 512 PNG takes tens of ms of
CPU) would otherwise add its time to every batch. On the CPU the answers are encoded before the next
batch: there the encoding is a few per cent of compute and would compete with it for the cores. A PNG
answer is compressed in horizontal bands side by side (``service.png``): the codec threads are shared
out among a batch's answers, so a lone answer, whose encode is on its request's path, uses them all.

Warm-up (``FLOWIE_WARMUP``, ``service.warmup``): before it reports ready, the worker runs the
work sizes that requests will bring, so that they do not pay what a new input shape costs on a GPU.
Then ``Runner.warmup_done``: the CUDA graphs captured so far stay, later ones share a bounded cache.

Shutdown (``request_stop``, SIGTERM): the batch in progress finishes and is stored; jobs taken
but not started are handed back to the queue for other workers.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowie.params import EnhanceParams
from flowie.progress import Progress, watching
from service import faces_job
from service.imaging import (
    INLINE_DECODE_PIXELS,
    OUTPUT_FORMATS,
    ImageError,
    decode_image,
    encode_image,
    pixels_to_decode,
    submit_encode,
)
from service.logs import request_id_var
from service.metrics import Metrics
from service.progress import publishing
from service.queue.base import Delivery, JobQueue, JobResult, QueueUnavailableError
from service.runner import Runner
from service.settings import Settings
from service.warmup import warm_up, warmup_runs

log = logging.getLogger("flowie.service.worker")

_EWMA = 0.3
# How long one read waits for a job at an idle worker before the loop looks at stop requests and
# reclaimed jobs again (a job that arrives wakes the read at once).
IDLE_WAIT_S = 0.5
# Event-loop turns a queue call needs to put its request on the wire (redis-py's pool checks the
# connection first, which takes one turn): yielded before a lone job's upload is decoded on the
# loop, so that the check before compute travels meanwhile. Fewer would only lose that overlap.
# A job whose pixels came decoded goes straight to compute; its check is sent while compute starts.
SEND_TURNS = 2


@dataclass(eq=False)
class _Prepared:
    """A delivery with its decoded pixels and batch key."""

    delivery: Delivery
    pixels: np.ndarray
    params: EnhanceParams
    key: tuple[Any, ...]

    @property
    def job_id(self) -> str:
        return self.delivery.job.id


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One worker: one device, every task its runner serves."""

    def __init__(self, queue: JobQueue, runner_factory: Callable[[], Runner], settings: Settings,
                 metrics: Metrics, worker_id: str | None = None) -> None:
        self.queue = queue
        self.runner_factory = runner_factory
        self.settings = settings
        self.config = settings.engine_config()  # codec threads, encode overlap, PNG level
        self.metrics = metrics
        self.worker_id = worker_id or settings.worker_id or default_worker_id()
        self.runner: Runner | None = None
        self.ready = False
        self.load_error: str | None = None
        self.crashed: str | None = None  # the error that stopped the loop after the models loaded
        self.warming: str | None = None  # what the warm-up is running (/readyz says so)
        self._stopping = False
        self._buffer: list[_Prepared] = []
        self._inbox: list[Delivery] = []  # reclaimed by the heartbeat, not yet prepared
        self._computing: list[_Prepared] = []
        self._delivering: list[_Prepared] = []  # computed; answers being encoded and stored
        self._delivery: asyncio.Task[None] | None = None  # the task storing them (one at a time)
        self._seconds_per_job: dict[str, float] = {}
        self._busy = False  # the last step computed a batch (jobs found queued after it are a backlog)
        self.batches_done = 0
        # Batches started after waiting for batch mates / at once (what the batching window cost).
        self.windows_waited = 0
        self.started_at_once = 0
        self._codec_pool: ThreadPoolExecutor | None = None  # encodes answers
        self._decode_pool: ThreadPoolExecutor | None = None  # decodes uploads (see _decoder)
        self._compute_pool: ThreadPoolExecutor | None = None  # the one compute thread (see _on_compute_thread)

    @property
    def max_batch(self) -> int:
        return self.settings.max_batch

    @property
    def buffer_capacity(self) -> int:
        """Most jobs held at once (the batch being formed and those read ahead for batch mates)."""
        return max(self.max_batch, self.settings.batch_lookahead or 2 * self.max_batch)

    def request_stop(self) -> None:
        """Finish the batch in progress, hand back the rest, then leave (SIGTERM)."""
        if not self._stopping:
            log.info("worker stopping: finishing the batch in progress", extra={"worker_id": self.worker_id})
        self._stopping = True

    # --- main loop ------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            self.runner = await self._on_compute_thread(self.runner_factory)  # all torch work on one thread
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("worker could not load its models")
            if self._compute_pool is not None:
                self._compute_pool.shutdown(wait=False)
                self._compute_pool = None
            raise
        tasks = self.runner.tasks
        await self._warm_up()
        self.runner.warmup_done()
        self.ready = True
        log.info("worker ready", extra={"worker_id": self.worker_id, "tasks": tasks,
                                        "backend": self.runner.backend, "device": self.settings.device})
        heartbeat = asyncio.create_task(self._heartbeat_loop(tasks), name="flowie-worker-heartbeat")
        backoff = 0.1
        try:
            while not self._stopping:
                try:
                    await self._step(tasks)
                    backoff = 0.1
                except QueueUnavailableError as exc:
                    log.warning("queue unavailable: %s; retrying in %.1f s", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(2.0, backoff * 2)
        except Exception as exc:
            # A bug, not a queue outage: say so in the log and in /readyz instead of going quiet.
            self.crashed = f"{type(exc).__name__}: {exc}"
            log.exception("worker loop stopped by an error", extra={"worker_id": self.worker_id})
            raise
        finally:
            self.ready = False
            await self._settle_delivery(leaving=True)  # the last batch's answers are stored before leaving
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await self._hand_back()
            for pool in (self._codec_pool, self._decode_pool, self._compute_pool):
                if pool is not None:
                    pool.shutdown(wait=False)
            self._codec_pool = self._decode_pool = self._compute_pool = None

    async def _warm_up(self) -> None:
        """Run the warm-up (service.warmup) before reporting ready; /readyz shows its progress."""
        assert self.runner is not None
        await warm_up(self.runner, warmup_runs(self.runner, self.settings), self._on_compute_thread,
                      self._show_warming, lambda: self._stopping)

    def _show_warming(self, what: str | None) -> None:
        self.warming = what

    async def _hand_back(self) -> None:
        unstarted = [p.delivery for p in self._buffer] + self._inbox
        self._buffer, self._inbox = [], []
        try:
            if unstarted:
                await self.queue.release(unstarted)
                log.info("handed back %d jobs not started", len(unstarted), extra={"worker_id": self.worker_id})
            await self.queue.leave(self.worker_id)
        except QueueUnavailableError:
            log.warning("could not hand back %d jobs (queue unavailable); they will be reclaimed after "
                        "the visibility timeout", len(unstarted))

    async def _step(self, tasks: list[str]) -> None:
        if self._delivery is not None and self._delivery.done():
            await self._settle_delivery()  # an error of the answers' task surfaces in the loop
        backlog = bool(self._buffer)  # jobs left from earlier reads: work is queued
        if self._inbox:
            inbox, self._inbox = self._inbox, []
            await self._prepare(inbox)
        early_begin: asyncio.Future[set[str]] | None = None
        if not self._buffer:
            # Back from a batch: what is already queued came while we computed (a backlog, so batch
            # mates are likely). An idle worker blocks instead; what wakes it is a lone arrival
            # unless one read brings several jobs.
            # Read ahead as far as the buffer allows: in a mixed backlog the oldest job's batch mates
            # may be far behind it.
            taken = await self.queue.take(tasks, self.worker_id, self.buffer_capacity, 0.0) if self._busy else []
            backlog = bool(taken)
            if not taken:
                self._busy = False
                taken = await self.queue.take(tasks, self.worker_id, self.max_batch, IDLE_WAIT_S)
                backlog = len(taken) > 1
            if len(taken) == 1 and not backlog:
                # A lone job is its own batch: send the check before compute now; compute does not
                # wait for its answer (see the module docstring).
                early_begin = asyncio.ensure_future(self.queue.begin(taken))
                if taken[0].job.pixels is None:
                    for _ in range(SEND_TURNS):  # let the request leave before decoding holds the loop
                        await asyncio.sleep(0)
            try:
                await self._prepare(taken)
            except BaseException:
                if early_begin is not None:
                    early_begin.cancel()
                raise
            if not self._buffer:
                if early_begin is not None:  # the job was refused (and stored as such) while decoding
                    await asyncio.gather(early_begin, return_exceptions=True)
                return
        head = self._buffer[0]
        key = head.key
        waited = False
        if backlog and self.settings.max_wait_ms > 0 and self._group_size(key) < self.max_batch:
            # About to wait for batch mates: not for a head that is already dead.
            await self._drop_dead(self._buffer)
            if not self._buffer:
                return
            head = self._buffer[0]
            key = head.key
            wait_until = head.delivery.received_at + self.settings.max_wait_ms / 1000.0
            while not self._stopping and self._group_size(key) < self.max_batch:
                remaining = wait_until - time.monotonic()
                room = self.buffer_capacity - len(self._buffer)
                if remaining <= 0 or room <= 0:
                    break
                waited = True
                await self._prepare(await self.queue.take(tasks, self.worker_id, room, remaining))
        batch = [p for p in self._buffer if p.key == key][: self.max_batch]
        taken_ids = {id(p) for p in batch}
        self._buffer = [p for p in self._buffer if id(p) not in taken_ids]
        self._computing = batch
        try:
            if early_begin is not None:
                batch = await self._skip_dead(batch, set())  # the deadline; the rest comes alongside
            else:
                batch = await self._begin(batch)
            if batch:
                if waited:
                    self.windows_waited += 1
                else:
                    self.started_at_once += 1
                await self._run_batch(batch, alongside=early_begin)
                self._busy = True
            elif early_begin is not None:
                await asyncio.gather(early_begin, return_exceptions=True)
        finally:
            self._computing = []

    def _group_size(self, key: tuple[Any, ...]) -> int:
        return sum(p.key == key for p in self._buffer)

    async def _prepare(self, deliveries: list[Delivery]) -> None:
        """Decode and key new deliveries (large uploads in a thread: decoding is CPU work)."""
        if not deliveries:
            return
        assert self.runner is not None
        if self._decode_inline(deliveries):
            prepared = self._prepare_sync(deliveries)
        else:
            prepared = await asyncio.to_thread(self._prepare_sync, deliveries)
        for delivery, item in zip(deliveries, prepared, strict=True):
            if isinstance(item, _Prepared):
                self._buffer.append(item)
            else:
                status, slug, title, detail = item
                await self._finish(delivery, JobResult.failure(delivery.job.id, "failed", status, slug, title,
                                                               detail), outcome="invalid")

    def _decode_inline(self, deliveries: list[Delivery]) -> bool:
        """True when the uploads still to decode are small enough for the event loop (headers only)."""
        pixels = 0
        for delivery in deliveries:
            if delivery.job.pixels is None:
                pixels += pixels_to_decode(delivery.job.image, self.settings.max_pixels)
                if pixels > INLINE_DECODE_PIXELS:
                    return False
        return True

    @property
    def _codec(self) -> ThreadPoolExecutor:
        """Threads that encode a batch's answers in parallel (the image codecs release the GIL),
        made on first use."""
        if self._codec_pool is None:
            self._codec_pool = ThreadPoolExecutor(max_workers=self._codec_threads, thread_name_prefix="flowie-codec")
        return self._codec_pool

    @property
    def _decoder(self) -> ThreadPoolExecutor:
        """Threads that decode a batch's uploads in parallel, made on first use. Not the encoding
        threads: with answers overlapping compute, the next batch's uploads would queue behind the
        previous batch's answers there, and the next compute would wait for the encoding after all
        (measured with uploads the worker decodes: 0.98x instead of 1.11x at batch 4, docs/PERF.md)."""
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(max_workers=self._codec_threads, thread_name_prefix="flowie-decode")
        return self._decode_pool

    @property
    def _codec_threads(self) -> int:
        return self.config.codec_threads

    def _prepare_sync(self, deliveries: list[Delivery]) -> list[_Prepared | tuple[int, str, str, str]]:
        """Decode and key deliveries (several at once on the decoding threads); a problem tuple for a bad one."""
        if len(deliveries) > 1 and sum(d.job.pixels is None for d in deliveries) > 1:
            return list(self._decoder.map(self._prepare_one, deliveries))
        return [self._prepare_one(delivery) for delivery in deliveries]

    def _prepare_one(self, delivery: Delivery) -> _Prepared | tuple[int, str, str, str]:
        assert self.runner is not None
        job = delivery.job
        try:
            if job.task not in self.runner.tasks:
                raise LookupError(f"this worker serves {', '.join(self.runner.tasks)}, not {job.task!r}")
            pixels = job.pixels if job.pixels is not None else decode_image(job.image, self.settings.max_pixels)
            params = EnhanceParams(**job.params).validate()
            shape = self.runner.padded_shape(job.task, pixels.shape[0], pixels.shape[1], params)
            inference = dataclasses.replace(params, seed=None)
            key = (job.task, *dataclasses.astuple(inference), tuple(shape))
            return _Prepared(delivery, pixels, params, key)
        except ImageError as exc:
            return (400, "bad-request", "Bad request", str(exc))
        except (ValueError, TypeError, LookupError) as exc:
            return (422, "invalid-field", "Invalid field", str(exc))

    async def _drop_dead(self, items: list[_Prepared]) -> list[_Prepared]:
        """Acknowledge, without compute, jobs cancelled / finished elsewhere / past deadline."""
        if not items:
            return items
        return await self._skip_dead(items, await self.queue.finished([p.job_id for p in items]))

    async def _begin(self, batch: list[_Prepared]) -> list[_Prepared]:
        """Just before compute: skip dead jobs and mark the rest running (one queue call)."""
        if not batch:
            return batch
        return await self._skip_dead(batch, await self.queue.begin([p.delivery for p in batch]))

    async def _skip_dead(self, items: list[_Prepared], finished: set[str]) -> list[_Prepared]:
        now = time.time()
        alive = []
        for p in items:
            job = p.delivery.job
            if p.job_id in finished:
                await self._finish_cancelled(p.delivery)
            elif job.deadline < now:
                await self._finish(p.delivery, JobResult.failure(
                    job.id, "expired", 504, "deadline-exceeded", "Deadline exceeded",
                    f"the job waited {now - job.created_at:.1f} s and passed its deadline before compute"),
                    outcome="expired")
            else:
                alive.append(p)
        if len(alive) != len(items):
            dropped = {id(p) for p in items} - {id(p) for p in alive}
            self._buffer = [p for p in self._buffer if id(p) not in dropped]
        return alive

    async def _finish_cancelled(self, delivery: Delivery) -> None:
        """Acknowledge a job that has a result already (cancelled, or finished by another delivery):
        the stored result is kept, and nobody is woken again."""
        await self._finish(delivery, JobResult.failure(delivery.job.id, "cancelled", 409, "job-cancelled",
                                                       "Job cancelled", "cancelled"), outcome="cancelled")

    async def _answer(self, alongside: asyncio.Future[set[str]] | None) -> set[str]:
        """The ids that the check sent alongside compute found finished (none when there was no
        check, or the queue could not answer it: storing the output keeps any result there)."""
        if alongside is None:
            return set()
        try:
            return await alongside
        except QueueUnavailableError:
            return set()

    async def _run_batch(self, batch: list[_Prepared], alongside: asyncio.Future[set[str]] | None = None) -> None:
        """Compute ``batch`` and store its answers. Overlapping (``encode_overlap``), the compute thread
        hands the answers to the codec threads and is free for the next batch at once, while a task of
        its own stores them; else the compute thread encodes them and they are stored before this
        returns. ``alongside``: the check before compute of a lone job, sent but not awaited; its
        answer decides what happens to the output."""
        assert self.runner is not None
        task = batch[0].delivery.job.task
        job_ids = [p.job_id for p in batch]
        overlap = self._overlap
        started = time.time()
        for p in batch:
            self.metrics.queue_wait.labels(task=task).observe(max(0.0, started - p.delivery.job.created_at))
        log.info("batch started", extra={"worker_id": self.worker_id, "task": task, "batch_size": len(batch),
                                         "job_ids": job_ids})
        t0 = time.perf_counter()
        answers: asyncio.Future[tuple[list[bytes | Exception], float]]
        try:
            if overlap:
                outputs, handed, handed_at = await self._compute_watched(self._compute_and_hand_off, task, batch)
                answers = asyncio.ensure_future(self._gather_answers(handed, handed_at))
            else:
                outputs, encoded, encode_s = await self._compute_watched(self._compute_and_encode, task, batch)
                answers = asyncio.get_running_loop().create_future()
                answers.set_result((encoded, encode_s))
        except Exception as exc:  # noqa: BLE001 - a model failure must not stop the worker
            if batch[0].job_id in await self._answer(alongside):
                await self._finish_cancelled(batch[0].delivery)
                return
            if len(batch) > 1:
                log.warning("batch of %d failed (%s); retrying one job at a time", len(batch), type(exc).__name__)
                for p in batch:
                    await self._run_batch([p])
                return
            log.exception("job failed", extra={"job_id": batch[0].job_id,
                                               "request_id": batch[0].delivery.job.request_id})
            await self._finish(batch[0].delivery, JobResult.failure(
                batch[0].job_id, "failed", 500, "job-failed", "Job failed",
                f"inference failed ({type(exc).__name__}); the request id identifies the log entry"),
                outcome="failed")
            return
        # Seconds a job holds this worker, for the queue's estimates: the encoding only when it does
        # not overlap the next batch.
        per_job = (time.perf_counter() - t0) / len(batch)
        old = self._seconds_per_job.get(task)
        self._seconds_per_job[task] = per_job if old is None else (1 - _EWMA) * old + _EWMA * per_job
        self.metrics.batch_size.labels(task=task).observe(len(batch))
        if not overlap:
            await self._deliver(task, batch, outputs, answers, started, t0, alongside)
            return
        await self._settle_delivery()  # the previous batch's answers are stored first: one batch behind at most
        self._delivering = batch
        self._delivery = asyncio.create_task(self._deliver(task, batch, outputs, answers, started, t0, alongside),
                                             name="flowie-worker-answers")

    @property
    def _overlap(self) -> bool:
        """Whether answers are encoded while the next batch computes (see the module docstring)."""
        return self.config.encode_overlap

    async def _on_compute_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` on the worker's one compute thread (with the caller's log context).

        One thread, always the same: torch's CPU thread team (OpenMP) belongs to the thread that
        calls it, and teams of several calling threads spin against each other for the cores (a
        measured 1.8x slowdown on 2 cores); CUDA's current device and stream are per thread too."""
        if self._compute_pool is None:
            self._compute_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowie-compute")
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._compute_pool, context.run, function, *args)

    async def _compute_watched(self, function: Callable[..., Any], task: str, batch: list[_Prepared]) -> Any:
        """``function(task, batch, progress)`` on the compute thread, its progress written to the queue
        meanwhile (service.progress)."""
        async with publishing(self.queue, [p.job_id for p in batch]) as progress:
            return await self._on_compute_thread(function, task, batch, progress)

    async def _gather_answers(self, handed: list[Future[bytes]],
                              handed_at: float) -> tuple[list[bytes | Exception], float]:
        """The answers the codec threads are encoding, and the seconds since they were handed over."""
        # An answer that could not be encoded comes back as its exception: that job fails alone.
        answers = list(await asyncio.gather(*(asyncio.wrap_future(f) for f in handed), return_exceptions=True))
        return answers, time.perf_counter() - handed_at

    async def _deliver(self, task: str, batch: list[_Prepared], outputs: list[Any],
                       answers_to_come: asyncio.Future[tuple[list[bytes | Exception], float]],
                       started: float, t0: float, alongside: asyncio.Future[set[str]] | None) -> None:
        """Wait for the batch's encoded answers and store them; a job whose answer could not be
        encoded fails alone."""
        assert self.runner is not None
        try:
            answers, encode_s = await answers_to_come
            compute_s = time.perf_counter() - t0  # the job's pipeline and its answer's encoding
            finished_meanwhile = await self._answer(alongside)
            timings = dict(getattr(outputs[0], "timings", {}) or {})
            timings["encode"] = encode_s
            for stage, seconds in timings.items():
                self.metrics.stage_duration.labels(stage=stage, backend=self.runner.backend).observe(float(seconds))
            for p, answer, output in zip(batch, answers, outputs, strict=True):
                job = p.delivery.job
                if p.job_id in finished_meanwhile:  # cancelled as compute began: drop the output
                    await self._finish_cancelled(p.delivery)
                    continue
                if isinstance(answer, BaseException):  # its encode failed (or was cancelled)
                    log.error("answer could not be encoded", exc_info=answer,
                              extra={"job_id": job.id, "request_id": job.request_id})
                    await self._finish(p.delivery, JobResult.failure(
                        job.id, "failed", 500, "job-failed", "Job failed",
                        f"the answer could not be encoded ({type(answer).__name__}); the request id identifies "
                        "the log entry"), outcome="failed")
                    continue
                height, width = output.image.shape[:2]
                faces = faces_job.answer_faces(output, self.metrics, task)  # None unless faces=detect
                result = JobResult(
                    id=job.id, state="done", image=answer, media_type=OUTPUT_FORMATS[job.output_format],
                    format=job.output_format, width=int(width), height=int(height), seed=int(output.seed),
                    timings={k: float(v) for k, v in timings.items()}, queue_s=max(0.0, started - job.created_at),
                    compute_s=compute_s, batch_size=len(batch), finished_at=time.time(),
                    pickup_s=max(0.0, p.delivery.picked_at - job.created_at), faces=faces)
                await self._finish(p.delivery, result, outcome="done")
            self.batches_done += 1
            log.info("batch done", extra={"worker_id": self.worker_id, "task": task, "batch_size": len(batch),
                                          "compute_s": round(compute_s, 4)})
            try:
                await self.queue.record_seconds_per_job(task, self._seconds_per_job[task])
            except QueueUnavailableError:
                pass
            for kind, value in self.runner.memory_bytes().items():
                self.metrics.gpu_memory.labels(device=self.settings.device, kind=kind).set(value)
        finally:
            self._delivering = []

    async def _settle_delivery(self, *, leaving: bool = False) -> None:
        """Wait until the answers in flight are stored. Their task's error is raised (a bug: the loop
        stops), except when ``leaving``, where it is logged and the worker goes on shutting down."""
        delivery, self._delivery = self._delivery, None
        if delivery is None:
            return
        if not leaving:
            await delivery
            return
        (outcome,) = await asyncio.gather(delivery, return_exceptions=True)
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            log.error("storing the last batch's answers failed", exc_info=outcome,
                      extra={"worker_id": self.worker_id})

    def _encode(self, prepared: _Prepared, output: Any) -> bytes | Exception:
        """One job's answer in its format, or the error that stopped it (that job fails alone)."""
        job = prepared.delivery.job
        try:
            return encode_image(output.image, job.output_format, job.quality, self.config.png_compress_level)
        except Exception as exc:  # noqa: BLE001 - reported per job by _deliver
            return exc

    def _compute(self, task: str, batch: list[_Prepared], progress: Progress | None = None) -> list[Any]:
        """Compute thread: run the pipeline on the batch (reporting to ``progress``)."""
        assert self.runner is not None
        params = dataclasses.replace(batch[0].params, seed=None)
        seeds = [int(p.params.seed) for p in batch]  # type: ignore[arg-type]
        with watching(progress):
            outputs = self.runner.enhance(task, [p.pixels for p in batch], params, seeds)
        if len(outputs) != len(batch):
            raise RuntimeError(f"pipeline returned {len(outputs)} results for {len(batch)} images")
        return outputs

    def _png_bands(self, batch_size: int) -> int:
        """Bands each PNG answer of a batch is compressed in, side by side: the codec threads shared
        out among the answers, so a lone answer uses them all (service.png)."""
        return max(1, self._codec_threads // batch_size)

    def _submit_answers(self, batch: list[_Prepared], outputs: list[Any]) -> list[Future[bytes]]:
        """Hand each output to the codec threads to encode in its job's format."""
        bands = self._png_bands(len(batch))
        return [submit_encode(self._codec, out.image, p.delivery.job.output_format, p.delivery.job.quality,
                              self.config.png_compress_level, bands)
                for p, out in zip(batch, outputs, strict=True)]

    @staticmethod
    def _outcome(answer: Future[bytes]) -> bytes | Exception:
        try:
            return answer.result()
        except Exception as exc:  # noqa: BLE001 - reported per job by _deliver
            return exc

    def _compute_and_encode(self, task: str, batch: list[_Prepared], progress: Progress | None = None) -> tuple[list[Any], list[bytes | Exception], float]:
        """Compute thread: run the batch, then encode each output in its job's format (on the codec
        threads, unless a lone answer has one band: then here, which saves the hand-over):
        (outputs, answers, seconds the encoding took)."""
        outputs = self._compute(task, batch, progress)
        started = time.perf_counter()
        if len(batch) == 1 and self._png_bands(1) == 1:
            answers = [self._encode(batch[0], outputs[0])]
        else:
            answers = [self._outcome(f) for f in self._submit_answers(batch, outputs)]
        return outputs, answers, time.perf_counter() - started

    def _compute_and_hand_off(self, task: str, batch: list[_Prepared], progress: Progress | None = None) -> tuple[list[Any], list[Future[bytes]], float]:
        """Compute thread: run the batch and hand each output to the codec threads to encode, without
        waiting for them: (outputs, their answers to come, when they were handed over)."""
        outputs = self._compute(task, batch, progress)
        handed_at = time.perf_counter()
        return outputs, self._submit_answers(batch, outputs), handed_at

    async def _finish(self, delivery: Delivery, result: JobResult, *, outcome: str) -> None:
        """Store the result and acknowledge; while the queue is down keep trying until the deadline
        (after that the entry is left to be reclaimed and answered as expired)."""
        token = request_id_var.set(delivery.job.request_id)
        backoff = 0.1
        try:
            while True:
                try:
                    await self.queue.finish(delivery, result)
                    break
                except QueueUnavailableError:
                    if time.time() > delivery.job.deadline + 5:
                        log.error("giving up storing job %s: queue unavailable past its deadline", delivery.job.id)
                        return
                    await asyncio.sleep(backoff)
                    backoff = min(2.0, backoff * 2)
            self.metrics.jobs.labels(task=delivery.job.task, outcome=outcome).inc()
        finally:
            request_id_var.reset(token)

    # --- heartbeat ------------------------------------------------------------------------
    def held(self) -> list[Delivery]:
        return [p.delivery for p in (*self._buffer, *self._computing, *self._delivering)] + list(self._inbox)

    async def _heartbeat_loop(self, tasks: list[str]) -> None:
        interval = self.settings.heartbeat_s
        unreachable = False
        while True:
            try:
                info = {"id": self.worker_id, "pid": os.getpid(), "device": self.settings.device,
                        "backend": self.runner.backend if self.runner else "", "tasks": tasks,
                        "computing": len(self._computing), "buffered": len(self._buffer), "at": time.time()}
                await self.queue.heartbeat(self.worker_id, info, self.held(), ttl_s=3 * interval)
                if not self._stopping and len(self._buffer) + len(self._inbox) < self.max_batch:
                    self._inbox.extend(await self.queue.reclaim(tasks, self.worker_id, self.max_batch))
                if unreachable:
                    log.info("queue reachable again", extra={"worker_id": self.worker_id})
                unreachable = False
            except QueueUnavailableError:
                if not unreachable:
                    log.warning("heartbeat failed: queue unavailable", extra={"worker_id": self.worker_id})
                unreachable = True
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - heartbeats must go on
                log.exception("heartbeat error")
            await asyncio.sleep(interval)
