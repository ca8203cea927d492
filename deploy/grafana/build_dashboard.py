#!/usr/bin/env python3
"""Write deploy/grafana/dashboards/flowie.json, the FlowIE Serve dashboard.

The dashboard is generated so that every panel states its queries in one readable place and
the JSON stays consistent (ids, grid, datasource references). Edit this file, then run
``python deploy/grafana/build_dashboard.py``; tests/deploy checks that the JSON is up to date,
that every metric it queries is exported by a running ``flowie serve``, and that every query is
valid PromQL for a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "flowie.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TASK = 'task=~"$task"'
RATE = "$__rate_interval"


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def timeseries(title: str, description: str, unit: str, queries: list[tuple[str, str]], *,
               stack: bool = False, bars: bool = False) -> dict:
    custom = {"drawStyle": "bars" if bars else "line", "lineWidth": 1, "fillOpacity": 10,
              "showPoints": "never", "spanNulls": False,
              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)],
    }


def table(title: str, description: str, expr: str) -> dict:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "transformations": [{"id": "labelsToFields", "options": {"mode": "columns"}},
                            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
        "targets": [{"datasource": DATASOURCE, "expr": expr, "format": "table", "instant": True,
                     "legendFormat": "", "refId": "A"}],
    }


def _series(name: str, selector: str) -> str:
    return f"{name}{{{selector}}}" if selector else name


def quantile(q: str, metric: str, selector: str = TASK) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({_series(metric + '_bucket', selector)}[{RATE}])))"


def mean(metric: str, by: str = "", selector: str = TASK) -> str:
    group = f" by ({by})" if by else ""
    return (f"sum{group} (rate({_series(metric + '_sum', selector)}[{RATE}]))"
            f" / sum{group} (rate({_series(metric + '_count', selector)}[{RATE}]))")


def panels() -> list[dict]:
    """(row title, [panels]) in screen order; each row is two panels wide."""
    rows = [
        ("Traffic", [
            timeseries("Request rate by status", "POST /enhance answers per second, by HTTP status.", "reqps",
                       [(f"sum by (status) (rate(flowie_requests_total{{{TASK}}}[{RATE}]))", "{{status}}")],
                       stack=True),
            timeseries("Latency p50 / p95 / p99", "POST /enhance wall time, first byte to answer.", "s",
                       [(quantile("0.50", "flowie_request_duration_seconds"), "p50"),
                        (quantile("0.95", "flowie_request_duration_seconds"), "p95"),
                        (quantile("0.99", "flowie_request_duration_seconds"), "p99")]),
        ]),
        ("Queue", [
            timeseries("Queue wait vs compute",
                       "Mean seconds a job waits for its batch, mean compute seconds of one batch (its "
                       "whole pipeline), and the mean request end to end; p95 of the wait too.", "s",
                       [(mean("flowie_queue_wait_seconds"), "queue wait (mean per job)"),
                        (quantile("0.95", "flowie_queue_wait_seconds"), "queue wait (p95)"),
                        # stage="total" is the whole pipeline of one batch (the other stages are its parts).
                        (mean("flowie_stage_duration_seconds", selector='stage="total"'), "compute (mean per batch)"),
                        (mean("flowie_request_duration_seconds"), "request (mean)")]),
            timeseries("Queue depth", "Jobs waiting or in progress, per task (every API replica reports the "
                       "same Redis depth, hence max).", "short",
                       [(f"max by (task) (flowie_queue_depth{{{TASK}}})", "{{task}}")]),
        ]),
        ("Batching and refusals", [
            timeseries("Batch size", "Images per worker batch: mean and p95.", "short",
                       [(mean("flowie_batch_size"), "mean"),
                        (quantile("0.95", "flowie_batch_size"), "p95")]),
            timeseries("Rejections by reason", "Requests refused per second (429 queue full, 413, 415, 401, "
                       "503, 504, ...), by reason.", "reqps",
                       [(f"sum by (reason) (rate(flowie_rejections_total[{RATE}]))", "{{reason}}")], stack=True),
        ]),
        ("Compute", [
            timeseries("Stage time by backend", "Mean seconds of each pipeline stage for one batch, by "
                       "inference back end; stacked, the stages add up to the batch's total.", "s",
                       [(mean("flowie_stage_duration_seconds", by="stage, backend", selector='stage!="total"'),
                         "{{stage}} ({{backend}})")], stack=True),
            timeseries("GPU memory", "Bytes held by each worker's torch allocator (allocated and reserved).",
                       "bytes",
                       [("max by (instance, device, kind) (flowie_gpu_memory_bytes)",
                         "{{instance}} {{device}} {{kind}}")]),
        ]),
        ("Jobs and fleet", [
            timeseries("Jobs by outcome", "Jobs finished by workers per second: done, failed, expired, "
                       "cancelled, invalid.", "ops",
                       [(f"sum by (outcome) (rate(flowie_jobs_total{{{TASK}}}[{RATE}]))", "{{outcome}}")],
                       stack=True),
            table("Processes", "Every scraped FlowIE process with its version and role (api, worker or serve).",
                  "max by (instance, job, version, role, python) (flowie_build_info)"),
        ]),
    ]
    out: list[dict] = []
    next_id = 1
    y = 0
    for row_title, row_panels in rows:
        out.append({"type": "row", "title": row_title, "id": next_id, "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        for i, panel in enumerate(row_panels):
            panel["id"] = next_id
            panel["gridPos"] = {"h": 8, "w": 12, "x": 12 * i, "y": y}
            next_id += 1
            out.append(panel)
        y += 8
    return out


def dashboard() -> dict:
    return {
        "uid": "flowie-serve",
        "title": "FlowIE Serve",
        "description": "Latency, queue, batching and GPU of the FlowIE Serve API replicas and workers.",
        "tags": ["flowie"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Datasource", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "flowie-prometheus"}, "hide": 0, "refresh": 1},
            {"name": "task", "label": "Task", "type": "query", "datasource": DATASOURCE,
             "query": {"query": "label_values(flowie_requests_total, task)", "refId": "task"},
             "definition": "label_values(flowie_requests_total, task)",
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    OUT.write_text(render())
    sys.stderr.write(f"wrote {OUT}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
