"""POST /enhance and /jobs: the HTTP contract of docs/ARCHITECTURE.md on the embedded service.

Everything runs the real pipeline on the tiny reference model (min_side=128 keeps it cheap).
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image
from svc_helpers import FAST, decode, jpeg, png

PROBLEM = "application/problem+json"


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("/problems/") and body["title"] and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def test_multipart_upload_returns_png_of_the_input_size_with_contract_headers(client):
    response = client.post("/enhance", files={"image": ("x.png", png(96, 80), "image/png")}, data=FAST)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert decode(response.content).size == (96, 80)
    assert re.fullmatch(r"[0-9]+", response.headers["x-seed"])
    assert response.headers["x-request-id"]
    timing = response.headers["server-timing"]
    for metric in ("decode", "queue", "pickup", "compute", "notify", "total"):
        assert re.search(rf"{metric};dur=[0-9.]+", timing), timing


def test_server_timing_parts_are_in_order_and_add_up_within_total(client):
    response = client.post("/enhance", files={"image": ("x.png", png(96, 80), "image/png")}, data=FAST)
    assert response.status_code == 200, response.text
    ms = {name.strip(): float(dur) for name, dur in re.findall(r"([a-z]+);dur=([0-9.]+)",
                                                               response.headers["server-timing"])}
    # decode, queue and compute follow each other; pickup is the start of queue, notify part of
    # what follows compute. Clocks: wall and monotonic, hence the 1 ms of slack.
    assert ms["decode"] + ms["queue"] + ms["compute"] + ms["notify"] <= ms["total"] + 1.0, ms
    assert ms["pickup"] <= ms["queue"] + 1.0, ms
    assert ms["compute"] > 0 and ms["decode"] > 0, ms


def test_json_body_and_json_answer_carry_base64_image_seed_and_timings(client):
    body = {"image": base64.b64encode(png(64, 72)).decode(), "seed": 1234, "output_format": "jpeg",
            "quality": 80, "min_side": 128, "upscale": 1.5}
    response = client.post("/enhance", json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["seed"] == 1234 and response.headers["x-seed"] == "1234"
    assert (answer["width"], answer["height"], answer["format"]) == (96, 108, "jpeg")
    image = decode(base64.b64decode(answer["image"]))
    assert image.format == "JPEG" and image.size == (96, 108)
    assert {"swinir", "flow_unet", "vae_decoder", "queue", "compute"} <= set(answer["timings"])


def test_same_seed_gives_same_image_and_absent_seed_is_random_and_echoed(client):
    form = {**FAST, "seed": "7"}
    first = client.post("/enhance", files={"image": ("a.png", png(), "image/png")}, data=form)
    second = client.post("/enhance", files={"image": ("a.png", png(), "image/png")}, data=form)
    assert first.status_code == second.status_code == 200
    assert np.array_equal(np.asarray(decode(first.content)), np.asarray(decode(second.content)))
    seeds = {client.post("/enhance", files={"image": ("a.png", png(), "image/png")},
                         data={**FAST, "sampler": "one_step"}).headers["x-seed"] for _ in range(2)}
    assert len(seeds) == 2


@pytest.mark.parametrize("fmt,mime", [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_output_format_sets_content_type_and_encoding(client, fmt, mime):
    response = client.post("/enhance", files={"image": ("a.jpg", jpeg(), "image/jpeg")},
                           data={**FAST, "sampler": "restore_only", "output_format": fmt})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == mime
    assert decode(response.content).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]


def test_client_request_id_is_echoed(client):
    response = client.post("/enhance", files={"image": ("a.png", png(), "image/png")},
                           data={**FAST, "sampler": "restore_only"}, headers={"X-Request-ID": "trace-abc.123"})
    assert response.headers["x-request-id"] == "trace-abc.123"
    hostile = client.get("/healthz", headers={"X-Request-ID": "bad id\nwith newline"})
    assert hostile.headers["x-request-id"] != "bad id\nwith newline"


def test_accept_header_negotiates_image_or_json(client):
    files = {"image": ("a.png", png(), "image/png")}
    data = {**FAST, "sampler": "restore_only"}
    as_image = client.post("/enhance", files=files, data=data, headers={"Accept": "image/*, application/json;q=0.5"})
    assert as_image.headers["content-type"] == "image/png"
    as_json = client.post("/enhance", files=files, data=data, headers={"Accept": "application/json, image/*;q=0.1"})
    assert as_json.headers["content-type"].startswith("application/json")


def test_respond_async_gives_202_location_then_job_status_and_result(client):
    response = client.post("/enhance", files={"image": ("a.png", png(), "image/png")}, data=FAST,
                           headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    location = response.headers["location"]
    assert location == f"/jobs/{response.json()['id']}"
    assert response.headers["preference-applied"] == "respond-async"
    assert response.headers["x-seed"]
    import time

    deadline = time.monotonic() + 60
    status = client.get(location)
    while status.status_code == 202:
        assert status.json()["status"] in ("queued", "running")
        assert time.monotonic() < deadline
        time.sleep(0.05)
        status = client.get(location)
    assert status.status_code == 200 and status.json()["status"] == "done"
    assert status.json()["links"]["result"] == f"{location}/result"
    result = client.get(f"{location}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    assert result.headers["x-seed"] == response.headers["x-seed"]
    assert decode(result.content).size == (96, 80)
    deleted = client.delete(location)
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
    assert_problem(client.get(f"{location}/result"), 404)


def test_sync_wait_past_timeout_answers_202_and_delete_cancels_the_job(idle_client):
    response = idle_client.post("/enhance", files={"image": ("a.png", png(), "image/png")}, data=FAST)
    assert response.status_code == 202, response.text
    location = response.headers["location"]
    assert idle_client.get(location).json()["status"] == "queued"
    cancelled = idle_client.delete(location)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    body = assert_problem(idle_client.get(location), 409)
    assert body["type"] == "/problems/job-cancelled"
    assert_problem(idle_client.delete("/jobs/" + "0" * 32), 404)


def test_models_lists_tasks_defaults_and_limits(client):
    models = client.get("/models").json()
    assert models["default_task"] == "bfr"
    assert models["models"][0]["defaults"]["sampler"] == "mean_value"
    assert models["limits"]["max_upload_bytes"] == 20 * 1024 * 1024
    assert "restore_only" in models["choices"]["sampler"]


def test_health_readiness_docs_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["workers"] == 1
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/enhance"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)


def test_every_model_default_is_filled_from_model_json(client):
    # upscale and colour fix come from model.json when absent: output = input size (upscale 1).
    response = client.post("/enhance", files={"image": ("a.png", png(70, 66), "image/png")},
                           data={"min_side": "128"}, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (70, 66)


def test_image_is_returned_at_requested_upscale(client):
    response = client.post("/enhance", files={"image": ("a.png", png(50, 40), "image/png")},
                           data={"min_side": "128", "upscale": "2", "sampler": "restore_only"})
    assert Image.open(io.BytesIO(response.content)).size == (100, 80)
