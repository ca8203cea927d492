"""POST /enhance on whole photos (faces=detect) through the embedded service and the tiny BFR model."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_or_fail
from PIL import Image
from svc_helpers import decode, png

pytest.importorskip("cv2")


def _astronaut_png(size: int = 256) -> bytes:
    import skimage

    with Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png") as im:
        small = im.convert("RGB").resize((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def needs_mtcnn():
    from flowie.faces.weights import mtcnn_dir

    if mtcnn_dir() is None:  # .ci/run installs them: a missing wheel in CI is a broken install
        skip_or_fail("MTCNN weights missing: pip install --no-deps facenet-pytorch==2.6.0")


@pytest.fixture(scope="module")
def photo_client(make_app):
    """The embedded service with the default face mode: whole photos for the bfr model."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(max_batch=4, face_mode="auto")) as test_client:
        yield test_client


def test_a_portrait_answers_one_face_at_the_input_size_with_landmarks(photo_client, needs_mtcnn):
    client = photo_client
    response = client.post("/enhance", files={"image": ("a.png", _astronaut_png(), "image/png")},
                           data={"seed": "7"}, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    assert response.headers["x-faces"] == "1"
    body = response.json()
    assert (body["width"], body["height"]) == (256, 256)
    assert decode(base64.b64decode(body["image"])).size == (256, 256)
    (face,) = body["faces"]
    assert face["score"] >= 0.95 and len(face["landmarks"]) == 5
    # The astronaut's eyes, at half the 512 photo's coordinates (read off the photo by eye).
    (lx, ly), (rx, ry) = face["landmarks"][:2]
    assert 92 <= lx <= 112 and 92 <= rx <= 134 and 40 <= ly <= 62 and 40 <= ry <= 62
    assert "face_detect" in body["timings"]
    metrics = client.get("/metrics").text
    assert 'flowie_faces_per_request_count{task="bfr"} 1.0' in metrics
    assert 'stage="face_detect"' in metrics


def test_a_photo_without_faces_is_the_background_alone(client, needs_mtcnn):
    response = client.post("/enhance", files={"image": ("g.png", png(160, 120), "image/png")},
                           data={"background": "resize", "faces": "detect"})
    assert response.status_code == 200, response.text
    assert response.headers["x-faces"] == "0"
    assert decode(response.content).size == (160, 120)


def test_pixels_away_from_the_face_are_the_background_path(client, needs_mtcnn):
    """background=resize: away from the face, the answer is the photo enlarged as the official script
    does (bicubic to a short side of 512) and brought back (Lanczos), computed here with Pillow."""
    data = _astronaut_png()
    photo = decode(data).convert("RGB")
    answer = np.asarray(decode(client.post("/enhance", files={"image": ("a.png", data, "image/png")},
                                           data={"background": "resize", "faces": "detect"}).content).convert("RGB"))
    expected = np.asarray(photo.resize((512, 512), Image.BICUBIC).resize((256, 256), Image.LANCZOS))
    # The aligned crop of the astronaut covers about x 40..180, y 0..150 of this 256 photo.
    far = np.zeros(answer.shape[:2], bool)
    far[200:, :] = True
    far[:, 215:] = True
    assert np.array_equal(answer[far], expected[far])
    assert not np.array_equal(answer, expected)  # the face itself was restored


def test_aligned_faces_keep_todays_behaviour(client):
    response = client.post("/enhance", files={"image": ("x.png", png(96, 80), "image/png")},
                           data={"faces": "aligned", "min_side": "128"})
    assert response.status_code == 200, response.text
    assert "x-faces" not in response.headers


def test_background_model_without_a_background_task_is_refused(client):
    response = client.post("/enhance", files={"image": ("x.png", png(96, 80), "image/png")},
                           data={"background": "model", "faces": "detect"})
    assert response.status_code == 422
    assert "FLOWIE_BACKGROUND_TASK" in response.json()["detail"]


def test_models_lists_the_detectors(client, needs_mtcnn):
    body = client.get("/models").json()
    assert body["face_detectors"] == ["mtcnn"] and body["face_detector"] == "mtcnn"
    assert body["choices"]["faces"] == ["detect", "aligned"]
