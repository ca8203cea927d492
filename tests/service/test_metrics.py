"""/metrics parses with prometheus_client's parser; the series of docs/ARCHITECTURE.md (Metrics) are present and move."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from svc_helpers import FAST, png


def scrape(client) -> dict[str, list]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(families, sample_name: str, **labels) -> float:
    for family in families.values():
        for sample in family:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_parse_and_the_design_series_move(client):
    before = scrape(client)
    for _ in range(2):
        assert client.post("/enhance", files={"image": ("a.png", png(), "image/png")}, data=FAST).status_code == 200
    assert client.post("/enhance", data={"steps": "0"}, files={"image": ("a.png", png(), "image/png")}
                       ).status_code == 422
    after = scrape(client)
    for name in ("flowie_requests", "flowie_request_duration_seconds", "flowie_queue_wait_seconds",
                 "flowie_queue_depth", "flowie_rejections", "flowie_batch_size", "flowie_stage_duration_seconds",
                 "flowie_jobs", "flowie_gpu_memory_bytes", "flowie_build_info"):
        assert name in after, name
    assert value(after, "flowie_build_info") == 1.0
    grew = [
        ("flowie_requests_total", {"task": "bfr", "status": "200"}, 2),
        ("flowie_request_duration_seconds_count", {"task": "bfr"}, 2),
        ("flowie_queue_wait_seconds_count", {"task": "bfr"}, 2),
        ("flowie_jobs_total", {"task": "bfr", "outcome": "done"}, 2),
        ("flowie_rejections_total", {"reason": "invalid"}, 1),
        ("flowie_stage_duration_seconds_count", {"stage": "flow_unet", "backend": "torch"}, 1),
        ("flowie_batch_size_count", {"task": "bfr"}, 1),
    ]
    for sample, labels, at_least in grew:
        assert value(after, sample, **labels) - value(before, sample, **labels) >= at_least, sample
    assert value(after, "flowie_queue_depth", task="bfr") == 0


def test_latency_buckets_span_1ms_to_60s(client):
    families = scrape(client)
    for family in ("flowie_request_duration_seconds", "flowie_queue_wait_seconds"):
        bounds = {s.labels["le"] for s in families[family] if s.name.endswith("_bucket")}
        # 1 ms ... 5 ms resolve a queue wait with no backlog (the Redis hop); 60 s a large CPU job
        assert {"0.001", "0.0025", "0.005", "0.01", "60.0", "+Inf"} <= bounds, (family, sorted(bounds))
