"""Hostile and unusual uploads each get the right 2xx/4xx, never a 5xx, and the service keeps serving.

They go through the embedded service with the real pipeline on the tiny model.
"""

from __future__ import annotations

import pytest
from svc_helpers import FAST, hostile_images, png

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # we refuse those images ourselves

EXPECTED = {
    "zero_bytes": 415,
    "garbage": 415,
    "truncated_png": 400,
    "truncated_jpeg": 400,
    "bomb_40000x40000": 413,
    "bomb_between_1x_and_2x_limit": 413,
    "huge_single_dimension": 413,  # 30000 x 1: its padded work size passes the pixel limit
    "svg_disguised_as_png": 415,
    "html_disguised_as_png": 415,
    "eps": 415,
    "cmyk_jpeg": 200,
    "grey_16bit_png": 200,
    "palette_png": 200,
    "rgba_png": 200,
    "exif_rotated_jpeg": 200,
    "animated_gif": 200,
    "one_pixel": 200,
    "bmp": 200,
    "tiff": 200,
    "webp": 200,
}
# The output size a 2xx must have: width x height after EXIF orientation (upscale 1).
SIZES = {"exif_rotated_jpeg": (64, 96), "animated_gif": (80, 72), "one_pixel": (1, 1)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_upload_gets_the_right_status_never_5xx(client, name):
    data = hostile_images()[name]
    response = client.post("/enhance", files={"image": ("photo.png", data, "image/png")},
                           data={**FAST, "sampler": "restore_only"}, headers={"Accept": "application/json"})
    assert response.status_code == EXPECTED[name], response.text
    if response.status_code == 200:
        body = response.json()
        assert (body["width"], body["height"]) == SIZES.get(name, (96, 64))
    else:
        assert response.headers["content-type"].startswith("application/problem+json")


def test_service_keeps_serving_after_every_hostile_input(client):
    for data in hostile_images().values():
        client.post("/enhance", files={"image": ("x.png", data, "image/png")}, data={**FAST, "sampler": "restore_only"})
    assert client.get("/healthz").status_code == 200
    ok = client.post("/enhance", files={"image": ("x.png", png(), "image/png")}, data={**FAST, "steps": "2",
                                                                                      "sampler": "euler"})
    assert ok.status_code == 200, ok.text
