"""GET /jobs/{id}, GET /jobs/{id}/result, DELETE /jobs/{id}: an accepted job's status, image, cancel."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

from service import problems
from service.imaging import OUTPUT_FORMATS
from service.queue.base import TERMINAL_STATES, JobQueue
from service.routes.answers import accepted, links, problem_from_result, result_response
from service.routes.deps import SECURED, JobId, Service
from service.schemas import JobStatus, problem_response

router = APIRouter()


async def _finished(queue: JobQueue, job_id: str) -> tuple[Response | None, Any]:
    """(202 response, None) while a job runs, (None, its stored result) once it has finished."""
    state = await queue.state(job_id)
    if state is None:
        raise problems.NotFound(f"no job {job_id} (unknown, or its result expired)")
    if state not in TERMINAL_STATES:
        progress = await queue.progress(job_id) if state == "running" else None
        return accepted(job_id, "", state, {}, progress), None
    result = await queue.result(job_id)
    if result is None:
        raise problems.NotFound(f"the result of job {job_id} is gone")
    return None, result


@router.get("/jobs/{job_id}", dependencies=SECURED, summary="Where a job is", response_model=JobStatus,
            responses={202: {"description": "queued or running", "model": JobStatus},
                       404: problem_response("unknown or expired job id")})
async def job_status(request: Request, service: Service, job_id: JobId) -> Response:
    request.state.job_id = job_id
    pending, result = await _finished(service.queue, job_id)
    if pending is not None:
        return pending
    if result.state != "done":
        raise problem_from_result(result)
    request.state.seed = result.seed
    body = JobStatus(id=job_id, status="done", links=links(job_id), seed=result.seed, format=result.format,
                     width=result.width, height=result.height, timings=result.timings)
    return JSONResponse(body.model_dump(exclude_none=True))


@router.get("/jobs/{job_id}/result", dependencies=SECURED, summary="The image of a finished job",
            responses={200: {"description": "the image, or JSON with base64 when Accept: application/json",
                             "content": {m: {} for m in OUTPUT_FORMATS.values()}},
                       202: {"description": "not finished yet", "model": JobStatus},
                       404: problem_response("unknown or expired job id")})
async def job_result(request: Request, service: Service, job_id: JobId,
                     accept: Annotated[str | None, Header()] = None) -> Response:
    request.state.job_id = job_id
    started = time.perf_counter()
    pending, result = await _finished(service.queue, job_id)
    if pending is not None:
        return pending
    request.state.seed = result.seed
    return await result_response(result, accept, time.perf_counter() - started)


@router.delete("/jobs/{job_id}", dependencies=SECURED, summary="Cancel a job (or delete its result)",
               response_model=JobStatus, responses={404: problem_response("unknown or expired job id")})
async def job_cancel(request: Request, service: Service, job_id: JobId) -> Response:
    request.state.job_id = job_id
    before = await service.queue.state(job_id)
    if before is None:
        raise problems.NotFound(f"no job {job_id} (unknown, or its result expired)")
    after = await service.queue.cancel(job_id, detail="cancelled by DELETE /jobs/{id}")
    status = "deleted" if before in TERMINAL_STATES else (after or "cancelled")
    return JSONResponse(JobStatus(id=job_id, status=status, links=links(job_id)).model_dump(  # type: ignore[arg-type]
        exclude_none=True))
