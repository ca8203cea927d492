"""The Redis hop measured directly with the service's own queue class, without HTTP and without compute.

An "API" (``RedisJobQueue(listen=True)``, this process) submits a job, as the API does for a small
upload (its bytes and its decoded pixels), and waits for it; a "worker"
(``RedisJobQueue(listen=False)``, a child process) takes it, does what ``service.worker.Worker``
does with a lone job (sends ``begin``, "which of these have a result; mark the rest running", and
goes on without waiting for the answer, which comes back during compute), awaits that answer
(there is no compute here for it to overlap) and finishes the job with a 1-pixel result.
Timestamps are ``time.perf_counter()``, which on Linux is CLOCK_MONOTONIC and so comparable
between the two processes. Per job:

* ``enqueue``  submit(): the admission script (XLEN + XADD + HSET);
* ``pickup``   submit returned -> the worker's XREADGROUP returned the entry;
* ``prep``     the worker's work before compute would start (the check sent, not answered);
* ``check``    the check's answer (overlaps compute in the service: not part of the hop);
* ``wake``     the worker starts finish() (store script: result hash + LPUSH of the result + XACK)
               -> wait() returned in the API (the BLPOP listener handed the result to the future);
* ``hop``      = enqueue + pickup + prep + wake (the whole transport; there is no compute);
* ``ping_rtt_ms``: one PING through the same client library, the floor of every round trip above.

Run as a script the module is the worker: ``python hop.py worker URL PREFIX TASK N``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TASK = "hopbench"


async def _worker(url: str, prefix: str, task: str, n: int) -> None:
    from service.queue.base import JobResult
    from service.queue.redis_streams import RedisJobQueue

    queue = RedisJobQueue(url, tasks=[task], prefix=prefix, listen=False)
    await queue.start()
    print("ready", flush=True)
    done = 0
    idle_until = time.monotonic() + 30
    try:
        while done < n and time.monotonic() < idle_until:
            for delivery in await queue.take([task], "hop-worker", 1, 1.0):
                picked = time.perf_counter()
                check = asyncio.ensure_future(queue.begin([delivery]))
                await asyncio.sleep(0)  # the worker's loop sends it as compute starts in its thread
                prepared = time.perf_counter()
                await check
                checked = time.perf_counter()
                result = JobResult(id=delivery.job.id, state="done", image=b"\x00", media_type="image/png",
                                   format="png", width=1, height=1, seed=0, finished_at=time.time(),
                                   timings={"picked": picked, "prepared": prepared, "checked": checked})
                await queue.finish(delivery, result)
                done += 1
                idle_until = time.monotonic() + 30
    finally:
        await queue.close()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def _api(url: str, n: int, warmup: int, payload_bytes: int, timeout_s: float) -> dict[str, Any]:
    from service.queue.base import Job
    from service.queue.redis_streams import RedisJobQueue

    prefix = "hop" + uuid.uuid4().hex[:8]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, __file__, "worker", url, prefix, TASK, str(n + warmup)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    queue = RedisJobQueue(url, tasks=[TASK], prefix=prefix, listen=True, max_queue=10_000)
    rows: list[dict[str, float]] = []
    pings: list[float] = []
    try:
        line = child.stdout.readline().decode().strip() if child.stdout else ""
        if line != "ready":
            raise RuntimeError(f"hop worker did not start: {line}")
        await queue.start()
        for _ in range(100):  # the floor: one round trip of the same client library
            t = time.perf_counter()
            await queue.ping()
            pings.append((time.perf_counter() - t) * 1000)
        payload = os.urandom(payload_bytes)
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)  # a small upload's decoded pixels travel with it
        for i in range(n + warmup):
            now = time.time()
            job = Job(id=uuid.uuid4().hex, task=TASK, params={}, output_format="png", quality=None, image=payload,
                      created_at=now, deadline=now + 60, pixels=pixels)
            t0 = time.perf_counter()
            await queue.submit(job, wait=True)
            t1 = time.perf_counter()
            result = await queue.wait(job.id, timeout_s)
            t2 = time.perf_counter()
            await queue.forget(job.id)
            if result is None:
                raise RuntimeError(f"job {i} not done within {timeout_s} s")
            picked, prepared, checked = (result.timings[k] for k in ("picked", "prepared", "checked"))
            if i >= warmup:
                rows.append({"enqueue": t1 - t0, "pickup": picked - t1, "prep": prepared - picked,
                             "check": checked - prepared, "wake": t2 - checked,
                             "hop": (t2 - t0) - (checked - prepared)})
    finally:
        await queue.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)
        try:  # the benchmark's keys
            import redis

            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        except Exception:  # noqa: BLE001 - cleanup only
            pass
    summary: dict[str, Any] = {"n": len(rows), "warmup": warmup, "payload_bytes": payload_bytes, "ms": {},
                               "ping_rtt_ms": {"p50": _pct(pings, 0.5), "p95": _pct(pings, 0.95)}}
    for key in ("enqueue", "pickup", "prep", "check", "wake", "hop"):
        values = [r[key] * 1000 for r in rows]
        summary["ms"][key] = {"p50": _pct(values, 0.5), "p95": _pct(values, 0.95), "p99": _pct(values, 0.99),
                              "max": max(values) if values else float("nan"),
                              "mean": statistics.fmean(values) if values else float("nan")}
    return summary


def measure(redis_url: str, n: int = 200, warmup: int = 20, payload_bytes: int = 20_000,
            timeout_s: float = 10.0) -> dict[str, Any]:
    """Run the direct hop measurement against ``redis_url`` (a loopback Redis); see the module docstring."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return asyncio.run(_api(redis_url, n, warmup, payload_bytes, timeout_s))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "worker":
        sys.path.insert(0, str(ROOT))
        asyncio.run(_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    else:
        sys.exit("usage: hop.py worker URL PREFIX TASK N (started by load_lib.hop.measure)")
