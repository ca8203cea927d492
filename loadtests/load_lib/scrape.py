"""The service's Prometheus metrics, scraped before and after a run, as deltas (docs/ARCHITECTURE.md, Metrics).

In `flowie serve` one /metrics holds every series. With `flowie api` + `flowie worker` the API's
/metrics has the request series (requests, request duration, rejections, queue depth) and each
worker's own port has the job series (queue wait, batch size, stage durations, jobs): pass every
URL; counters and histograms of distinct processes add up.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics(text: str) -> dict[SampleKey, float]:
    """Every sample of a Prometheus text page: (sample name, sorted labels) -> value."""
    samples: dict[SampleKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def scrape(urls: list[str], timeout_s: float = 10.0) -> dict[str, Any]:
    """{"at": unix time, "pages": {url: {"ok", "error", "samples"}}} (an unreachable page is recorded, not raised)."""
    import httpx

    pages: dict[str, Any] = {}
    for url in urls:
        try:
            response = httpx.get(url, timeout=timeout_s)
            response.raise_for_status()
            pages[url] = {"ok": True, "error": "", "samples": parse_metrics(response.text)}
        except Exception as exc:  # noqa: BLE001 - reported in the report
            pages[url] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300], "samples": {}}
    return {"at": time.time(), "pages": pages}


def _merged_delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[SampleKey, float], dict[SampleKey, float]]:
    """(delta of every counter-like sample summed over pages, gauge values after summed over pages)."""
    delta: dict[SampleKey, float] = defaultdict(float)
    last: dict[SampleKey, float] = defaultdict(float)
    for url, page in after["pages"].items():
        old = before["pages"].get(url, {}).get("samples", {})
        for key, value in page["samples"].items():
            last[key] += value
            previous = old.get(key, 0.0)
            # a restarted process resets its counters: then the whole new value is the delta
            delta[key] += value - previous if value >= previous else value
    return dict(delta), dict(last)


def _by_label(delta: dict[SampleKey, float], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (sample, labels), value in delta.items():
        if sample == name:
            out[dict(labels).get(label, "")] += value
    return {k: v for k, v in sorted(out.items()) if v}


def _buckets(delta: dict[SampleKey, float], name: str, where: dict[str, str] | None = None) -> list[tuple[float, float]]:
    """Cumulative (le, count) of histogram ``name`` summed over label sets matching ``where``."""
    sums: dict[float, float] = defaultdict(float)
    for (sample, labels), value in delta.items():
        if sample != f"{name}_bucket":
            continue
        lab = dict(labels)
        if where and any(lab.get(k) != v for k, v in where.items()):
            continue
        sums[float(lab["le"])] += value
    return sorted(sums.items())


def _sum_count(delta: dict[SampleKey, float], name: str, where: dict[str, str] | None = None) -> tuple[float, float]:
    total = count = 0.0
    for (sample, labels), value in delta.items():
        lab = dict(labels)
        if where and any(lab.get(k) != v for k, v in where.items()):
            continue
        if sample == f"{name}_sum":
            total += value
        elif sample == f"{name}_count":
            count += value
    return total, count


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket; the +Inf bucket answers its lower bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return buckets[-1][0]


def _fraction_at_most(buckets: list[tuple[float, float]], bound: float) -> float | None:
    if not buckets or buckets[-1][1] <= 0:
        return None
    for le, count in buckets:
        if le >= bound - 1e-12:
            return count / buckets[-1][1]
    return 1.0


def _histogram_summary(delta: dict[SampleKey, float], name: str, where: dict[str, str] | None = None) -> dict[str, Any]:
    total, count = _sum_count(delta, name, where)
    buckets = _buckets(delta, name, where)
    return {
        "count": int(count),
        "mean_s": total / count if count else None,
        "p50_s_est": histogram_quantile(0.5, buckets),
        "p95_s_est": histogram_quantile(0.95, buckets),
        "p99_s_est": histogram_quantile(0.99, buckets),
        "lowest_bucket_s": buckets[0][0] if buckets else None,
        "share_in_lowest_bucket": _fraction_at_most(buckets, buckets[0][0]) if buckets else None,
    }


def summarize(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the run did to the service, from its own metrics (the report's `service_metrics`)."""
    delta, last = _merged_delta(before, after)
    stages: dict[str, Any] = {}
    for (sample, labels), _ in delta.items():
        if sample == "flowie_stage_duration_seconds_count":
            stage = dict(labels).get("stage", "")
            if stage and stage not in stages:
                s, c = _sum_count(delta, "flowie_stage_duration_seconds", {"stage": stage})
                stages[stage] = {"batches": int(c), "mean_s": s / c if c else None}
    batch_sum, batch_count = _sum_count(delta, "flowie_batch_size")
    batch_buckets = _buckets(delta, "flowie_batch_size")
    histogram = {}
    previous = 0.0
    for le, count in batch_buckets:
        if count - previous:
            histogram["+Inf" if math.isinf(le) else f"<={le:g}"] = int(count - previous)
        previous = count
    queue = _histogram_summary(delta, "flowie_queue_wait_seconds")
    compute_mean = (stages.get("total") or {}).get("mean_s")
    depth_after = {dict(labels).get("task", ""): v for (s, labels), v in last.items() if s == "flowie_queue_depth"}
    return {
        "pages": {url: {"ok": page["ok"], "error": page["error"]} for url, page in after["pages"].items()},
        "window_s": after["at"] - before["at"],
        "requests_by_status": {k: int(v) for k, v in _by_label(delta, "flowie_requests_total", "status").items()},
        "request_duration": _histogram_summary(delta, "flowie_request_duration_seconds"),
        "queue_wait": queue,
        "compute": {"batches": int((stages.get("total") or {}).get("batches") or 0),
                    "mean_batch_s": compute_mean,
                    "stages_mean_s": {k: v["mean_s"] for k, v in stages.items() if k != "total"}},
        "queue_wait_vs_compute": {
            "mean_queue_wait_s": queue["mean_s"], "mean_batch_compute_s": compute_mean,
            "queue_over_compute": (queue["mean_s"] / compute_mean) if queue["mean_s"] is not None and compute_mean
            else None},
        "batch": {"batches": int(batch_count), "images": int(batch_sum),
                  "mean_batch_size": batch_sum / batch_count if batch_count else None, "histogram": histogram},
        "rejections": {k: int(v) for k, v in _by_label(delta, "flowie_rejections_total", "reason").items()},
        "jobs": {k: int(v) for k, v in _by_label(delta, "flowie_jobs_total", "outcome").items()},
        "queue_depth_after": depth_after,
    }
