"""Every error status of the contract comes back as RFC 9457 problem+json (docs/ARCHITECTURE.md, the HTTP contract)."""

from __future__ import annotations

import base64
import time

import pytest
from fastapi.testclient import TestClient
from svc_helpers import FAST, noise_png, png, png_claiming

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # we refuse those images ourselves

PROBLEM = "application/problem+json"


def problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["type"].startswith("/problems/")
    assert body["title"] and body["detail"] and body["instance"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def upload(data: bytes = b"", **fields):
    return {"files": {"image": ("a.png", data or png(), "image/png")}, "data": {**FAST, **fields}}


@pytest.mark.parametrize("fields", [
    {"sampler": "ddim"}, {"steps": "0"}, {"steps": "51"}, {"steps": "two"}, {"seed": "-1"},
    {"upscale": "100"}, {"upscale": "nan"}, {"color_fix": "sepia"}, {"tile": "maybe"},
    {"output_format": "gif"}, {"quality": "0"}, {"task": "nope"}, {"unknown_field": "1"},
])
def test_bad_field_is_422(idle_client, fields):
    problem(idle_client.post("/enhance", **upload(**fields)), 422)


def test_work_size_under_the_networks_minimum_is_422(idle_client):
    body = problem(idle_client.post("/enhance", **upload(png(50, 50), min_side="16")), 422)
    assert "min_side" in body["detail"]


def test_unknown_json_field_missing_image_and_bad_base64_are_422(idle_client):
    image = base64.b64encode(png()).decode()
    problem(idle_client.post("/enhance", json={"image": image, "strength": 2}), 422)
    problem(idle_client.post("/enhance", json={"seed": 1}), 422)
    problem(idle_client.post("/enhance", json={"image": "not base64!!"}), 422)
    problem(idle_client.post("/enhance", data={"seed": "1"}, files={"other": ("a.png", png(), "image/png")}), 422)
    problem(idle_client.post("/enhance", data={"image": "text, not a file"},
                             headers={"Content-Type": "application/x-www-form-urlencoded"}), 415)
    problem(idle_client.post("/enhance", content=b"", headers={"Content-Type": "application/json"}), 400)


def test_malformed_json_and_multipart_are_400(idle_client):
    problem(idle_client.post("/enhance", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    problem(idle_client.post("/enhance", content=b"--x\r\ngarbage",
                             headers={"Content-Type": "multipart/form-data"}), 400)  # no boundary


def test_body_over_upload_limit_is_413_while_streaming(make_app):
    with TestClient(make_app(worker=False, max_upload_bytes=4096)) as small:
        problem(small.post("/enhance", **upload(noise_png(64, 64))), 413)

        def chunks():  # no Content-Length: the limit is counted on the bytes as they arrive
            yield b"{\"image\": \""
            for _ in range(100):
                yield b"A" * 1024

        body = problem(small.post("/enhance", content=chunks(), headers={"Content-Type": "application/json"}), 413)
        assert body["type"] == "/problems/too-large"


def test_pixels_over_limit_are_413_for_input_and_output(make_app):
    with TestClient(make_app(worker=False, max_pixels=128 * 128)) as small:
        problem(small.post("/enhance", **upload(png(130, 130))), 413)  # input
        problem(small.post("/enhance", **upload(png(100, 100), upscale="2")), 413)  # output 200 x 200
        problem(small.post("/enhance", **upload(png_claiming(40000, 40000))), 413)


def test_not_an_image_is_415(idle_client):
    problem(idle_client.post("/enhance", **upload(b"%PDF-1.7 not an image")), 415)
    problem(idle_client.post("/enhance", content=b"hello", headers={"Content-Type": "text/plain"}), 415)


def test_api_key_required_when_configured(make_app):
    key = "k" * 24
    with TestClient(make_app(worker=False, api_keys=[key, "second-key-0123456789"])) as secured:
        missing = problem(secured.post("/enhance", **upload()), 401)
        assert "Authorization: Bearer" in missing["detail"]
        assert secured.post("/enhance", **upload()).headers["www-authenticate"].startswith("Bearer")
        problem(secured.get("/models", headers={"Authorization": "Bearer wrong"}), 401)
        problem(secured.get("/jobs/abc", headers={"X-API-Key": key[:-1]}), 401)
        assert secured.get("/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert secured.get("/models", headers={"X-API-Key": "second-key-0123456789"}).status_code == 200
        assert secured.get("/healthz").status_code == 200  # probes stay open
        assert secured.get("/metrics").status_code == 200


def test_queue_full_is_429_with_retry_after(idle_client):
    accepted = [idle_client.post("/enhance", **upload(), headers={"Prefer": "respond-async"}) for _ in range(2)]
    assert [r.status_code for r in accepted] == [202, 202]
    full = idle_client.post("/enhance", **upload(), headers={"Prefer": "respond-async"})
    body = problem(full, 429)
    assert int(full.headers["retry-after"]) >= 1 and body["type"] == "/problems/queue-full"
    assert "rejections" not in body


def test_deadline_passed_is_504(make_app):
    with TestClient(make_app(worker=False, sync_timeout_s=5.0)) as idle:
        response = idle.post("/enhance", **upload(), headers={"X-Deadline-S": "1"})
        problem(response, 504)
        assert response.headers["x-seed"]
        problem(idle.post("/enhance", **upload(), headers={"X-Deadline-S": "0.01"}), 422)


def test_queue_unreachable_is_503_with_retry_after(make_app, make_settings):
    from svc_helpers import free_port

    from service.queue.redis_streams import RedisJobQueue

    dead = RedisJobQueue(f"redis://127.0.0.1:{free_port()}/0", tasks=["bfr"])
    with TestClient(make_app(worker=False, queue=dead)) as unreachable:
        response = unreachable.post("/enhance", **upload())
        refused = problem(response, 503)
        assert int(response.headers["retry-after"]) >= 1
        assert refused["reason"] == "queue_unreachable" and "Error" not in refused["detail"]
        ready = problem(unreachable.get("/readyz"), 503)
        assert "queue unreachable" in ready["detail"]
        assert ready["reason"] == "queue_unreachable" and ready["checks"]["queue"] == "unreachable"
        assert "Error" not in response.text + str(ready)  # the connection error stays in the log


def test_draining_service_is_503(idle_client):
    idle_client.app.state.draining = True
    try:
        assert problem(idle_client.post("/enhance", **upload()), 503)["reason"] == "shutting_down"
        ready = problem(idle_client.get("/readyz"), 503)
        assert ready["reason"] == "no_worker" and ready["reasons"] == ["no_worker", "shutting_down"]
    finally:
        idle_client.app.state.draining = False


def test_model_load_failure_is_503_with_a_reason_and_no_exception_text(make_settings):
    from service.app import create_app, load_models
    from service.metrics import Metrics
    from service.queue.memory import MemoryJobQueue
    from service.worker import Worker

    def broken_runner():
        raise RuntimeError("weights missing at /secret/place")

    settings, metrics = make_settings(), Metrics()
    queue = MemoryJobQueue(settings.max_queue, settings.result_ttl_s)
    worker = Worker(queue, broken_runner, settings, metrics)
    with TestClient(create_app(settings, queue, load_models(settings), worker=worker, metrics=metrics)) as http:
        deadline = time.monotonic() + 30
        while worker.load_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = problem(http.post("/enhance", **upload()), 503)
        ready = problem(http.get("/readyz"), 503)
    assert refused["reason"] == ready["reason"] == "model_load_failed"
    assert "/secret/place" not in refused["detail"] + str(ready)


def test_unknown_route_and_method_are_problems(idle_client):
    problem(idle_client.get("/nope"), 404)
    problem(idle_client.put("/enhance"), 405)
