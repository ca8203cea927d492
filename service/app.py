"""The HTTP API: a FastAPI app composed over a JobQueue (docs/ARCHITECTURE.md, the HTTP contract).

The routes live in service/routes (one APIRouter per group); this module holds the request
middleware, the lifespan that runs the queue and the in-process worker, and `create_app`, which
puts the parts in a `ServiceState` on ``app.state.service`` and includes the routers.

`create_app` takes the queue and, for `flowie serve`, the in-process worker; `flowie api`
passes a Redis queue and no worker. This module never imports torch: the worker's runner is
built by the command that composes the app.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowie import __version__
from flowie.modeldir import ModelInfo, read_model_dir
from service import problems
from service.auth import ApiKeyAuth
from service.imaging import tighten_bomb_guard
from service.logs import request_id_var
from service.metrics import Metrics
from service.queue.base import JobQueue
from service.routes import enhance, health, jobs
from service.routes import metrics as metrics_routes
from service.routes import models as models_routes
from service.routes.deps import ServiceState
from service.settings import Settings
from service.webui import web_router

log = logging.getLogger("flowie.service.api")
access_log = logging.getLogger("flowie.service.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# --- middleware ---------------------------------------------------------------------------
class RequestContext:
    """Request id (echoed or made), X-Seed, Server-Timing fallback, access log, request metrics.

    Plain ASGI (not BaseHTTPMiddleware) so streaming bodies and disconnects pass through untouched.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("X-Request-ID", request_id)
                if state.get("seed") is not None and "x-seed" not in headers:
                    headers.append("X-Seed", str(state["seed"]))
                if "server-timing" not in headers:
                    headers.append("Server-Timing", f"total;dur={(time.perf_counter() - started) * 1000:.1f}")
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            path = scope.get("path", "")
            if path == "/enhance" and scope.get("method") == "POST":
                task = str(state.get("task") or "unknown")
                self.metrics.requests.labels(task=task, status=str(status)).inc()
                self.metrics.request_duration.labels(task=task).observe(elapsed)
            if path not in ("/healthz", "/metrics", "/readyz"):
                access_log.info("%s %s %d", scope.get("method"), path, status,
                                extra={"method": scope.get("method"), "path": path, "status": status,
                                       "duration_s": round(elapsed, 4), "task": state.get("task"),
                                       "job_id": state.get("job_id")})
            request_id_var.reset(token)


# --- the app ------------------------------------------------------------------------------
def load_models(settings: Settings) -> dict[str, ModelInfo]:
    """task -> ModelInfo of every configured model directory (reads model.json only; no torch)."""
    from service.settings import SettingsError, default_model_dirs

    models: dict[str, ModelInfo] = {}
    for model_dir in default_model_dirs(settings):
        info = read_model_dir(model_dir)
        if info.task in models:
            raise SettingsError(f"two model directories serve task {info.task!r}: {models[info.task].path} "
                                f"and {model_dir}; pass one per task")
        models[info.task] = info
    return models


def create_app(settings: Settings, queue: JobQueue, models: dict[str, ModelInfo], *,
               worker: Any | None = None, metrics: Metrics | None = None) -> FastAPI:
    """The API over ``queue``; ``worker`` (a service.worker.Worker) runs inside the app's lifespan."""
    if not models:
        raise ValueError("create_app needs at least one model")
    metrics = metrics or Metrics(role="serve" if worker else "api")
    tighten_bomb_guard(settings.max_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await queue.start()
        worker_task = asyncio.create_task(worker.run(), name="flowie-worker") if worker else None
        app.state.worker_task = worker_task
        try:
            yield
        finally:
            app.state.draining = True
            if worker_task is not None:
                worker.request_stop()
                try:
                    await asyncio.wait_for(asyncio.shield(worker_task), timeout=settings.drain_timeout_s + 5)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - shutting down regardless
                    worker_task.cancel()
            await queue.close()

    app = FastAPI(
        title="FlowIE Serve",
        version=__version__,
        description=(
            "Photo restoration with FlowIE (CVPR 2024 rectified flow). Errors are RFC 9457 problem details "
            "(application/problem+json). Uploads: PNG, JPEG, WebP, BMP, TIFF or GIF (first frame), told "
            "apart by their bytes; EXIF orientation is applied; transparent images are composited over "
            "white; 16-bit images are reduced to 8 bits. `Prefer: respond-async` answers 202 at once; "
            "`X-Deadline-S` drops a job that has not finished in time (504)."
        ),
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.service = ServiceState(settings=settings, queue=queue, models=models, worker=worker,
                                     metrics=metrics, auth=ApiKeyAuth(settings.api_key_values()))
    app.state.metrics = metrics  # the problem handlers count rejections on it
    app.state.draining = False
    problems.install_problem_handlers(app)
    app.add_middleware(RequestContext, metrics=metrics)
    # The order of the routers is the order of the paths in the OpenAPI document.
    app.include_router(enhance.router)
    app.include_router(jobs.router)
    app.include_router(models_routes.router)
    if settings.web_ui:
        app.include_router(web_router())
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    return app
