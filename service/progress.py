"""A computing batch's progress, from the worker's compute thread to the queue (GET /jobs/{id}).

The compute thread reports into a `flowie.progress.Progress` (stage, sampler step, tiles); while
it computes, a task on the worker's event loop writes the report to the queue every
``PUBLISH_INTERVAL_S`` when it changed: one small write per batch (`JobQueue.set_progress`), a
few times a second at most, and none for a batch that finishes before the first interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from flowie.progress import Progress
from service.queue.base import JobQueue, QueueUnavailableError

# A few writes a second are as often as a person watching needs.
PUBLISH_INTERVAL_S = 0.25


async def _publish(queue: JobQueue, job_ids: list[str], progress: Progress, interval_s: float) -> None:
    published = 0  # the version last written (0: nothing reported yet)
    while True:
        await asyncio.sleep(interval_s)
        version, report = progress.snapshot()
        if version == published:
            continue
        try:
            await queue.set_progress(job_ids, report)
            published = version
        except QueueUnavailableError:
            pass  # progress is a courtesy to whoever watches: the next report may get through


@asynccontextmanager
async def publishing(queue: JobQueue, job_ids: list[str],
                     interval_s: float | None = None) -> AsyncIterator[Progress]:
    """A fresh Progress for the batch of ``job_ids``, written to ``queue`` every ``interval_s``
    (default PUBLISH_INTERVAL_S) while the block runs."""
    progress = Progress()
    every = PUBLISH_INTERVAL_S if interval_s is None else interval_s
    publisher = asyncio.create_task(_publish(queue, job_ids, progress, every), name="flowie-progress")
    try:
        yield progress
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
