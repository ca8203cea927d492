"""What the dashboard and the alerts read is what the service exports, checked against live processes.

* Every metric the Grafana dashboard queries and every metric the Prometheus rules reference is
  exported by a running `flowie serve` (its /metrics parsed with prometheus_client's parser).
* A real Prometheus server (Debian's package) scrapes that live `flowie serve`, loads the real
  rules, and answers through its HTTP API: the request-duration series is there after a few
  requests, every rule evaluates without error, and every dashboard query is valid PromQL.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, free_port, http_get, require_tool, stop_process, tail, wait_until_ok

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "flowie.json"
RULES = DEPLOY / "prometheus" / "rules" / "flowie.rules.yml"
# Small work size, one network evaluation: the CPU stays quick (MIN_WORK_SIDE is 128 px).
FAST_FIELDS = {"task": "bfr", "min_side": "128", "sampler": "euler", "steps": "1"}
SAMPLE_SUFFIXES = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"],
                   "summary": ["_count", "_sum", "_created"], "gauge": [""], "info": ["_info"],
                   "stateset": [""], "gaugehistogram": ["_bucket", "_gcount", "_gsum"], "unknown": [""]}
# Grafana's variables, replaced by what they expand to for a query over all tasks.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$task": ".*"}


def promql_identifiers(expr: str) -> set[str]:
    """Metric and recording-rule names in a PromQL expression (quoted strings removed first)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    return {token for token in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)
            if token.startswith("flowie_") or ":" in token}


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics page exports, including families without samples yet."""
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(sample.name for sample in family.samples)
        base = family.name
        names.update(base + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, [""]))
        if family.type == "counter":
            names.add(base)  # `flowie_requests` is how the parser names `flowie_requests_total`
    return names


def test_identifier_extraction_sees_metrics_and_recording_rules() -> None:
    expr = ('sum by (task, le) (rate(flowie_request_duration_seconds_bucket{job="flowie-api", '
            'status=~"5.."}[5m])) / ignoring(le) task:flowie_requests:rate5m')
    assert promql_identifiers(expr) == {"flowie_request_duration_seconds_bucket", "task:flowie_requests:rate5m"}


def test_dashboard_and_rules_read_only_exported_metrics(live_flowie) -> None:
    status, body = http_get(f"{live_flowie.base_url}/metrics")
    assert status == 200
    exported = exported_names(body.decode())
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    queried = {name: "dashboard" for expr in dashboard_exprs() for name in promql_identifiers(expr)}
    queried.update({name: "rules" for rule in rules() for name in promql_identifiers(rule["expr"])})
    metric_names = {name for name in queried if ":" not in name}
    assert metric_names, "no flowie_* metric found in the dashboard or the rules"
    missing = {name: where for name, where in queried.items() if ":" not in name and name not in exported}
    assert not missing, f"queried but not exported by flowie serve: {missing}"
    unknown_records = {name for name in queried if ":" in name} - recorded
    assert not unknown_records, f"recording rules used but not defined in {RULES.name}: {unknown_records}"
    # The contract covers every family of docs/ARCHITECTURE.md, Metrics.
    for family in ("flowie_requests_total", "flowie_request_duration_seconds_bucket", "flowie_queue_wait_seconds_bucket",
                   "flowie_queue_depth", "flowie_rejections_total", "flowie_batch_size_bucket",
                   "flowie_stage_duration_seconds_sum", "flowie_jobs_total", "flowie_gpu_memory_bytes",
                   "flowie_build_info"):
        assert family in metric_names, f"{family} is exported but neither charted nor alerted on"


def test_container_healthcheck_probe_against_the_live_service(live_flowie) -> None:
    probe = DEPLOY / "docker" / "healthcheck.py"
    ok = subprocess.run([sys.executable, str(probe)], env={"FLOWIE_PORT": str(live_flowie.port)},
                        capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    closed = subprocess.run([sys.executable, str(probe), "--port-env", "NO_SUCH_PORT", "--default-port",
                             str(free_port())], capture_output=True, text=True, timeout=30, check=False)
    assert closed.returncode == 1 and "unhealthy" in closed.stderr


# --------------------------------------------------------------------------- real Prometheus


def _query(base: str, promql: str) -> dict[str, Any]:
    status, body = http_get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout=10)
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", f"{promql!r}: {answer}"
    return answer["data"]


def _wait_for(base: str, promql: str, predicate, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = _query(base, promql)["result"]
        if predicate(result):
            return result
        time.sleep(0.5)
    pytest.fail(f"{promql!r} never satisfied the check within {timeout:.0f} s; last answer {result}")


def _values(result: list[dict[str, Any]]) -> dict[str, float]:
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in result}


@pytest.fixture(scope="module")
def prometheus(live_flowie, tmp_path_factory: pytest.TempPathFactory):
    """A Prometheus server scraping the live service every second, with the real rules loaded."""
    binary = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "flowie-api",
                            "static_configs": [{"targets": [f"127.0.0.1:{live_flowie.port}"]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{base}/-/ready", process, log_path, timeout=60)
        yield base
    finally:
        stop_process(process)
        if process.returncode not in (0, -15):
            pytest.fail(f"prometheus exited with {process.returncode}:\n{tail(log_path)}")


def _post_enhance(base_url: str, fields: dict[str, str]) -> int:
    import httpx
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, "PNG")
    response = httpx.post(f"{base_url}/enhance", files={"image": ("probe.png", buffer.getvalue(), "image/png")},
                          data=fields, timeout=300)
    return response.status_code


def test_prometheus_reads_request_durations_from_the_live_service(live_flowie, prometheus: str) -> None:
    _wait_for(prometheus, 'up{job="flowie-api"}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")
    count = 'sum by (task) (flowie_request_duration_seconds_count{job="flowie-api"})'
    # A refused request first (work size under 128 px: 422), scraped before the others, so that
    # rate() sees the series grow: one that computes and one more refusal follow.
    refused = dict(FAST_FIELDS, min_side="0")
    assert _post_enhance(live_flowie.base_url, refused) == 422
    _wait_for(prometheus, count, lambda r: r and float(r[0]["value"][1]) >= 1)
    assert _post_enhance(live_flowie.base_url, FAST_FIELDS) == 200
    assert _post_enhance(live_flowie.base_url, refused) == 422

    durations = _wait_for(prometheus, count, lambda r: r and float(r[0]["value"][1]) >= 3)
    assert durations[0]["metric"] == {"task": "bfr"}
    answers = _values(_query(prometheus, 'sum by (status) (flowie_requests_total{task="bfr"})')["result"])
    assert answers == {'{"status": "200"}': 1.0, '{"status": "422"}': 2.0}
    slowest = _query(prometheus, 'flowie_request_duration_seconds_sum{task="bfr"}')["result"]
    assert float(slowest[0]["value"][1]) > 0
    # The recording rule behind the p95 panel and alert turns the live histogram into seconds.
    p95 = _wait_for(prometheus, "task:flowie_request_duration_seconds:p95_5m",
                    lambda r: r and r[0]["value"][1] not in ("NaN", "0"))
    assert 0 < float(p95[0]["value"][1]) <= 60


def test_every_rule_evaluates_against_the_live_series(prometheus: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        status, body = http_get(f"{prometheus}/api/v1/rules")
        groups = json.loads(body)["data"]["groups"]
        evaluated = [r for g in groups for r in g["rules"]]
        # A rule never evaluated reports the zero time, 0001-01-01T00:00:00Z.
        if evaluated and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in evaluated):
            break
        assert time.monotonic() < deadline, "rules were never evaluated"
        time.sleep(0.5)
    assert len(evaluated) == len(rules())
    broken = {r["name"]: r.get("lastError") for r in evaluated if r["health"] != "ok"}
    assert not broken, f"rules failing against live data: {broken}"


def test_every_dashboard_query_is_valid_promql(prometheus: str) -> None:
    for expr in dashboard_exprs():
        concrete = expr
        for variable, value in GRAFANA_VARIABLES.items():
            concrete = concrete.replace(variable, value)
        assert "$" not in concrete, f"unexpanded Grafana variable in {expr!r}"
        _query(prometheus, concrete)  # asserts status == success
