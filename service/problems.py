"""Errors as RFC 9457 problem details (`application/problem+json`), turned into responses here only.

Code anywhere in the service raises a `Problem` subclass (or lets FastAPI raise its validation
error); `install_problem_handlers` maps every error type to one response shape::

    {"type": "/problems/queue-full", "title": "Queue full", "status": 429,
     "detail": "...", "instance": "/enhance", "request_id": "..."}

Bad input is never a 500: the only 500 is a bug in the service itself, logged with its traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flowie.params import ParamError
from service.queue.base import QueueFullError, QueueUnavailableError

PROBLEM_MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("flowie.service.problems")


class Problem(Exception):
    """An error with an HTTP meaning. Subclasses fix status, title, type and metrics reason."""

    status: int = 500
    title: str = "Internal error"
    slug: str = "internal"
    reason: str | None = None  # label of flowie_rejections_total; None = not a rejection

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    @property
    def type(self) -> str:
        return f"/problems/{self.slug}"

    def body(self) -> dict[str, Any]:
        return {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail,
                **self.extra}


class BadRequest(Problem):
    status, title, slug, reason = 400, "Bad request", "bad-request", "bad_request"


class Unauthorized(Problem):
    status, title, slug, reason = 401, "Unauthorized", "unauthorized", "unauthorized"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="flowie"'}, **extra)


class NotFound(Problem):
    status, title, slug = 404, "Not found", "not-found"


class Conflict(Problem):
    status, title, slug = 409, "Conflict", "conflict"


class PayloadTooLarge(Problem):
    status, title, slug, reason = 413, "Payload too large", "too-large", "too_large"


class UnsupportedMediaType(Problem):
    status, title, slug, reason = 415, "Unsupported media type", "unsupported-media-type", "unsupported_media"


class InvalidField(Problem):
    status, title, slug, reason = 422, "Invalid field", "invalid-field", "invalid"


class _RetryLater(Problem):
    def __init__(self, detail: str, *, retry_after_s: float, **extra: Any) -> None:
        seconds = max(1, int(round(retry_after_s)))
        super().__init__(detail, headers={"Retry-After": str(seconds)}, retry_after_s=seconds, **extra)


class QueueFull(_RetryLater):
    status, title, slug, reason = 429, "Queue full", "queue-full", "queue_full"


class ServiceUnavailable(_RetryLater):
    """503; raisers pass ``reason=`` a stable code (``queue_unreachable``, ``warming_up``...) for the body."""

    status, title, slug, reason = 503, "Service unavailable", "unavailable", "unavailable"


class DeadlineExceeded(Problem):
    status, title, slug, reason = 504, "Deadline exceeded", "deadline-exceeded", "deadline"


class JobFailed(Problem):
    """The worker could not compute a job (a bug or a resource failure, never the client's input)."""

    status, title, slug = 500, "Job failed", "job-failed"


class JobCancelled(Problem):
    status, title, slug = 409, "Job cancelled", "job-cancelled"


def problem_body(status: int, title: str, detail: str, slug: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"/problems/{slug}", "title": title, "status": status, "detail": detail, **extra}


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "")


def _respond(request: Request, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    body = {**body, "instance": request.url.path, "request_id": _request_id(request)}
    headers = dict(headers or {})
    if body["request_id"]:
        headers.setdefault("X-Request-ID", body["request_id"])
    return JSONResponse(body, status_code=int(body["status"]), headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _count_rejection(request: Request, reason: str | None) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and reason:
        metrics.rejections.labels(reason=reason).inc()


def _clean_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors without the offending input (it may be image bytes or a key)."""
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors
    ]


def _summary(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(p for p in e["loc"] if p not in ("body", "query", "header", "path"))
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def install_problem_handlers(app: FastAPI) -> None:
    """Every error type the service can meet -> problem+json. The one place errors become HTTP."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        _count_rejection(request, exc.reason)
        if exc.status >= 500 and exc.status not in (503, 504):
            log.error("request failed: %s", exc.detail)
        return _respond(request, exc.body(), exc.headers)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        errors = _clean_errors(list(exc.errors()))  # type: ignore[attr-defined]
        _count_rejection(request, "invalid")
        return _respond(request, problem_body(422, "Invalid field", _summary(errors), "invalid-field",
                                              errors=errors))

    async def on_param_error(request: Request, exc: Exception) -> JSONResponse:
        _count_rejection(request, "invalid")
        return _respond(request, problem_body(422, "Invalid field", str(exc), "invalid-field"))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        titles = {404: "Not found", 405: "Method not allowed", 400: "Bad request"}
        body = problem_body(exc.status_code, titles.get(exc.status_code, "HTTP error"), str(exc.detail),
                            f"http-{exc.status_code}")
        return _respond(request, body, dict(exc.headers or {}))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", type(exc).__name__)
        body = problem_body(500, "Internal error", "the service failed; the request id identifies the log entry",
                            "internal")
        return _respond(request, body)

    async def on_queue_full(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QueueFullError)
        return await on_problem(request, QueueFull(str(exc), retry_after_s=exc.retry_after_s))

    async def on_queue_unavailable(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QueueUnavailableError)
        log.warning("the job queue is unavailable: %s", exc)  # the detail stays in the log
        return await on_problem(request, ServiceUnavailable("the job queue is unreachable; retry later",
                                                            retry_after_s=exc.retry_after_s,
                                                            reason="queue_unreachable"))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(QueueFullError, on_queue_full)
    app.add_exception_handler(QueueUnavailableError, on_queue_unavailable)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ValidationError, on_validation)
    app.add_exception_handler(ParamError, on_param_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
