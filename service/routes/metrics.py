"""GET /metrics: the Prometheus text, with the queue depths and stored results read at scrape time."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.queue.base import QueueUnavailableError
from service.routes.deps import Service

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def prometheus_metrics(service: Service) -> Response:
    metrics, queue = service.metrics, service.queue
    for task in service.models:
        try:
            metrics.queue_depth.labels(task=task).set(await queue.depth(task))
        except QueueUnavailableError:
            pass
    stored = queue.stored_results()
    if stored is not None:
        metrics.stored_results.set(stored[0])
        metrics.stored_result_bytes.set(stored[1])
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
