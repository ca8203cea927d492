#!/usr/bin/env python3
"""Bounded HTTP load test of FlowIE Serve with a report. Loopback targets only.

Profiles (``--profile``):

* ``fixed`` (default): headless **locust** (``loadtests/locustfile.py``) with a fixed number of users,
  spawn rate and duration: the realistic mix, sync and async, plus GET /healthz.
* ``capacity``: an **open-loop asyncio + httpx** generator (``load_lib.openloop``; locust users are a
  closed loop and would hide the queue) steps a Poisson arrival rate until p99 breaks ``--slo-p99-s``
  or 429s appear, and reports the knee.
* ``hop``: one request at a time, a small image and ``restore_only`` (the least compute), to read
  the service's own overhead from Server-Timing; with ``--baseline`` (the same profile's
  report.json against `flowie serve`) it estimates the Redis hop as the difference; with a Redis
  URL (``--start redis`` or ``--redis-url``) it also times the hop directly with the service's
  queue class (``load_lib.hop``).

Target: ``--url http://127.0.0.1:PORT`` (a running service), or ``--start serve`` / ``--start redis``
(`flowie serve`, or redis-server + `flowie api` + ``--workers`` x `flowie worker`, on free ports,
stopped afterwards). Writes into ``--out``: report.md, report.json, load_latency_time.png,
load_latency_hist.png (+ load_capacity.png), records.jsonl, the /metrics pages before/after, logs.

Examples (the CPU, the tiny model)::

    python loadtests/run_load.py --start serve --model /tmp/load_tiny --scale 0.25 --users 2 --duration 30 --out /tmp/load
    python loadtests/run_load.py --url http://127.0.0.1:8000 --profile capacity --rates 0.5,1,2,3 --step-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load_lib import NotLoopback, check_loopback  # noqa: E402
from load_lib import report as rep  # noqa: E402
from load_lib.mix import Mix, MixConfig, RequestSpec  # noqa: E402
from load_lib.records import RecordWriter, read_records  # noqa: E402
from load_lib.scrape import scrape, summarize  # noqa: E402

LOCUSTFILE = HERE / "locustfile.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    target = p.add_argument_group("target")
    target.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000 (loopback only)")
    target.add_argument("--start", choices=("serve", "redis"), help="start the service here and stop it afterwards")
    target.add_argument("--model", action="append", default=[], help="model directory for --start (repeatable; "
                        "none = the service's default, models/demo)")
    target.add_argument("--workers", type=int, default=2, help="--start redis: number of `flowie worker` (2)")
    target.add_argument("--redis-hz", type=int, default=None,
                        help="--start redis: redis-server's hz (default: Redis' own, 10; see load_lib/services.py)")
    target.add_argument("--threads", type=int, default=1, help="--start: torch threads per compute process (1)")
    target.add_argument("--service-env", action="append", default=[], metavar="FLOWIE_X=V",
                        help="--start: a service setting (repeatable), e.g. FLOWIE_MAX_QUEUE=16")
    target.add_argument("--metrics-url", action="append", default=[],
                        help="more /metrics pages to scrape (workers' ports with --url; loopback only)")
    target.add_argument("--redis-url", default="", help="hop profile with --url: time the Redis hop directly there")
    target.add_argument("--ready-timeout-s", type=float, default=180.0)

    prof = p.add_argument_group("profile")
    prof.add_argument("--profile", choices=("fixed", "capacity", "hop"), default="fixed")
    prof.add_argument("--label", default="", help="a name for this run in the report")
    prof.add_argument("--users", type=int, default=2, help="fixed: locust users (2)")
    prof.add_argument("--spawn-rate", type=float, default=1.0, help="fixed: users started per second (1)")
    prof.add_argument("--duration", type=float, default=30.0, help="fixed: seconds of load (30)")
    prof.add_argument("--stop-timeout", type=float, default=60.0,
                      help="fixed: seconds users may finish their request in flight after the end (60)")
    prof.add_argument("--rates", default="", help="capacity: arrival rates per second, e.g. 0.5,1,2,4")
    prof.add_argument("--rate-start", type=float, default=0.5, help="capacity without --rates: first rate (0.5/s)")
    prof.add_argument("--rate-factor", type=float, default=1.5, help="capacity: next rate = rate x factor (1.5)")
    prof.add_argument("--max-rate", type=float, default=8.0, help="capacity: highest rate tried (8/s)")
    prof.add_argument("--step-s", type=float, default=20.0, help="capacity: seconds per rate (20)")
    prof.add_argument("--slo-p99-s", type=float, default=5.0, help="capacity: the p99 SLO in seconds (5)")
    prof.add_argument("--max-in-flight", type=int, default=64, help="capacity: the generator's connection cap (64)")
    prof.add_argument("--drain-s", type=float, default=90.0, help="capacity: wait for a step's requests (90 s)")
    prof.add_argument("--keep-going", action="store_true", help="capacity: run every rate, past the knee")
    prof.add_argument("--requests", type=int, default=100, help="hop: measured requests (100)")
    prof.add_argument("--hop-size", default="64x64", help="hop: image size sent (64x64)")
    prof.add_argument("--hop-sampler", default="restore_only", help="hop: sampler (restore_only)")
    prof.add_argument("--baseline", default="", help="hop: report.json of the hop profile on `flowie serve`")
    prof.add_argument("--direct", type=int, default=200, help="hop: jobs of the direct Redis timing (200; 0 = off)")
    prof.add_argument("--warmup", type=int, default=3, help="sequential requests before measuring, not counted (3)")
    prof.add_argument("--max-total-s", type=float, default=900.0, help="hard cap on the whole run (900 s)")

    mix = p.add_argument_group("mix (defaults from FLOWIE_LOAD_* variables, see load_lib/mix.py)")
    mix.add_argument("--scale", type=float, help="every side x SCALE (CPU: 0.25 -> 64..256 px)")
    mix.add_argument("--min-side", help="form field min_side: auto (default) or a number")
    mix.add_argument("--sizes", help=f"nominal WxH:weight list (default {MixConfig.sizes})")
    mix.add_argument("--samplers", help=f"sampler:weight list (default {MixConfig.samplers})")
    mix.add_argument("--euler-steps", help="steps of euler, comma list (4,8)")
    mix.add_argument("--async-share", type=float, help="share of Prefer: respond-async (0.25)")
    mix.add_argument("--wait", help="locust think time MIN,MAX seconds (0.2,1.0)")
    mix.add_argument("--seed", type=int, help="RNG seed of the mix (0)")
    mix.add_argument("--api-key", default=os.environ.get("FLOWIE_LOAD_API_KEY", ""),
                     help="Bearer key when the service has FLOWIE_API_KEYS (env FLOWIE_LOAD_API_KEY)")
    p.add_argument("--out", default="", help="output folder (default loadtests/out/<profile>-<time>)")
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.start):
        p.error("give exactly one of --url (a running service) or --start serve|redis")
    return args


def mix_config(args: argparse.Namespace) -> MixConfig:
    config = MixConfig.from_env()
    for name in ("scale", "sizes", "samplers", "euler_steps", "async_share", "wait", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.min_side is not None:
        config.min_side = None if args.min_side == "auto" else int(args.min_side)
    config.api_key = args.api_key or ""
    config.validate()
    return config


def rates_of(args: argparse.Namespace) -> list[float]:
    if args.rates:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    else:
        rates, rate = [], args.rate_start
        while rate <= args.max_rate + 1e-9 and len(rates) < 30:
            rates.append(round(rate, 3))
            rate *= args.rate_factor
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit("capacity: rates must be positive")
    return rates


def _tasks(url: str, api_key: str) -> list[str]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url}/models", headers=headers, timeout=10)
    response.raise_for_status()
    return [m["task"] for m in response.json().get("models", [])]


def warm_up(url: str, config: MixConfig, tasks: list[str], n: int) -> None:
    """A few sequential requests (first-call costs: allocator, lazy imports); not recorded."""
    if n <= 0:
        return
    mix = Mix(config, tasks, rng_seed=10_000 + config.seed, force_mode="sync")
    asyncio.run(_sequential(url, [mix.next() for _ in range(n)], config.api_key, None))


async def _sequential(url: str, specs: list[RequestSpec], api_key: str, writer: RecordWriter | None) -> list:
    from load_lib.openloop import run_sequential

    return await run_sequential(url, specs, api_key, writer, timeout_s=300.0)


# --- profiles ------------------------------------------------------------------------------------
def run_fixed(args: argparse.Namespace, url: str, config: MixConfig, out: Path, deadline: float) -> dict[str, Any]:
    records = out / "records.jsonl"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users),
           "-r", f"{args.spawn_rate:g}", "-t", f"{max(1, int(round(args.duration)))}s", "--host", url,
           "--stop-timeout", f"{int(args.stop_timeout)}", "--csv", str(out / "locust"), "--only-summary",
           "--loglevel", "WARNING", "--logfile", str(out / "locust.log"), "--exit-code-on-error", "0"]
    env = {**os.environ, **config.to_env(), "FLOWIE_LOAD_RECORDS": str(records)}
    limit = args.duration + args.stop_timeout + 60
    limit = min(limit, max(10.0, deadline - time.monotonic()))
    with open(out / "locust_stdout.txt", "wb") as log:
        process = subprocess.Popen(cmd, cwd=HERE.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            code = None
    return {"generator": "locust " + _locust_version(), "locust_command": shlex.join(cmd), "locust_exit": code,
            "records": str(records)}


def _locust_version() -> str:
    try:
        from importlib.metadata import version

        return version("locust")
    except Exception:  # noqa: BLE001
        return "?"


def step_stats(records: list, step: int, rate: float, duration_s: float, slo_ms: float) -> dict[str, Any]:
    rs = [r for r in records if r.step == step]
    ok = [r.ms for r in rs if r.status == 200]
    rejected = sum(1 for r in rs if r.status == 429)
    server = sum(1 for r in rs if r.status >= 500)
    other = sum(1 for r in rs if r.status not in (200, 202, 429) and r.status < 500)
    answered = [r.ms for r in rs if r.status in (200, 202)]  # every request's latency counts toward p99
    all_lat = [r.ms for r in rs]
    p99 = rep.pct(all_lat, 0.99)
    return {"step": step, "rate": rate, "duration_s": duration_s, "sent": len(rs), "ok": len(ok),
            "ok_per_s": len(ok) / duration_s if duration_s else None,
            "p50_ms": rep.pct(all_lat, 0.5), "p95_ms": rep.pct(all_lat, 0.95), "p99_ms": p99,
            "p50_ok_ms": rep.pct(ok, 0.5), "p99_ok_ms": rep.pct(ok, 0.99), "answered": len(answered),
            "rejected_429": rejected, "server_errors": server, "other_errors": other,
            "slo_ok": bool(rs) and p99 is not None and p99 <= slo_ms and rejected == 0 and server == 0}


def run_capacity(args: argparse.Namespace, url: str, config: MixConfig, tasks: list[str], out: Path,
                 deadline: float) -> dict[str, Any]:
    from load_lib.openloop import run_steps

    records_path = out / "records.jsonl"
    writer = RecordWriter(records_path)
    rates = rates_of(args)
    slo_ms = args.slo_p99_s * 1000
    step_rows: list[dict[str, Any]] = []
    mix = Mix(config, tasks, rng_seed=config.seed, force_mode="sync")
    t_start = time.time()
    step_starts: dict[int, float] = {}

    def stop_after(result: Any) -> bool:
        records_now = read_records(records_path)
        row = step_stats(records_now, result.step, result.rate, result.duration_s, slo_ms)
        ends = [r.t + r.ms / 1000 for r in records_now if r.step == result.step]
        # answers counted for the step: those done by its end + the first (least loaded) step's p95 latency,
        # so that the requests that arrive at the very end are not taken for a backlog
        allowance_s = max(0.5, ((step_rows[0] if step_rows else row)["p95_ms"] or 0) / 1000)
        in_window = sum(1 for r in records_now if r.step == result.step and r.status == 200
                        and r.t + r.ms / 1000 <= result.end_wall + allowance_s)
        row.update(client_saturated=result.client_saturated, unfinished=result.unfinished,
                   offered_per_s=row["sent"] / result.duration_s, done_allowance_s=allowance_s,
                   done_in_step_per_s=in_window / result.duration_s,
                   backlog_s=max(0.0, max(ends) - result.end_wall) if ends else 0.0)
        # informational: the service no longer keeps up when the step's answers fall below 90 % of its arrivals
        row["saturated"] = bool(row["sent"]) and row["done_in_step_per_s"] < 0.9 * row["offered_per_s"]
        if result.unfinished or result.client_saturated:
            row["slo_ok"] = False
        reasons = []
        if row["p99_ms"] is not None and row["p99_ms"] > slo_ms:
            reasons.append("p99 over SLO")
        if row["rejected_429"]:
            reasons.append("429s")
        if row["server_errors"]:
            reasons.append("5xx")
        if result.unfinished:
            reasons.append("unfinished")
        if result.client_saturated:
            reasons.append("generator saturated")
        row["verdict"] = "ok" if row["slo_ok"] else ", ".join(reasons) or "no requests"
        step_rows.append(row)
        print(f"[capacity] rate {result.rate:g}/s: sent {row['sent']}, 200/s {row['ok_per_s']:.2f}, "
              f"p50 {row['p50_ms'] or 0:.0f} ms, p99 {row['p99_ms'] or 0:.0f} ms, 429 {row['rejected_429']} -> "
              f"{row['verdict']}", flush=True)
        if time.monotonic() + args.step_s + args.drain_s > deadline:
            row["verdict"] += " (time cap reached: search stopped)"
            return True
        return (not row["slo_ok"]) and not args.keep_going

    try:
        asyncio.run(run_steps(url, mix, config.api_key, rates, args.step_s, writer, max_in_flight=args.max_in_flight,
                              drain_s=args.drain_s, stop_after=stop_after, seed=config.seed))
    finally:
        writer.close()
    records = read_records(records_path)
    t_first = min((r.t for r in records), default=t_start)  # the figures' time zero
    for row in step_rows:
        rs = [r for r in records if r.step == row["step"]]
        step_starts[row["step"]] = (min(r.t for r in rs) - t_first) if rs else 0.0
    passing = [r for r in step_rows if r["slo_ok"]]
    failing = [r for r in step_rows if not r["slo_ok"]]
    knee = passing[-1] if passing and (not failing or failing[0]["step"] > passing[-1]["step"]) else None
    first_fail = failing[0] if failing else None
    saturated = next((r for r in step_rows if r.get("saturated")), None)
    if knee and first_fail:
        text = (f"between {knee['rate']:g}/s (last rate within the SLO: p99 {knee['p99_ms']:.0f} ms, "
                f"{knee['ok_per_s']:.2f} images/s) and {first_fail['rate']:g}/s ({first_fail['verdict']})")
    elif knee:
        text = f"not reached: every rate up to {knee['rate']:g}/s met the SLO (raise --max-rate)"
    elif first_fail:
        text = f"below the first rate {first_fail['rate']:g}/s ({first_fail['verdict']}); lower --rate-start"
    else:
        text = "no steps ran"
    if saturated:
        text += (f"; throughput stopped following the arrivals (answers by the step's end < 90 % of arrivals) "
                 f"first at {saturated['rate']:g}/s ({saturated['done_in_step_per_s']:.2f} of "
                 f"{saturated['offered_per_s']:.2f}/s)")
    return {"generator": "open-loop asyncio + httpx (load_lib/openloop.py)", "records": str(records_path),
            "capacity": {"rates": rates, "step_s": args.step_s, "slo_p99_s": args.slo_p99_s,
                         "max_in_flight": args.max_in_flight, "steps": step_rows,
                         "knee_rate": knee["rate"] if knee else None,
                         "knee_images_per_s": knee["ok_per_s"] if knee else None,
                         "first_failing_rate": first_fail["rate"] if first_fail else None, "knee_text": text,
                         "first_saturated_rate": saturated["rate"] if saturated else None,
                         "step_starts_s": {str(k): v for k, v in step_starts.items()}}}


def run_hop(args: argparse.Namespace, url: str, config: MixConfig, tasks: list[str], out: Path,
            redis_url: str) -> dict[str, Any]:
    from load_lib.mix import parse_size

    records_path = out / "records.jsonl"
    w, h = parse_size(args.hop_size)
    spec = RequestSpec(task=tasks[0] if tasks else None, width=w, height=h, nominal=f"{w}x{h}",
                       sampler=args.hop_sampler, steps=None, output_format="png", mode="sync", body="multipart",
                       accept_json=False, input_format="png", min_side=config.effective_min_side() or 128)
    asyncio.run(_sequential(url, [spec] * max(0, args.warmup), config.api_key, None))
    writer = RecordWriter(records_path)
    try:
        asyncio.run(_sequential(url, [spec] * args.requests, config.api_key, writer))
    finally:
        writer.close()
    breakdown = rep.timing_breakdown(read_records(records_path))
    ms = breakdown["ms"]
    hop: dict[str, Any] = {"spec": spec.context(), "requests": args.requests,
                           "server_overhead_ms_p50": ms["server_overhead"]["p50"]}
    hop["server_side_ms"] = {k: {"p50": ms[k]["p50"], "p95": ms[k]["p95"]} for k in
                             ("e2e", "http", "decode", "queue", "pickup", "compute", "post", "notify",
                              "server_overhead", "overhead", "server_total") if k in ms}
    text = [f"{args.requests} sequential `{spec.sampler}` requests of {spec.width}x{spec.height} (min_side "
            f"{spec.min_side}); p50 ms: end to end {rep._f(ms['e2e']['p50'], 2)}, HTTP {rep._f(ms['http']['p50'], 2)}, "
            f"decode {rep._f(ms.get('decode', {}).get('p50'), 2)}, queue {rep._f(ms['queue']['p50'], 2)} (pickup "
            f"{rep._f(ms.get('pickup', {}).get('p50'), 2)}), compute {rep._f(ms['compute']['p50'], 2)}, post "
            f"{rep._f(ms['post']['p50'], 2)} (notify {rep._f(ms.get('notify', {}).get('p50'), 2)})."]
    if args.baseline:
        base = json.loads(Path(args.baseline).read_text())
        bms = base["server_timing"]["ms"]
        queue_d = _diff(ms["queue"]["p50"], bms["queue"]["p50"])
        post_d = _diff(ms["post"]["p50"], bms["post"]["p50"])
        # p50 of each run's per-request (server total - compute): everything server-side but the model
        base_over = (bms.get("server_overhead") or {}).get("p50")
        if base_over is None:  # a baseline written before the field existed
            base_over = _diff(bms["server_total"]["p50"], bms["compute"]["p50"])
        over_d = _diff(ms["server_overhead"]["p50"], base_over)
        hop["from_headers"] = {"baseline": args.baseline, "baseline_mode": base.get("service", {}).get("mode"),
                               "pickup_ms_p50": queue_d, "wakeup_ms_p50": post_d, "hop_ms_p50": over_d,
                               "goal_ms": 2.0}
        text.append(f"Against the baseline ({args.baseline}): queue +{rep._f(queue_d, 2)} ms (enqueue → pickup), "
                    f"post +{rep._f(post_d, 2)} ms (result → wake-up); the p50 of (server total − compute) differs by "
                    f"{rep._f(over_d, 2)} ms = the Redis hop estimate (goal ≤ 2 ms).")
    if redis_url and args.direct > 0:
        from load_lib import hop as direct_hop

        hop["direct"] = direct_hop.measure(redis_url, n=args.direct, warmup=20)
        text.append(f"Direct (RedisJobQueue, {args.direct} jobs): hop p50 {rep._f(hop['direct']['ms']['hop']['p50'], 2)} ms, "
                    f"p95 {rep._f(hop['direct']['ms']['hop']['p95'], 2)} ms.")
    hop["text"] = " ".join(text)
    return {"generator": "sequential httpx (load_lib/openloop.run_sequential)", "records": str(records_path), "hop": hop}


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's two goals, as far as this run measured them."""
    config = report["config"]
    share = (report.get("server_timing") or {}).get("overhead_share_p50", {}).get("ratio_of_p50s")
    if config["profile"] == "capacity":
        condition = "capacity search: queueing at high rates counts as overhead, not comparable to the goal"
        share = None
    elif config["profile"] == "hop":
        condition = "one request at a time, least compute (restore_only): the worst case of the share"
    elif config["users"] > 1:
        condition = f"{config['users']} users: includes waiting behind other users' batches (contention)"
    else:
        condition = "one user: no request waits behind another"
    out: dict[str, Any] = {"overhead_share_p50": {"value": share, "goal": 0.05, "condition": condition,
                                                  "met": None if share is None else share <= 0.05}}
    hop = report.get("hop") or {}
    headers = (hop.get("from_headers") or {}).get("hop_ms_p50")
    direct = ((hop.get("direct") or {}).get("ms") or {}).get("hop", {}).get("p50")
    if headers is not None or direct is not None:
        out["redis_hop_p50_ms"] = {"from_headers": headers, "direct": direct, "goal": 2.0,
                                   "met_from_headers": None if headers is None else headers <= 2.0,
                                   "met_direct": None if direct is None else direct <= 2.0}
    return out


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.monotonic()
    deadline = t_begin + args.max_total_s
    try:
        for url in ([args.url] if args.url else []) + args.metrics_url + ([args.redis_url] if args.redis_url else []):
            if url.startswith("redis://"):
                check_loopback("http://" + url[len("redis://"):])
            else:
                check_loopback(url)
    except NotLoopback as exc:
        print(f"run_load: {exc}", file=sys.stderr)
        return 2
    config = mix_config(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or HERE / "out" / f"{args.profile}-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("records.jsonl", "report.json", "report.md"):
        (out / stale).unlink(missing_ok=True)
    settings = {}
    for item in args.service_env:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"run_load: --service-env wants FLOWIE_X=VALUE, got {item!r}", file=sys.stderr)
            return 2
        settings[key.strip()] = value
    if args.profile == "hop":
        settings.setdefault("FLOWIE_MAX_WAIT_MS", "0")  # one request at a time: no batch mate will come

    service = None
    service_info: dict[str, Any] = {}
    loadavg_before = rep.machine()["loadavg_1_5_15"]
    try:
        if args.start:
            from load_lib.services import start_service

            print(f"[run_load] starting {args.start} ...", flush=True)
            service = start_service(args.start, out / "service", models=args.model, workers=args.workers,
                                    threads=args.threads, settings=settings, ready_timeout_s=args.ready_timeout_s,
                                    redis_hz=args.redis_hz)
            url = service.url
            metrics_urls = service.metrics_urls + args.metrics_url
            service_info = {**service.describe(), "workers": args.workers if args.start == "redis" else 1,
                            "threads": args.threads}
        else:
            url = check_loopback(args.url)
            metrics_urls = [f"{url}/metrics"] + args.metrics_url
            service_info = {"mode": "running service (--url)", "url": url, "metrics_urls": metrics_urls}
        redis_url = args.redis_url or (service.redis_url if service else "")
        tasks = _tasks(url, config.api_key)
        service_info["tasks"] = tasks
        if args.profile != "hop":
            print(f"[run_load] warm-up: {args.warmup} requests", flush=True)
            warm_up(url, config, tasks, args.warmup)
        before = scrape(metrics_urls)
        t_run = time.time()
        print(f"[run_load] {args.profile} profile against {url} ...", flush=True)
        if args.profile == "fixed":
            result = run_fixed(args, url, config, out, deadline)
        elif args.profile == "capacity":
            result = run_capacity(args, url, config, tasks, out, deadline)
        else:
            result = run_hop(args, url, config, tasks, out, redis_url)
        time.sleep(0.5)  # let the last batch's metrics land
        after = scrape(metrics_urls)
        (out / "metrics_before.json").write_text(json.dumps({u: p["ok"] for u, p in before["pages"].items()}))
        if service is not None:
            service.check_alive()
            service_info["alive_at_end"] = True
    finally:
        if service is not None:
            service_info["exit_codes"] = service.stop()
    loadavg_after = rep.machine()["loadavg_1_5_15"]

    records = read_records(result["records"])
    cmdline = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["run_load.py", *argv])
    meta = {"date_utc": rep.now_utc(), "machine": rep.machine(), "loadavg_before": loadavg_before,
            "loadavg_after": loadavg_after, "command": cmdline, "git": rep.git_revision(HERE.parent),
            "wall_s": time.monotonic() - t_begin}
    config_info = {"profile": args.profile, "label": args.label, "target": url, "generator": result["generator"],
                   "users": args.users, "spawn_rate": args.spawn_rate, "duration_s": args.duration,
                   "stop_timeout_s": args.stop_timeout, "warmup": args.warmup, "mix": config.describe(),
                   "service_settings": settings}
    for key in ("locust_command", "locust_exit"):
        if key in result:
            config_info[key] = result[key]
    report = rep.base_report(config_info, service_info, records, summarize(before, after), meta)
    for key in ("capacity", "hop"):
        if key in result:
            report[key] = result[key]
    report["goals"] = goals(report)
    if not records:
        report["notes"].append("no requests were recorded: see locust_stdout.txt / locust.log and the service logs")
    if result.get("locust_exit") is None and args.profile == "fixed":
        report["notes"].append("locust did not exit in time and was stopped")
    title = (f"{args.label or args.profile}: {service_info.get('mode')} — {report['overall']['requests']} requests, "
             f"{meta['machine']['cpus']} CPU, load avg {loadavg_before[0]:.1f}" if loadavg_before else "")
    t0 = rep.window(records)[0] if records else t_run
    steps = None
    if "capacity" in result:
        steps = [{"start_s": s, "rate": result["capacity"]["rates"][int(k)]}
                 for k, s in result["capacity"]["step_starts_s"].items()]
    files = {"report.md": "report.md", "report.json": "report.json", "records": "records.jsonl"}
    if records:
        rep.plot_over_time(records, t0, out / "load_latency_time.png", title, steps)
        rep.plot_histogram(records, out / "load_latency_hist.png", title)
        files.update({"latency over time": "load_latency_time.png", "latency histogram": "load_latency_hist.png"})
        if "capacity" in result and result["capacity"]["steps"]:
            rep.plot_capacity(result["capacity"]["steps"], out / "load_capacity.png", title, args.slo_p99_s)
            files["capacity curve"] = "load_capacity.png"
    if args.profile == "fixed":
        files.update({"locust stats": "locust_stats.csv", "locust log": "locust.log"})
    if service is not None:
        files["service logs"] = "service/"
    report["files"] = files
    rep.write(report, out)
    overall = report["overall"]
    print(f"[run_load] {overall['requests']} requests, {overall['images_done']} images, errors {overall['errors']} "
          f"(5xx {overall['server_errors_5xx']}); report: {out / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
