"""Answers the enhance and jobs routes share: 202 job statuses, finished results, failed jobs.

A result asked for as JSON carries its image as base64; the encoding and the JSON rendering of
that (large) body run in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64

from fastapi.responses import JSONResponse, Response

from service import problems
from service.queue.base import JobResult
from service.schemas import EnhanceResult, JobStatus


def problem_from_result(result: JobResult) -> problems.Problem:
    """The problem a failed, cancelled or expired job's stored result describes."""
    info = result.problem or {}
    problem = problems.Problem(str(info.get("detail", f"the job ended {result.state}")),
                               **{k: v for k, v in info.items() if k not in ("status", "title", "slug", "detail")})
    problem.status = int(info.get("status", 500))
    problem.title = str(info.get("title", "Job failed"))
    problem.slug = str(info.get("slug", "job-failed"))
    problem.reason = "deadline" if result.state == "expired" else None
    return problem


def wants_json(accept: str | None) -> bool:
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


def server_timing(result: JobResult, total_s: float, decode_s: float | None = None,
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


def links(job_id: str) -> dict[str, str]:
    return {"self": f"/jobs/{job_id}", "result": f"/jobs/{job_id}/result"}


def accepted(job_id: str, task: str, status: str, headers: dict[str, str],
             progress: dict[str, object] | None = None) -> JSONResponse:
    """202 with the job's status and where to poll."""
    body = JobStatus(id=job_id, status=status, task=task, links=links(job_id),  # type: ignore[arg-type]
                     progress=progress)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=202,
                        headers={"Location": f"/jobs/{job_id}", "Retry-After": "1", **headers})


def _json_result(result: JobResult, headers: dict[str, str]) -> JSONResponse:
    """The result as JSON, the image base64 (run in a thread: megabytes to encode and render)."""
    body = EnhanceResult(id=result.id, image=base64.b64encode(result.image).decode("ascii"),
                         format=result.format, width=result.width, height=result.height,
                         seed=int(result.seed or 0),
                         timings={**result.timings, "queue": result.queue_s, "compute": result.compute_s},
                         faces=result.faces)
    return JSONResponse(body.model_dump(exclude_none=True), headers=headers)


async def result_response(result: JobResult, accept: str | None, total_s: float, decode_s: float | None = None,
                          notify_s: float | None = None) -> Response:
    """A finished job's answer: the image bytes, or JSON when the client prefers it; a problem if it failed."""
    if result.state != "done":
        raise problem_from_result(result)
    headers = {"X-Seed": str(result.seed), "Server-Timing": server_timing(result, total_s, decode_s, notify_s),
               "X-Job-ID": result.id}
    if result.faces is not None:
        headers["X-Faces"] = str(len(result.faces))
    if wants_json(accept):
        return await asyncio.to_thread(_json_result, result, headers)
    return Response(content=result.image, media_type=result.media_type, headers=headers)
