"""POST /enhance: admit one photo (fields checked once, image decoded once), queue it, answer.

A synchronous request waits for its result (up to FLOWIE_SYNC_TIMEOUT_S or `Prefer: wait=N`);
`Prefer: respond-async`, or a wait that runs out, answers 202 with where to poll. A client that
goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from flowie.params import FACE_CROP_SIDE, FACE_TASKS, EnhanceParams, default_face_mode
from service import problems
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
)
from service.queue.base import Job, JobResult
from service.routes.answers import accepted, result_response
from service.routes.deps import SECURED, Draining, Service, ServiceState
from service.routes.enhance_body import parse_body
from service.schemas import EnhanceFields, EnhanceResult, JobStatus, enhance_openapi, problem_response

log = logging.getLogger("flowie.service.api")
router = APIRouter()


class ClientClosed(problems.Problem):
    status, title, slug, reason = 499, "Client closed request", "client-closed", "client_closed"


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


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only a disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _face_fields(service: ServiceState, fields: EnhanceFields, model_task: str) -> dict[str, str | None]:
    """faces (detect by default for a face model) and background (model when a background model
    is configured, else resize) of a request; 422 for a choice this service cannot run."""
    settings = service.settings
    default = default_face_mode(model_task)
    if settings.face_mode != "auto" and model_task in FACE_TASKS:
        default = settings.face_mode
    faces = fields.faces or default
    if faces != "detect":
        return {"faces": faces, "background": None}
    if model_task not in FACE_TASKS:
        raise problems.InvalidField("faces=detect needs a face model (task bfr); send faces=aligned")
    background = fields.background or ("model" if settings.background_task else "resize")
    if background == "model" and settings.background_task not in service.models:
        raise problems.InvalidField("background=model needs a background model (FLOWIE_BACKGROUND_TASK); "
                                    "send background=swinir or resize")
    return {"faces": faces, "background": background}


async def _decode(data: bytes, max_pixels: int) -> Any:
    """The image's RGB array (HxWx3 uint8); large images decode in a worker thread."""
    try:
        if pixels_to_decode(data, max_pixels) <= INLINE_DECODE_PIXELS:
            return decode_image(data, max_pixels)  # small: cheaper than a thread hop
        return await asyncio.to_thread(decode_image, data, max_pixels)
    except UnsupportedImage as exc:
        raise problems.UnsupportedMediaType(str(exc)) from None
    except ImageTooLarge as exc:
        raise problems.PayloadTooLarge(str(exc)) from None
    except ImageError as exc:
        raise problems.BadRequest(str(exc)) from None


async def _wait_or_disconnect(service: ServiceState, request: Request, job: Job,
                              timeout_s: float) -> JobResult | None:
    queue = service.queue
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


def _check_serving(service: ServiceState, draining: bool) -> None:
    """503 (with a stable reason code) while shutting down or when the model could not be loaded."""
    if draining:
        raise problems.ServiceUnavailable("the service is shutting down", retry_after_s=5,
                                          reason="shutting_down")
    worker = service.worker
    if worker is not None and worker.load_error:
        log.warning("refusing a job: the model could not be loaded: %s", worker.load_error)
        raise problems.ServiceUnavailable("the model could not be loaded (the service log says why)",
                                          retry_after_s=60, reason="model_load_failed")


@router.post(
    "/enhance",
    dependencies=SECURED,
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
    service: Service,
    draining: Draining,
    prefer: Annotated[str | None, Header(description="`respond-async` -> 202 at once; `wait=N` seconds")] = None,
    accept: Annotated[str | None, Header()] = None,
    x_deadline_s: Annotated[float | None, Header(alias="X-Deadline-S", ge=1, le=86400,
                                                 description="drop the job after this many seconds "
                                                 "(1 s or more; at most FLOWIE_JOB_DEADLINE_S)")] = None,
) -> Response:
    received_at = time.time()
    started = time.perf_counter()
    settings, queue, models = service.settings, service.queue, service.models
    _check_serving(service, draining)
    fields, data = await parse_body(request, settings.max_upload_bytes)
    task = fields.task or service.default_task
    if task not in models:
        raise problems.InvalidField(f"task must be one of {', '.join(models)}, got {task!r}")
    request.state.task = task
    if len(data) > settings.max_upload_bytes:
        raise problems.PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {settings.max_upload_bytes}")
    params = EnhanceParams(sampler=fields.sampler, steps=fields.steps, color_fix=fields.color_fix,
                           upscale=fields.upscale, min_side=fields.min_side, tile=fields.tile,
                           seed=fields.seed, **_face_fields(service, fields, models[task].task)).validate()
    params = params.with_defaults(models[task].defaults).check_family(models[task].family)
    if params.seed is None:
        params = EnhanceParams(**{**asdict(params), "seed": secrets.randbelow(2**31)})
    params = params.validate()
    request.state.seed = params.seed
    pixels = await _decode(data, settings.max_pixels)
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
    if service.worker is None:
        job.pixels = None  # sent (or not): the handler need not hold the array while it waits
    if respond_async:
        return accepted(job.id, task, "queued", {"Preference-Applied": "respond-async"})
    sync_s = min(settings.sync_timeout_s, wait_pref if wait_pref is not None else settings.sync_timeout_s)
    try:
        result = await _wait_or_disconnect(service, request, job, min(sync_s, job.deadline - time.time()))
    finally:
        await queue.forget(job.id)  # idempotent: the registration never outlives the handler
    if result is None:
        if time.time() >= job.deadline:
            await queue.cancel(job.id, state="expired", detail="the deadline passed while waiting")
            raise problems.DeadlineExceeded(f"the job did not finish within its {deadline_s:g} s deadline")
        return accepted(job.id, task, await queue.state(job.id) or "queued", {})
    notify_s = max(0.0, time.time() - result.finished_at) if result.finished_at else None
    response = await result_response(result, accept, time.perf_counter() - started, decode_s, notify_s)
    # Answered: nobody else asked for this result, so the queue need not keep it (after sending).
    response.background = BackgroundTask(queue.delivered, job.id)
    return response
