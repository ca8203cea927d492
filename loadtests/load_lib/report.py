"""Statistics of a load run, and the files it leaves: report.json, report.md and two (or three) figures.

Latencies are client-side (request sent -> last byte read). The service's Server-Timing header
(decode, queue, pickup, compute, notify, total; ms) splits each answered POST /enhance:

* ``http``     = client latency - server total (connection, upload, download, the client itself);
* ``decode``   = handler start -> admission (reading, parsing and decoding the upload);
* ``queue``    = admission -> compute start (the queue itself, the batching window and, with Redis,
                 the worker's pickup and its checks before compute); answers of services that send
                 no ``decode`` entry count the upload's parsing and decoding here;
* ``pickup``   = admission -> a worker received the job (the first part of ``queue``);
* ``compute``  = the job's batch in the worker (pipeline + output encoding);
* ``post``     = server total - decode - queue - compute (storing the result, waking the handler,
                 the answer); ``notify`` = result ready in the worker -> the handler has it (part of it);
* ``overhead`` = client latency - compute: everything that is not the model (goal: <= 5 % at p50).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .records import ASYNC_E2E, Record

SCHEMA = "flowie-load-report/1"
ENHANCE_SYNC = "POST /enhance [sync]"


def pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(math.floor(k))
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def dist(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None, "p50": pct(values, 0.5),
            "p95": pct(values, 0.95), "p99": pct(values, 0.99), "max": max(values) if values else None,
            "min": min(values) if values else None}


def ok_status(status: int) -> bool:
    return 200 <= status < 400


def window(records: list[Record]) -> tuple[float, float]:
    """(first start, last end) in unix seconds."""
    if not records:
        return 0.0, 0.0
    return min(r.t for r in records), max(r.t + r.ms / 1000.0 for r in records)


def endpoint_stats(records: list[Record], span_s: float) -> dict[str, Any]:
    by_name: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_name[r.name].append(r)
    out = {}
    for name in sorted(by_name):
        rs = by_name[name]
        latencies = [r.ms for r in rs]
        statuses = Counter(str(r.status) for r in rs)
        errors = sum(1 for r in rs if not ok_status(r.status))
        out[name] = {
            "count": len(rs), "ok": len(rs) - errors, "errors": errors,
            "error_rate": errors / len(rs) if rs else 0.0,
            "throughput_rps": len(rs) / span_s if span_s > 0 else None,
            "ok_throughput_rps": (len(rs) - errors) / span_s if span_s > 0 else None,
            "latency_ms": dist(latencies), "latency_ok_ms": dist([r.ms for r in rs if ok_status(r.status)]),
            "status": dict(sorted(statuses.items())),
        }
    return out


def overall_stats(records: list[Record], span_s: float) -> dict[str, Any]:
    """Every HTTP request (the async end-to-end pseudo-records are not requests: left out)."""
    real = [r for r in records if r.name != ASYNC_E2E]
    statuses = Counter(str(r.status) for r in real)
    errors = sum(1 for r in real if not ok_status(r.status))
    server_errors = sum(1 for r in real if r.status >= 500)
    images = sum(1 for r in real if r.name == ENHANCE_SYNC and r.status == 200) + \
        sum(1 for r in records if r.name == ASYNC_E2E and r.status == 200)
    return {
        "requests": len(real), "span_s": span_s,
        "throughput_rps": len(real) / span_s if span_s > 0 else None,
        "images_done": images, "images_per_s": images / span_s if span_s > 0 else None,
        "errors": errors, "error_rate": errors / len(real) if real else 0.0,
        "server_errors_5xx": server_errors, "no_answer": statuses.get("0", 0),
        "status": dict(sorted(statuses.items())),
        "error_rate_by_status": {k: v / len(real) for k, v in sorted(statuses.items())
                                 if not ok_status(int(k))} if real else {},
    }


def timing_breakdown(records: list[Record]) -> dict[str, Any]:
    """Server-Timing split of the answered sync POST /enhance (see the module docstring)."""
    rows = [r for r in records if r.name == ENHANCE_SYNC and r.status == 200 and
            {"queue", "compute", "total"} <= set(r.st)]
    e2e = [r.ms for r in rows]
    parts: dict[str, list[float]] = {"e2e": e2e, "server_total": [], "http": [], "decode": [], "queue": [],
                                     "pickup": [], "compute": [], "post": [], "notify": [], "server_overhead": [],
                                     "overhead": [], "overhead_share": []}
    for r in rows:
        total, queue, compute = r.st["total"], r.st["queue"], r.st["compute"]
        decode = r.st.get("decode", 0.0)
        parts["server_total"].append(total)
        parts["http"].append(r.ms - total)
        parts["queue"].append(queue)
        parts["compute"].append(compute)
        parts["post"].append(total - decode - queue - compute)
        for optional in ("decode", "pickup", "notify"):  # absent from older services' answers
            if optional in r.st:
                parts[optional].append(r.st[optional])
        parts["server_overhead"].append(total - compute)
        parts["overhead"].append(r.ms - compute)
        parts["overhead_share"].append((r.ms - compute) / r.ms if r.ms > 0 else 0.0)
    out: dict[str, Any] = {"n": len(rows), "ms": {k: dist(v) for k, v in parts.items() if k != "overhead_share"}}
    p50_e2e = pct(e2e, 0.5)
    p50_over = pct(parts["overhead"], 0.5)
    out["overhead_share_p50"] = {
        # two readings of "overhead as a share of end-to-end latency at p50"
        "ratio_of_p50s": (p50_over / p50_e2e) if p50_e2e and p50_over is not None else None,
        "p50_of_ratios": pct(parts["overhead_share"], 0.5),
        "goal": 0.05,
    }
    return out


def time_series(records: list[Record], t0: float, bin_s: float = 1.0) -> dict[str, Any]:
    """Per-bin completions, errors (by status) and latency percentiles of the sync POSTs, by completion time."""
    if not records:
        return {"bin_s": bin_s, "bins": []}
    end = max(r.t + r.ms / 1000 for r in records)
    nbins = max(1, int(math.ceil((end - t0) / bin_s)))
    bins: list[dict[str, Any]] = [{"t": i * bin_s, "done": 0, "errors": {}, "lat": []} for i in range(nbins)]
    for r in records:
        if r.name == ASYNC_E2E:
            continue
        i = min(nbins - 1, max(0, int((r.t + r.ms / 1000 - t0) / bin_s)))
        bins[i]["done"] += 1
        if not ok_status(r.status):
            bins[i]["errors"][str(r.status)] = bins[i]["errors"].get(str(r.status), 0) + 1
        if r.name == ENHANCE_SYNC and ok_status(r.status):
            bins[i]["lat"].append(r.ms)
    return {"bin_s": bin_s, "bins": [{"t": b["t"], "done": b["done"], "errors": b["errors"],
                                      "p50_ms": pct(b["lat"], 0.5), "p95_ms": pct(b["lat"], 0.95)} for b in bins]}


def breakdown_by(records: list[Record], key: str) -> dict[str, Any]:
    """Sync POST latency by a request attribute (sampler, nominal size...)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.name == ENHANCE_SYNC and r.status == 200:
            groups[str(r.ctx.get(key, ""))].append(r.ms)
    return {k: {"n": len(v), "p50_ms": pct(v, 0.5), "p95_ms": pct(v, 0.95)} for k, v in sorted(groups.items())}


# --- the machine ----------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "loadavg_1_5_15": load, "platform": platform.platform(),
            "python": platform.python_version()}


def git_revision(root: Path) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


# --- figures --------------------------------------------------------------------------------------
_COLORS = {ENHANCE_SYNC: "tab:blue", "POST /enhance [async]": "tab:orange", ASYNC_E2E: "tab:red",
           "GET /jobs/{id}": "tab:gray", "GET /jobs/{id}/result": "tab:purple", "GET /healthz": "tab:green",
           "GET /models": "black"}


def plot_over_time(records: list[Record], t0: float, path: Path, title: str,
                   steps: list[dict[str, Any]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = time_series(records, t0)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(13, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    names = sorted({r.name for r in records}, key=lambda n: list(_COLORS).index(n) if n in _COLORS else 99)
    for name in names:
        rs = [r for r in records if r.name == name]
        ok = [r for r in rs if ok_status(r.status)]
        bad = [r for r in rs if not ok_status(r.status)]
        color = _COLORS.get(name, None)
        ax.scatter([r.t + r.ms / 1000 - t0 for r in ok], [max(r.ms, 0.1) / 1000 for r in ok], s=9, alpha=0.6,
                   color=color, label=f"{name} (n={len(rs)})")
        if bad:
            ax.scatter([r.t + r.ms / 1000 - t0 for r in bad], [max(r.ms, 0.1) / 1000 for r in bad], s=22,
                       marker="x", color=color, label=f"{name}: errors ({len(bad)})")
    xs = [b["t"] + series["bin_s"] / 2 for b in series["bins"]]
    rolling50, rolling95 = _rolling(records, t0, xs, 5.0)
    ax.plot(xs, [v / 1000 if v else math.nan for v in rolling50], color="navy", lw=1.5, label="sync p50 (5 s window)")
    ax.plot(xs, [v / 1000 if v else math.nan for v in rolling95], color="navy", lw=1.2, ls="--",
            label="sync p95 (5 s window)")
    ax.set_yscale("log")
    ax.set_ylabel("latency (s, log), at completion")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax2.bar(xs, [b["done"] for b in series["bins"]], width=series["bin_s"] * 0.9, color="tab:blue", alpha=0.6,
            label="requests completed / s")
    errors = [sum(b["errors"].values()) for b in series["bins"]]
    if any(errors):
        ax2.bar(xs, errors, width=series["bin_s"] * 0.9, color="tab:red", alpha=0.8, label="errors / s")
    ax2.set_ylabel("per second")
    ax2.set_xlabel("seconds since start")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    for step in steps or []:
        for a in (ax, ax2):
            a.axvline(step["start_s"], color="gray", lw=0.6, ls=":")
        ax.text(step["start_s"], ax.get_ylim()[1], f" {step['rate']:g}/s", fontsize=7, va="top", color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rolling(records: list[Record], t0: float, xs: list[float], width_s: float) -> tuple[list, list]:
    done = sorted((r.t + r.ms / 1000 - t0, r.ms) for r in records if r.name == ENHANCE_SYNC and ok_status(r.status))
    p50, p95 = [], []
    for x in xs:
        window_ms = [ms for t, ms in done if x - width_s < t <= x]
        p50.append(pct(window_ms, 0.5))
        p95.append(pct(window_ms, 0.95))
    return p50, p95


def plot_histogram(records: list[Record], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 5))
    oks = [r for r in records if ok_status(r.status) and r.ms > 0]
    if oks:
        low = max(0.1, min(r.ms for r in oks))
        high = max(r.ms for r in oks) * 1.05
        bins = np.logspace(math.log10(low), math.log10(max(high, low * 1.1)), 50)
        for name in sorted({r.name for r in oks}):
            values = [r.ms for r in oks if r.name == name]
            ax.hist(values, bins=bins, histtype="step", lw=1.6, color=_COLORS.get(name), label=f"{name} (n={len(values)})")
        sync = [r.ms for r in oks if r.name == ENHANCE_SYNC]
        for q, style in ((0.5, "-"), (0.95, "--"), (0.99, ":")):
            value = pct(sync, q)
            if value:
                ax.axvline(value, color="navy", ls=style, lw=1, label=f"sync p{int(q * 100)} = {value:.0f} ms")
        ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log) — successful requests")
    ax.set_ylabel("requests")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_capacity(steps: list[dict[str, Any]], path: Path, title: str, slo_p99_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rates = [s["rate"] for s in steps]
    for key, style, label, color in (("p50_ms", "o-", "p50", "tab:blue"), ("p95_ms", "s--", "p95", "tab:orange"),
                                     ("p99_ms", "^-", "p99", "tab:purple")):
        ax.plot(rates, [(s[key] or math.nan) / 1000 for s in steps], style, color=color, label=f"latency {label}")
    ax.axhline(slo_p99_s, color="red", lw=1, ls=":", label=f"SLO p99 = {slo_p99_s:g} s")
    ax.set_xlabel("offered arrival rate (requests / s, Poisson)")
    ax.set_ylabel("latency (s)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(rates, [s.get("done_in_step_per_s") or 0 for s in steps], "d-", color="tab:green",
             label="200s answered by the step's end / s")
    ax2.plot(rates, [s["rejected_429"] / max(s["duration_s"], 1e-9) for s in steps], "x-", color="tab:red",
             label="429 / s")
    ax2.set_ylabel("per second")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- markdown -------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 1, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * scale:.{digits}f}{suffix}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "**not met**")


def markdown(report: dict[str, Any]) -> str:
    meta, config = report["meta"], report["config"]
    lines = [f"# Load test report — {config.get('label') or config['profile']}", ""]
    lines.append(f"- date (UTC): {meta['date_utc']}; machine: {meta['machine']['cpus']} CPU(s) "
                 f"{meta['machine']['cpu_model']}; load average before {meta['loadavg_before']}, after "
                 f"{meta['loadavg_after']}")
    lines.append(f"- target: {config['target']} ({report['service'].get('mode', 'running service')}); "
                 f"generator: {config['generator']}; profile: {config['profile']}")
    if config["profile"] == "fixed":
        lines.append(f"- users {config['users']}, spawn rate {config['spawn_rate']}/s, duration {config['duration_s']} s")
    lines.append(f"- command: `{meta['command']}`")
    mix = config.get("mix") or {}
    if mix:
        sizes = ", ".join(f"{s['nominal']}→{s['sent']} (work {s['work']}, {s['share'] * 100:.0f} %)"
                          for s in mix.get("size_table", []))
        lines.append(f"- mix: scale {mix.get('scale')}, min_side {mix.get('effective_min_side') or 'model default'}; "
                     f"sizes {sizes}; samplers {mix.get('samplers')} (euler steps {mix.get('euler_steps')}); "
                     f"outputs {mix.get('formats')}; async {mix.get('async_share')}, JSON body "
                     f"{mix.get('json_body_share')}, Accept JSON {mix.get('accept_json_share')}")
    lines.append("")
    g = report.get("goals") or {}
    if g:
        share = g.get("overhead_share_p50", {})
        lines += ["## Goals", "",
                  f"- service overhead (end to end − compute) at p50: {_f(share.get('value'), 1, 100, ' %')} of end to end "
                  f"(goal ≤ 5 %): {_verdict(share.get('met'))} — {share.get('condition', '')}"]
        hop = g.get("redis_hop_p50_ms")
        if hop:
            lines.append(f"- Redis hop p50: {_f(hop['from_headers'], 2, 1, ' ms')} through the service (Server-Timing "
                         f"against the serve baseline: {_verdict(hop['met_from_headers'])}), {_f(hop['direct'], 2, 1, ' ms')} "
                         f"for the queue alone (direct: {_verdict(hop['met_direct'])}); goal ≤ 2 ms")
        lines.append("")
    overall = report["overall"]
    lines += ["## Overall", "",
              f"{overall['requests']} requests in {overall['span_s']:.1f} s = {_f(overall['throughput_rps'], 2)} req/s; "
              f"{overall['images_done']} images = {_f(overall['images_per_s'], 2)} images/s; "
              f"errors {overall['errors']} ({_f(overall['error_rate'], 2, 100, ' %')}); 5xx: {overall['server_errors_5xx']}; "
              f"no answer: {overall['no_answer']}", "",
              "Status counts: " + ", ".join(f"{k}: {v}" for k, v in overall["status"].items()), ""]
    lines += ["## By endpoint (client-side latency, ms)", "",
              "| endpoint | n | req/s | p50 | p95 | p99 | max | errors | statuses |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in report["endpoints"].items():
        lat = s["latency_ms"]
        lines.append(f"| {name} | {s['count']} | {_f(s['throughput_rps'], 2)} | {_f(lat['p50'])} | {_f(lat['p95'])} | "
                     f"{_f(lat['p99'])} | {_f(lat['max'])} | {s['errors']} ({_f(s['error_rate'], 1, 100, ' %')}) | "
                     + ", ".join(f"{k}×{v}" for k, v in s["status"].items()) + " |")
    lines.append("")
    tb = report.get("server_timing") or {}
    if tb.get("n"):
        ms = tb["ms"]
        share = tb["overhead_share_p50"]
        lines += ["## Where the time goes (sync POST /enhance answered 200, Server-Timing, ms)", "",
                  "| part | p50 | p95 | p99 | mean |", "|---|---|---|---|---|"]
        for key, label in (("e2e", "end to end (client)"), ("http", "HTTP (client − server total)"),
                           ("decode", "decode (handler start → admission)"),
                           ("queue", "queue (admission → compute start)"),
                           ("pickup", "pickup (admission → worker has the job; part of queue)"),
                           ("compute", "compute (batch)"), ("post", "post (result → answer)"),
                           ("notify", "notify (result ready → handler has it; part of post)"),
                           ("server_overhead", "server total − compute"),
                           ("overhead", "overhead = end to end − compute")):
            d = ms.get(key) or {}
            if not d or d.get("p50") is None:
                continue
            lines.append(f"| {label} | {_f(d['p50'])} | {_f(d['p95'])} | {_f(d['p99'])} | {_f(d['mean'])} |")
        lines += ["", f"Overhead share at p50: p50(overhead)/p50(e2e) = {_f(share['ratio_of_p50s'], 1, 100, ' %')}; "
                      f"p50 of per-request overhead/e2e = {_f(share['p50_of_ratios'], 1, 100, ' %')} "
                      f"(goal ≤ {share['goal'] * 100:.0f} %; n = {tb['n']}).", ""]
    sm = report.get("service_metrics")
    if sm:
        qw, comp, batch = sm["queue_wait"], sm["compute"], sm["batch"]
        lines += ["## From the service's /metrics (delta over the run)", "",
                  "- pages: " + ", ".join(f"{u} ({'ok' if p['ok'] else p['error']})" for u, p in sm["pages"].items()),
                  f"- requests by status: {sm['requests_by_status'] or '–'}; jobs by outcome: {sm['jobs'] or '–'}",
                  f"- queue wait: n {qw['count']}, mean {_f(qw['mean_s'], 1, 1000, ' ms')}, p50≈{_f(qw['p50_s_est'], 1, 1000, ' ms')}, "
                  f"p95≈{_f(qw['p95_s_est'], 1, 1000, ' ms')} (bucket estimate; {_f(qw['share_in_lowest_bucket'], 0, 100, ' %')} "
                  f"in the lowest bucket ≤ {_f(qw['lowest_bucket_s'], 0, 1000, ' ms')})",
                  f"- compute: {comp['batches']} batches, mean {_f(comp['mean_batch_s'], 1, 1000, ' ms')} per batch; stages "
                  + ", ".join(f"{k} {_f(v, 1, 1000)}" for k, v in comp["stages_mean_s"].items()) + " ms",
                  f"- queue wait / batch compute (means): {_f(sm['queue_wait_vs_compute']['queue_over_compute'], 2)}",
                  f"- batches: {batch['batches']}, images {batch['images']}, mean batch size {_f(batch['mean_batch_size'], 2)}; "
                  f"histogram {batch['histogram'] or '–'}",
                  f"- rejections: {sm['rejections'] or 'none'}; queue depth after: {sm['queue_depth_after']}", ""]
    for key, title in (("by_sampler", "sampler"), ("by_size", "nominal size")):
        table = report.get(key) or {}
        if table:
            lines += [f"## Sync latency by {title} (ms)", "", f"| {title} | n | p50 | p95 |", "|---|---|---|---|"]
            lines += [f"| {k} | {v['n']} | {_f(v['p50_ms'])} | {_f(v['p95_ms'])} |" for k, v in table.items()]
            lines.append("")
    cap = report.get("capacity")
    if cap:
        lines += ["## Capacity search (open loop, Poisson arrivals, sync requests)", "",
                  f"SLO: p99 ≤ {cap['slo_p99_s']:g} s and no 429; step {cap['step_s']:g} s.", "",
                  "`sent/s` = arrivals actually drawn (Poisson); `done/s` = 200s completed by the step's end "
                  "(+ the first step's p95 latency, so the last arrivals count); "
                  "`backlog s` = how long after the step its last answer came (a queue that grew); `sat.` = "
                  "done/s < 90 % of sent/s (the service stopped keeping up; informational, the verdict is the SLO's).", "",
                  "| rate/s | sent/s | done/s | p50 ms | p95 ms | p99 ms | backlog s | sat. | 429 | 5xx | other err | client-saturated | unfinished | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in cap["steps"]:
            lines.append(f"| {s['rate']:g} | {_f(s.get('offered_per_s'), 2)} | {_f(s.get('done_in_step_per_s'), 2)} | "
                         f"{_f(s['p50_ms'], 0)} | {_f(s['p95_ms'], 0)} | "
                         f"{_f(s['p99_ms'], 0)} | {_f(s.get('backlog_s'), 1)} | {'yes' if s.get('saturated') else 'no'} | {s['rejected_429']} | {s['server_errors']} | "
                         f"{s['other_errors']} | "
                         f"{s['client_saturated']} | {s['unfinished']} | {s['verdict']} |")
        lines += ["", f"**Knee**: {cap['knee_text']}", ""]
    hop = report.get("hop")
    if hop:
        lines += ["## Hop profile (sequential, one request at a time)", "", hop.get("text", ""), ""]
        direct = hop.get("direct")
        if direct:
            lines += ["Direct measurement with the service's RedisJobQueue (no HTTP, no compute), ms:", "",
                      "| part | p50 | p95 | p99 |", "|---|---|---|---|"]
            for key, v in direct["ms"].items():
                lines.append(f"| {key} | {_f(v['p50'], 2)} | {_f(v['p95'], 2)} | {_f(v['p99'], 2)} |")
            ping = direct.get("ping_rtt_ms") or {}
            lines.append(f"| (one PING round trip) | {_f(ping.get('p50'), 2)} | {_f(ping.get('p95'), 2)} | – |")
            lines.append("")
    lines += ["## Files", ""] + [f"- {k}: `{v}`" for k, v in report["files"].items()] + [""]
    for note in report.get("notes", []):
        lines.append(f"> {note}")
    return "\n".join(lines) + "\n"


def base_report(config: dict[str, Any], service: dict[str, Any], records: list[Record],
                metrics: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, Any]:
    t0, t1 = window(records)
    span = max(t1 - t0, 1e-9) if records else 0.0
    return {
        "schema": SCHEMA, "meta": meta, "config": config, "service": service,
        "overall": overall_stats(records, span),
        "endpoints": endpoint_stats(records, span),
        "errors_by_status": overall_stats(records, span)["status"],
        "server_timing": timing_breakdown(records),
        "by_sampler": breakdown_by(records, "sampler"), "by_size": breakdown_by(records, "nominal"),
        "service_metrics": metrics,
        "time_series": time_series(records, t0),
        "files": {}, "notes": [],
    }


def write(report: dict[str, Any], out: Path) -> None:
    def clean(value: Any) -> Any:  # strict JSON: no NaN / Infinity
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    report = clean(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(report))


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
