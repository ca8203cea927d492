"""OpenAPI fuzzing of every route with schemathesis against the in-process app: no 5xx.

The app is the embedded service with its worker running the real pipeline on the tiny model, so
generated requests that are valid (schemathesis makes real PNGs for `format: binary`) compute.
To keep that cheap the served model.json asks for a 128 px work size by default and the pixel
limit is 256 x 256. The one 5xx the contract defines for a valid request, 504 when the client's
own X-Deadline-S passes before the job is done, is accepted only in exactly that case.
Examples are bounded (MAX_EXAMPLES per operation, derandomized).
"""

from __future__ import annotations

import json
import shutil

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def cheap_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 128 px default work size (same weights)."""
    target = tmp_path_factory.mktemp("cheap_model")
    for item in tiny_model_dir.iterdir():
        if item.is_file() and item.name != "model.json":
            (target / item.name).symlink_to(item)
        elif item.is_dir():
            shutil.copytree(item, target / item.name, symlinks=True)
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    meta["defaults"]["min_side"] = 128
    (target / "model.json").write_text(json.dumps(meta))
    return target


@pytest.fixture(scope="module")
def api_schema(make_app, cheap_model_dir):
    app = make_app(model_dirs=[cheap_model_dir], sync_timeout_s=10.0, max_upload_bytes=256 * 1024,
                   max_pixels=256 * 256)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


def header(response, name: str) -> str:
    value = response.headers.get(name, "")
    return value[0] if isinstance(value, list) else value


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_route_answers_5xx_to_generated_requests(case):
    response = case.call()
    status = response.status_code
    client_deadline = status == 504 and "X-Deadline-S" in (case.headers or {}) and \
        response.json()["type"] == "/problems/deadline-exceeded"
    # /readyz answers 503 by contract while the worker is still starting (the app starts lazily here).
    not_ready_yet = status == 503 and case.path == "/readyz"
    assert status < 500 or client_deadline or not_ready_yet, (case.method, case.path, status, response.text[:500])
    assert header(response, "x-request-id")
    if status >= 400:
        assert header(response, "content-type").startswith("application/problem+json"), response.text[:200]
