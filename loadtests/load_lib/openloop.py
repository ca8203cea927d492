"""An open-loop load generator on asyncio + httpx, for the capacity search and the hop measurement.

Why not locust here: locust users are a closed loop — a user waits for its answer before it
sends again, so when the service slows down the offered load drops with it and the queue never
builds (coordinated omission). A capacity search must hold the arrival rate whatever the
latency: requests arrive as a Poisson process at ``rate`` per second and each runs on its own
task. The only bound is ``max_in_flight`` (connections): an arrival that finds it full is
counted as ``client_saturated`` (the generator's own limit, reported, never silent).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from .mix import Mix, RequestSpec, parse_server_timing
from .records import Record, RecordWriter


@dataclass
class StepResult:
    step: int
    rate: float
    duration_s: float
    sent: int = 0
    client_saturated: int = 0
    unfinished: int = 0
    start_wall: float = 0.0  # unix seconds when the step's arrivals began
    end_wall: float = 0.0  # ... and ended (its requests may still be running)


async def _one(client: Any, spec: RequestSpec, api_key: str, writer: RecordWriter, step: int | None,
               rate: float | None, timeout_s: float) -> None:
    body, headers = spec.build(api_key)
    started_wall = time.time()
    started = time.perf_counter()
    status, error, timing, size = 0, "", {}, 0
    try:
        response = await client.post("/enhance", content=body, headers=headers, timeout=timeout_s)
        status = response.status_code
        size = len(response.content)
        timing = parse_server_timing(response.headers.get("server-timing"))
        if status >= 400:
            error = response.headers.get("content-type", "")[:40]
    except Exception as exc:  # noqa: BLE001 - every failure is a record
        error = f"{type(exc).__name__}: {exc}"[:200]
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    writer.write(Record(t=started_wall, name=spec.name, status=status, ms=elapsed_ms, bytes=size, error=error,
                        st=timing, ctx=spec.context(), step=step, rate=rate))


async def run_steps(base_url: str, mix: Mix, api_key: str, rates: list[float], step_s: float, writer: RecordWriter,
                    *, max_in_flight: int = 64, timeout_s: float = 120.0, drain_s: float = 60.0,
                    stop_after: Any = None, seed: int = 0) -> list[StepResult]:
    """Offer each rate for ``step_s`` seconds; after a step, wait up to ``drain_s`` for its requests.

    ``stop_after(step_result) -> bool`` (called after each step has drained) ends the search early.
    """
    import httpx

    rng = random.Random(seed)
    results: list[StepResult] = []
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s) as client:
        for index, rate in enumerate(rates):
            result = StepResult(step=index, rate=rate, duration_s=step_s)
            in_flight: set[asyncio.Task[None]] = set()
            start = time.perf_counter()
            result.start_wall = time.time()
            next_at = start + rng.expovariate(rate)
            while True:
                now = time.perf_counter()
                if next_at >= start + step_s:
                    break
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                if len(in_flight) >= max_in_flight:
                    result.client_saturated += 1
                else:
                    task = asyncio.create_task(_one(client, mix.next(), api_key, writer, index, rate, timeout_s))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    result.sent += 1
                next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, start + step_s - time.perf_counter()))
            result.end_wall = time.time()
            if in_flight:
                done, pending = await asyncio.wait(set(in_flight), timeout=drain_s)
                for task in pending:
                    task.cancel()
                result.unfinished = len(pending)
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
            results.append(result)
            if stop_after is not None and stop_after(result):
                break
    return results


async def run_sequential(base_url: str, specs: list[RequestSpec], api_key: str, writer: RecordWriter | None,
                         *, timeout_s: float = 60.0, pause_s: float = 0.0) -> list[Record]:
    """One request at a time (no queueing behind other requests): the hop profile."""
    import httpx

    out: list[Record] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as client:
        for spec in specs:
            body, headers = spec.build(api_key)
            started_wall = time.time()
            started = time.perf_counter()
            try:
                response = await client.post("/enhance", content=body, headers=headers)
                record = Record(t=started_wall, name=spec.name, status=response.status_code,
                                ms=(time.perf_counter() - started) * 1000.0, bytes=len(response.content),
                                st=parse_server_timing(response.headers.get("server-timing")), ctx=spec.context())
            except Exception as exc:  # noqa: BLE001
                record = Record(t=started_wall, name=spec.name, status=0, ms=(time.perf_counter() - started) * 1000.0,
                                error=f"{type(exc).__name__}: {exc}"[:200], ctx=spec.context())
            out.append(record)
            if writer is not None:
                writer.write(record)
            if pause_s:
                await asyncio.sleep(pause_s)
    return out
