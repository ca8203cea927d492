"""GET /healthz (the process is alive) and GET /readyz (it can take jobs now).

A not-ready /readyz answers 503 with a stable `reason` code (the first failing check), every
failing check's code in `reasons`, and a short message; the underlying error (a load failure,
a crash, the queue's connection error) goes to the log, never into the answer.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from service import problems
from service.queue.base import QueueUnavailableError
from service.routes.deps import Draining, Service
from service.schemas import problem_response

log = logging.getLogger("flowie.service.api")
router = APIRouter()


def _worker_reason(worker: Any) -> tuple[str, str] | None:
    """(code, message) while the in-process worker cannot take jobs, else None."""
    if worker is None or worker.ready:
        return None
    if worker.crashed:
        log.warning("not ready: the worker stopped by an error: %s", worker.crashed)
        return "worker_crashed", "the worker stopped by an error (see the log)"
    if worker.load_error:
        log.warning("not ready: model load failed: %s", worker.load_error)
        return "model_load_failed", "a model could not be loaded (see the log)"
    if worker.warming:
        return "warming_up", f"warming up: {worker.warming}"
    return "models_loading", "models loading"


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Models loaded, queue reachable, a worker alive",
            responses={503: problem_response("not ready; the checks say why")})
async def readyz(service: Service, draining: Draining) -> dict[str, Any]:
    checks: dict[str, Any] = {"models": list(service.models), "draining": draining}
    failing: list[tuple[str, str]] = []
    worker_reason = _worker_reason(service.worker)
    if worker_reason is not None:
        failing.append(worker_reason)
    try:
        await service.queue.ping()
        checks["queue"] = "ok"
        checks["workers"] = await service.queue.live_workers()
        if checks["workers"] < 1:
            failing.append(("no_worker", "no live worker heartbeat"))
    except QueueUnavailableError as exc:
        log.warning("not ready: the queue is unreachable: %s", exc)
        checks["queue"] = "unreachable"
        failing.append(("queue_unreachable", "queue unreachable"))
    if draining:
        failing.append(("shutting_down", "shutting down"))
    if failing:
        raise problems.ServiceUnavailable("not ready: " + "; ".join(message for _, message in failing),
                                          retry_after_s=2, reason=failing[0][0],
                                          reasons=[code for code, _ in failing], checks=checks)
    return {"status": "ready", "checks": checks}
