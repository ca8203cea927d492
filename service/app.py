"""The HTTP API: a FastAPI app factory over a JobQueue (docs/ARCHITECTURE.md, the HTTP contract).

`create_app` takes the queue and, for `flowie serve`, the in-process worker; `flowie api`
passes a Redis queue and no worker. This module never imports torch: the worker's runner is
built by the command that composes the app.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.datastructures import Headers, MutableHeaders, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowie import __version__
from flowie.faces.weights import available_detectors
from flowie.modeldir import ModelInfo, read_model_dir
from flowie.params import (
    BACKGROUNDS,
    COLOR_FIXES,
    FACE_CROP_SIDE,
    FACE_MODES,
    FACE_TASKS,
    SAMPLERS,
    TILE_MODES,
    EnhanceParams,
    default_face_mode,
)
from service import problems
from service.auth import ApiKeyAuth
from service.imaging import (
    INLINE_DECODE_PIXELS,
    MIN_WORK_SIDE,
    OUTPUT_FORMATS,
    ImageError,
    ImageTooLarge,
    UnsupportedImage,
    decode_image,
    pixels_to_decode,
    plan_sizes,
    tighten_bomb_guard,
)
from service.logs import request_id_var
from service.metrics import Metrics
from service.queue.base import TERMINAL_STATES, Job, JobQueue, JobResult, QueueUnavailableError
from service.schemas import (
    FIELD_NAMES,
    EnhanceFields,
    EnhanceJSON,
    EnhanceResult,
    JobStatus,
    ModelEntry,
    ModelsResponse,
    enhance_openapi,
    problem_response,
)
from service.settings import Settings
from service.webui import web_router

log = logging.getLogger("flowie.service.api")
access_log = logging.getLogger("flowie.service.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries + the small fields
_MAX_FIELD_BYTES = 1024
JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="job id")]


class ClientClosed(problems.Problem):
    status, title, slug, reason = 499, "Client closed request", "client-closed", "client_closed"


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


# --- helpers ------------------------------------------------------------------------------
def _problem_from_result(result: JobResult) -> problems.Problem:
    info = result.problem or {}
    problem = problems.Problem(str(info.get("detail", f"the job ended {result.state}")),
                               **{k: v for k, v in info.items() if k not in ("status", "title", "slug", "detail")})
    problem.status = int(info.get("status", 500))
    problem.title = str(info.get("title", "Job failed"))
    problem.slug = str(info.get("slug", "job-failed"))
    problem.reason = "deadline" if result.state == "expired" else None
    return problem


def _wants_json(accept: str | None) -> bool:
    """True when the client ranks application/json above the image types (q-values honoured)."""
    if not accept:
        return False
    best_json, best_image = -1.0, -1.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media in ("application/json", "application/*"):
            best_json = max(best_json, q)
        elif media.startswith("image/") or media == "*/*":
            best_image = max(best_image, q)
    return best_json > 0 and best_json >= best_image if best_image >= 0 else best_json > 0


def _parse_prefer(prefer: str | None) -> tuple[bool, float | None]:
    """(respond-async asked, wait=N seconds) from an RFC 7240 Prefer header."""
    respond_async, wait_s = False, None
    for token in (prefer or "").split(","):
        name, _, value = token.strip().partition("=")
        name = name.strip().lower()
        if name == "respond-async":
            respond_async = True
        elif name == "wait":
            try:
                wait_s = max(0.0, float(value.strip().strip('"')))
            except ValueError:
                pass
    return respond_async, wait_s


def _server_timing(result: JobResult, total_s: float, decode_s: float | None = None,
                   notify_s: float | None = None) -> str:
    """The Server-Timing header, ms: ``decode`` (handler start -> admission: reading, parsing and
    decoding the upload), ``queue`` (admission -> compute start; ``pickup`` is its first part:
    admission -> a worker received the job), ``compute`` (the job's batch), ``notify`` (result
    ready in the worker -> the handler has it), ``total`` (handler start -> answer). Entries this
    answer cannot know are left out (a GET of an async job's result has no decode or notify)."""
    parts = []
    if decode_s is not None:
        parts.append(f"decode;dur={decode_s * 1000:.2f}")
    parts.append(f"queue;dur={result.queue_s * 1000:.2f}")
    if result.pickup_s > 0:
        parts.append(f"pickup;dur={result.pickup_s * 1000:.2f}")
    parts.append(f"compute;dur={result.compute_s * 1000:.2f}")
    if notify_s is not None:
        parts.append(f"notify;dur={notify_s * 1000:.2f}")
    parts.append(f"total;dur={total_s * 1000:.2f}")
    return ", ".join(parts)


def _links(job_id: str) -> dict[str, str]:
    return {"self": f"/jobs/{job_id}", "result": f"/jobs/{job_id}/result"}


async def _read_limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body, chunk by chunk; PayloadTooLarge as soon as more than ``limit`` bytes arrived."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise problems.PayloadTooLarge(f"the request body exceeds {limit} bytes")
        yield chunk


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only a disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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
    auth = ApiKeyAuth(settings.api_key_values())
    default_task = next(iter(models))
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
    app.state.settings = settings
    app.state.queue = queue
    app.state.models = models
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.draining = False
    problems.install_problem_handlers(app)
    app.add_middleware(RequestContext, metrics=metrics)
    secured = [Depends(auth)]

    # ---- request parsing -------------------------------------------------------------------
    async def parse_body(request: Request) -> tuple[EnhanceFields, bytes]:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "multipart/form-data":
            return await parse_multipart(request)
        if media in ("application/json", ""):
            if media == "" and not request.headers.get("content-length", "").strip("0"):
                raise problems.InvalidField("the request needs a body: multipart/form-data with an `image` "
                                            "file, or JSON with `image` as base64")
            return await parse_json(request)
        raise problems.UnsupportedMediaType(
            f"send multipart/form-data (an `image` file + fields) or application/json, not {media!r}")

    async def parse_multipart(request: Request) -> tuple[EnhanceFields, bytes]:
        limit = settings.max_upload_bytes + _FORM_OVERHEAD_BYTES
        parser = MultiPartParser(request.headers, _read_limited(request, limit), max_files=1,
                                 max_fields=len(FIELD_NAMES), max_part_size=_MAX_FIELD_BYTES)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise problems.BadRequest(f"malformed multipart body: {exc.message}") from None
        try:
            values: dict[str, Any] = {}
            image: bytes | None = None
            for name, value in form.multi_items():
                if name in values or (name == "image" and image is not None):
                    raise problems.InvalidField(f"field {name!r} is given twice")
                if name == "image":
                    if not isinstance(value, UploadFile):
                        raise problems.InvalidField("`image` must be a file part (filename=...)")
                    image = await value.read()
                elif isinstance(value, UploadFile):
                    raise problems.InvalidField(f"unexpected file part {name!r}; only `image` is a file")
                elif value != "":  # an empty form field means "default", as browsers send it
                    values[name] = value
        finally:
            await form.close()
        fields = EnhanceFields.model_validate(values)
        if image is None:
            raise problems.InvalidField("the `image` file part is missing", errors=[
                {"loc": ["body", "image"], "msg": "Field required", "type": "missing"}])
        return fields, image

    async def parse_json(request: Request) -> tuple[EnhanceFields, bytes]:
        limit = (settings.max_upload_bytes * 4) // 3 + 4 + _FORM_OVERHEAD_BYTES
        body = b"".join([chunk async for chunk in _read_limited(request, limit)])
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise problems.BadRequest("the body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise problems.InvalidField("the JSON body must be an object with `image` and the fields")
        parsed = EnhanceJSON.model_validate(payload)
        text = parsed.image.strip()
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            image = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise problems.InvalidField("`image` is not valid base64", errors=[
                {"loc": ["body", "image"], "msg": "not valid base64", "type": "value_error"}]) from None
        return EnhanceFields.model_validate(parsed.model_dump(exclude={"image"}, exclude_unset=True)), image

    # ---- routes --------------------------------------------------------------------------
    @app.post(
        "/enhance",
        dependencies=secured,
        summary="Restore one photo",
        openapi_extra=enhance_openapi(),
        responses={
            200: {"description": "the restored image (or JSON with base64 when Accept: application/json)",
                  "content": {**{m: {"schema": {"type": "string", "format": "binary"}}
                                 for m in OUTPUT_FORMATS.values()},
                              "application/json": {"schema": EnhanceResult.model_json_schema()}}},
            202: {"description": "accepted; poll Location (Prefer: respond-async, or the sync wait ran out)",
                  "content": {"application/json": {"schema": JobStatus.model_json_schema()}}},
            400: problem_response("malformed body, or an undecodable image of an allowed format"),
            401: problem_response("missing or wrong API key"),
            413: problem_response("too many bytes, or too many pixels in the input or the output"),
            415: problem_response("not an accepted image format (PNG, JPEG, WebP, BMP, TIFF, GIF)"),
            422: problem_response("a field is unknown or out of range"),
            429: problem_response("queue full; see Retry-After"),
            503: problem_response("not ready or queue unreachable; see Retry-After"),
            504: problem_response("the job's deadline passed"),
        },
    )
    async def enhance(
        request: Request,
        prefer: Annotated[str | None, Header(description="`respond-async` -> 202 at once; `wait=N` seconds")] = None,
        accept: Annotated[str | None, Header()] = None,
        x_deadline_s: Annotated[float | None, Header(alias="X-Deadline-S", ge=1, le=86400,
                                                     description="drop the job after this many seconds "
                                                     "(1 s or more; at most FLOWIE_JOB_DEADLINE_S)")] = None,
    ) -> Response:
        received_at = time.time()
        started = time.perf_counter()
        if app.state.draining:
            raise problems.ServiceUnavailable("the service is shutting down", retry_after_s=5)
        if worker is not None and worker.load_error:
            raise problems.ServiceUnavailable(f"the model could not be loaded: {worker.load_error}",
                                              retry_after_s=60)
        fields, data = await parse_body(request)
        task = fields.task or default_task
        if task not in models:
            raise problems.InvalidField(f"task must be one of {', '.join(models)}, got {task!r}")
        request.state.task = task
        if len(data) > settings.max_upload_bytes:
            raise problems.PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {settings.max_upload_bytes}")
        params = EnhanceParams(sampler=fields.sampler, steps=fields.steps, color_fix=fields.color_fix,
                               upscale=fields.upscale, min_side=fields.min_side, tile=fields.tile,
                               seed=fields.seed, **_face_fields(fields, models[task].task)).validate()
        params = params.with_defaults(models[task].defaults).check_family(models[task].family)
        if params.seed is None:
            params = EnhanceParams(**{**asdict(params), "seed": secrets.randbelow(2**31)})
        params = params.validate()
        request.state.seed = params.seed
        pixels = await _decode(data)
        height, width = pixels.shape[:2]
        work_min_side = int(params.min_side or 0)
        if params.faces == "detect":  # whole photos work at a short side of at least one face crop
            work_min_side = max(work_min_side, FACE_CROP_SIDE)
        (out_h, out_w), (work_h, work_w) = plan_sizes(height, width, float(params.upscale or 1.0), work_min_side)
        if out_h * out_w > settings.max_pixels:
            raise problems.PayloadTooLarge(f"the output would be {out_w}x{out_h} = {out_w * out_h} pixels; "
                                           f"the limit is {settings.max_pixels} (lower upscale)")
        if work_h * work_w > settings.max_pixels:
            raise problems.PayloadTooLarge(f"the padded work size would be {work_w}x{work_h} pixels; the limit "
                                           f"is {settings.max_pixels} (the image is too long and thin, or "
                                           "min_side too large)")
        if min(work_h, work_w) < MIN_WORK_SIDE:
            raise problems.InvalidField(f"the padded work size would be {work_w}x{work_h}; the networks need at "
                                        f"least {MIN_WORK_SIDE} px per side: raise min_side (or omit it)")
        respond_async, wait_pref = _parse_prefer(prefer)
        deadline_s = min(settings.job_deadline_s, x_deadline_s or settings.job_deadline_s)
        # Admission: the upload is read, parsed and decoded (Server-Timing `decode`); the queue
        # time starts here. The deadline counts from the request's arrival.
        decode_s = time.perf_counter() - started
        job = Job(id=uuid.uuid4().hex, task=task, params=asdict(params), output_format=fields.output_format,
                  quality=fields.quality, image=data, created_at=time.time(), deadline=received_at + deadline_s,
                  request_id=str(request.state.request_id))
        # The worker needs no second decode: in-process it gets the array, over Redis a small
        # upload's pixels travel beside its bytes (larger ones are decoded again by the worker).
        job.pixels, pixels = pixels, None
        request.state.job_id = job.id
        await queue.submit(job, wait=not respond_async)
        if worker is None:
            job.pixels = None  # sent (or not): the handler need not hold the array while it waits
        if respond_async:
            return _accepted(job.id, task, "queued", {"Preference-Applied": "respond-async"})
        sync_s = min(settings.sync_timeout_s, wait_pref if wait_pref is not None else settings.sync_timeout_s)
        try:
            result = await _wait_or_disconnect(request, job, min(sync_s, job.deadline - time.time()))
        finally:
            await queue.forget(job.id)  # idempotent: the registration never outlives the handler
        if result is None:
            if time.time() >= job.deadline:
                await queue.cancel(job.id, state="expired", detail="the deadline passed while waiting")
                raise problems.DeadlineExceeded(f"the job did not finish within its {deadline_s:g} s deadline")
            return _accepted(job.id, task, await queue.state(job.id) or "queued", {})
        notify_s = max(0.0, time.time() - result.finished_at) if result.finished_at else None
        response = _result_response(result, accept, time.perf_counter() - started, decode_s, notify_s)
        # Answered: nobody else asked for this result, so the queue need not keep it (after sending).
        response.background = BackgroundTask(queue.delivered, job.id)
        return response

    def _face_fields(fields: EnhanceFields, model_task: str) -> dict[str, str | None]:
        """faces (detect by default for a face model) and background (model when a background model
        is configured, else resize) of a request; 422 for a choice this service cannot run."""
        default = default_face_mode(model_task)
        if settings.face_mode != "auto" and model_task in FACE_TASKS:
            default = settings.face_mode
        faces = fields.faces or default
        if faces != "detect":
            return {"faces": faces, "background": None}
        if model_task not in FACE_TASKS:
            raise problems.InvalidField("faces=detect needs a face model (task bfr); send faces=aligned")
        background = fields.background or ("model" if settings.background_task else "resize")
        if background == "model" and settings.background_task not in models:
            raise problems.InvalidField("background=model needs a background model (FLOWIE_BACKGROUND_TASK); "
                                        "send background=swinir or resize")
        return {"faces": faces, "background": background}

    async def _decode(data: bytes) -> Any:
        try:
            if pixels_to_decode(data, settings.max_pixels) <= INLINE_DECODE_PIXELS:
                return decode_image(data, settings.max_pixels)  # small: cheaper than a thread hop
            return await asyncio.to_thread(decode_image, data, settings.max_pixels)
        except UnsupportedImage as exc:
            raise problems.UnsupportedMediaType(str(exc)) from None
        except ImageTooLarge as exc:
            raise problems.PayloadTooLarge(str(exc)) from None
        except ImageError as exc:
            raise problems.BadRequest(str(exc)) from None

    async def _wait_or_disconnect(request: Request, job: Job, timeout_s: float) -> JobResult | None:
        waiting = asyncio.ensure_future(queue.wait(job.id, timeout_s))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting in done:
            return waiting.result()
        waiting.cancel()
        await queue.forget(job.id)
        log.info("client disconnected; cancelling job %s", job.id, extra={"job_id": job.id})
        await queue.cancel(job.id, detail="the client disconnected")
        raise ClientClosed("the client closed the connection before the result was ready")

    def _accepted(job_id: str, task: str, status: str, headers: dict[str, str],
                  progress: dict[str, Any] | None = None) -> JSONResponse:
        body = JobStatus(id=job_id, status=status, task=task, links=_links(job_id),  # type: ignore[arg-type]
                         progress=progress)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=202,
                            headers={"Location": f"/jobs/{job_id}", "Retry-After": "1", **headers})

    def _result_response(result: JobResult, accept: str | None, total_s: float, decode_s: float | None = None,
                         notify_s: float | None = None) -> Response:
        if result.state != "done":
            raise _problem_from_result(result)
        headers = {"X-Seed": str(result.seed), "Server-Timing": _server_timing(result, total_s, decode_s, notify_s),
                   "X-Job-ID": result.id}
        if result.faces is not None:
            headers["X-Faces"] = str(len(result.faces))
        if _wants_json(accept):
            body = EnhanceResult(id=result.id, image=base64.b64encode(result.image).decode("ascii"),
                                 format=result.format, width=result.width, height=result.height,
                                 seed=int(result.seed or 0),
                                 timings={**result.timings, "queue": result.queue_s, "compute": result.compute_s},
                                 faces=result.faces)
            return JSONResponse(body.model_dump(exclude_none=True), headers=headers)
        return Response(content=result.image, media_type=result.media_type, headers=headers)

    async def _finished(job_id: str) -> tuple[Response | None, Any]:
        """(202 response, None) while a job runs, (None, its stored result) once it has finished."""
        state = await queue.state(job_id)
        if state is None:
            raise problems.NotFound(f"no job {job_id} (unknown, or its result expired)")
        if state not in TERMINAL_STATES:
            progress = await queue.progress(job_id) if state == "running" else None
            return _accepted(job_id, "", state, {}, progress), None
        result = await queue.result(job_id)
        if result is None:
            raise problems.NotFound(f"the result of job {job_id} is gone")
        return None, result

    @app.get("/jobs/{job_id}", dependencies=secured, summary="Where a job is", response_model=JobStatus,
             responses={202: {"description": "queued or running", "model": JobStatus},
                        404: problem_response("unknown or expired job id")})
    async def job_status(request: Request, job_id: JobId) -> Response:
        request.state.job_id = job_id
        pending, result = await _finished(job_id)
        if pending is not None:
            return pending
        if result.state != "done":
            raise _problem_from_result(result)
        request.state.seed = result.seed
        body = JobStatus(id=job_id, status="done", links=_links(job_id), seed=result.seed, format=result.format,
                         width=result.width, height=result.height, timings=result.timings)
        return JSONResponse(body.model_dump(exclude_none=True))

    @app.get("/jobs/{job_id}/result", dependencies=secured, summary="The image of a finished job",
             responses={200: {"description": "the image, or JSON with base64 when Accept: application/json",
                              "content": {m: {} for m in OUTPUT_FORMATS.values()}},
                        202: {"description": "not finished yet", "model": JobStatus},
                        404: problem_response("unknown or expired job id")})
    async def job_result(request: Request, job_id: JobId,
                         accept: Annotated[str | None, Header()] = None) -> Response:
        request.state.job_id = job_id
        started = time.perf_counter()
        pending, result = await _finished(job_id)
        if pending is not None:
            return pending
        request.state.seed = result.seed
        return _result_response(result, accept, time.perf_counter() - started)

    @app.delete("/jobs/{job_id}", dependencies=secured, summary="Cancel a job (or delete its result)",
                response_model=JobStatus, responses={404: problem_response("unknown or expired job id")})
    async def job_cancel(request: Request, job_id: JobId) -> Response:
        request.state.job_id = job_id
        before = await queue.state(job_id)
        if before is None:
            raise problems.NotFound(f"no job {job_id} (unknown, or its result expired)")
        after = await queue.cancel(job_id, detail="cancelled by DELETE /jobs/{id}")
        status = "deleted" if before in TERMINAL_STATES else (after or "cancelled")
        return JSONResponse(JobStatus(id=job_id, status=status, links=_links(job_id)).model_dump(  # type: ignore[arg-type]
            exclude_none=True))

    @app.get("/models", dependencies=secured, summary="Tasks, their defaults, and the limits",
             response_model=ModelsResponse)
    async def list_models() -> ModelsResponse:
        return ModelsResponse(
            models=[ModelEntry(task=t, name=m.name, defaults=m.defaults, scale_factor=m.scale_factor,
                               family=m.family, samplers=list(m.samplers))
                    for t, m in models.items()],
            default_task=default_task,
            limits={"max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
                    "max_queue": settings.max_queue, "max_batch": settings.max_batch,
                    "sync_timeout_s": settings.sync_timeout_s, "job_deadline_s": settings.job_deadline_s,
                    "result_ttl_s": settings.result_ttl_s},
            choices={"sampler": list(SAMPLERS), "color_fix": list(COLOR_FIXES), "tile": list(TILE_MODES),
                     "output_format": list(OUTPUT_FORMATS),
                     "input_format": ["png", "jpeg", "webp", "bmp", "tiff", "gif"],
                     "faces": list(FACE_MODES), "background": list(BACKGROUNDS)},
            face_detectors=available_detectors(),
            face_detector=settings.face_detector,
        )

    if settings.web_ui:
        app.include_router(web_router())

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Models loaded, queue reachable, a worker alive",
             responses={503: problem_response("not ready; the checks say why")})
    async def readyz() -> dict[str, Any]:
        checks: dict[str, Any] = {"models": list(models), "draining": bool(app.state.draining)}
        reasons = []
        if worker is not None and not worker.ready:
            if worker.crashed:
                reasons.append(f"worker stopped by an error (see the log): {worker.crashed}")
            else:
                reasons.append(f"model load failed: {worker.load_error}" if worker.load_error
                               else f"warming up: {worker.warming}" if worker.warming else "models loading")
        try:
            await queue.ping()
            checks["queue"] = "ok"
            checks["workers"] = await queue.live_workers()
            if checks["workers"] < 1:
                reasons.append("no live worker heartbeat")
        except QueueUnavailableError as exc:
            checks["queue"] = str(exc)
            reasons.append("queue unreachable")
        if app.state.draining:
            reasons.append("shutting down")
        if reasons:
            raise problems.ServiceUnavailable("not ready: " + "; ".join(reasons), retry_after_s=2, checks=checks)
        return {"status": "ready", "checks": checks}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def prometheus_metrics() -> Response:
        for task in models:
            try:
                metrics.queue_depth.labels(task=task).set(await queue.depth(task))
            except QueueUnavailableError:
                pass
        stored = queue.stored_results()
        if stored is not None:
            metrics.stored_results.set(stored[0])
            metrics.stored_result_bytes.set(stored[1])
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app

