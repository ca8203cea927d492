"""Job queue: one interface (`base.JobQueue`), in memory (`memory`) and on Redis Streams (`redis_streams`)."""

from service.queue.base import (
    TERMINAL_STATES,
    Delivery,
    Job,
    JobQueue,
    JobResult,
    QueueError,
    QueueFullError,
    QueueUnavailableError,
)
from service.queue.memory import MemoryJobQueue

__all__ = [
    "TERMINAL_STATES", "Delivery", "Job", "JobQueue", "JobResult", "MemoryJobQueue", "QueueError",
    "QueueFullError", "QueueUnavailableError",
]
