"""Locust users for FlowIE Serve: a realistic POST /enhance mix, sync and async, plus GET /healthz.

Run through ``loadtests/run_load.py`` (bounded, headless, loopback only, with a report), or by
hand against a local service::

    FLOWIE_LOAD_SCALE=0.25 locust -f loadtests/locustfile.py --headless -u 2 -r 1 -t 30s \
        --host http://127.0.0.1:8000

Each user, between think times (``FLOWIE_LOAD_WAIT``, default 0.2-1.0 s), either posts one image
(weight 10) or checks /healthz (weight ``FLOWIE_LOAD_HEALTH_WEIGHT``, default 1). The image, its
size, task, sampler, output format, body kind, Accept and sync/async come from
``load_lib.mix`` (its module docstring lists the ``FLOWIE_LOAD_*`` knobs). Async jobs
(``Prefer: respond-async``) and sync requests that came back 202 are polled at
``FLOWIE_LOAD_POLL_S`` on GET /jobs/{id} until done, then fetched from GET /jobs/{id}/result.

With ``FLOWIE_LOAD_RECORDS=path.jsonl`` every request is also written there, one JSON line with
its Server-Timing (``load_lib.records``): the report's percentiles and figures come from it.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_lib, however locust is started

from load_lib import check_loopback  # noqa: E402
from load_lib.mix import Mix, MixConfig, parse_server_timing  # noqa: E402
from load_lib.records import ASYNC_E2E, Record, RecordWriter  # noqa: E402
from locust import between, events  # noqa: E402
from locust.contrib.fasthttp import FastHttpUser  # noqa: E402

CONFIG = MixConfig.from_env()
_WRITER: RecordWriter | None = None
_USER_NUMBERS = itertools.count()
_TASKS: list[str] | None = None


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    global _WRITER
    if environment.host:
        check_loopback(environment.host)  # raises: this file only loads loopback services
    path = os.environ.get("FLOWIE_LOAD_RECORDS", "")
    if path:
        _WRITER = RecordWriter(path)


@events.quitting.add_listener
def _on_quit(**_: Any) -> None:
    if _WRITER is not None:
        _WRITER.close()


@events.request.add_listener
def _on_request(request_type: str, name: str, response_time: float, response_length: int, response: Any = None,
                context: dict | None = None, exception: Any = None, start_time: float | None = None,
                **_: Any) -> None:
    if _WRITER is None:
        return
    context = dict(context or {})
    status = int(context.pop("_status", 0) or 0)
    timing = context.pop("_st", None)
    if response is not None:
        status = int(getattr(response, "status_code", 0) or 0)
        headers = getattr(response, "headers", None) or {}
        timing = parse_server_timing(headers.get("Server-Timing") or headers.get("server-timing"))
    started = start_time if start_time else time.time() - response_time / 1000.0
    error = "" if exception is None else f"{type(exception).__name__}: {exception}"[:200]
    _WRITER.write(Record(t=float(started), name=name, status=status, ms=float(response_time),
                         bytes=int(response_length or 0), error=error, st=timing or {}, ctx=context))


class EnhanceUser(FastHttpUser):
    """A client of the service: mostly restorations, now and then a health check."""

    wait_time = between(*CONFIG.think_range())
    network_timeout = 600.0  # above FLOWIE_SYNC_TIMEOUT_S (60 s by default): the service answers 202 first
    connection_timeout = 10.0

    def on_start(self) -> None:
        global _TASKS
        if _TASKS is None:
            _TASKS = []
            with self.client.get("/models", name="GET /models", headers=self._auth(),
                                 catch_response=True) as response:
                if response.status_code == 200:
                    _TASKS = [m["task"] for m in response.json().get("models", [])]
                    response.success()
        self.mix = Mix(CONFIG, _TASKS, rng_seed=CONFIG.seed * 1000 + next(_USER_NUMBERS))

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {CONFIG.api_key}"} if CONFIG.api_key else {}

    def enhance(self) -> None:
        spec = self.mix.next()
        body, headers = spec.build(CONFIG.api_key)
        context = spec.context()
        started = time.time()
        response = self.client.request("POST", "/enhance", name=spec.name, data=body, headers=headers,
                                       context=context)
        if response.status_code == 202 and response.headers.get("Location"):
            self._follow(response.headers["Location"], started, context)

    def _follow(self, location: str, started: float, context: dict) -> None:
        """Poll GET /jobs/{id} until the job is done, fetch its result, record the job's end-to-end time."""
        deadline = time.monotonic() + CONFIG.async_timeout_s
        status, timing, error = 0, {}, ""
        while time.monotonic() < deadline:
            poll = self.client.get(location, name="GET /jobs/{id}", headers=self._auth(), context=context)
            if poll.status_code == 202:
                time.sleep(CONFIG.poll_s)  # gevent-patched: yields to the other users
                continue
            status = poll.status_code
            if status == 200:
                result = self.client.get(location + "/result", name="GET /jobs/{id}/result",
                                         headers=self._auth(), context=context)
                status = result.status_code
                timing = parse_server_timing(result.headers.get("Server-Timing"))
            break
        else:
            error = f"still running after {CONFIG.async_timeout_s:g} s"
        elapsed_ms = (time.time() - started) * 1000.0
        self.environment.events.request.fire(
            request_type="JOB", name=ASYNC_E2E, response_time=elapsed_ms, response_length=0, response=None,
            context={**context, "_status": status, "_st": timing}, exception=RuntimeError(error) if error else None,
            start_time=started)

    def healthz(self) -> None:
        self.client.get("/healthz", name="GET /healthz")

    # weights: 10 restorations to FLOWIE_LOAD_HEALTH_WEIGHT health checks (0 = none)
    tasks = {enhance: 10, **({healthz: max(1, round(CONFIG.health_weight))} if CONFIG.health_weight > 0 else {})}
