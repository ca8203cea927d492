"""Whole photos with the RetinaFace detector chosen by settings, through the embedded service.

The weights file is written here in the official mobilenet0.25 layout with random values (the
real one is not available offline); its class heads are biased to find no face, which tells its
answers apart from MTCNN's (one face on the astronaut).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("cv2")

MOBILE_FILE = "detection_mobilenet0.25_Final.pth"


@pytest.fixture(scope="module")
def face_models(tmp_path_factory) -> Path:
    import torch

    from flowie.faces.retinaface_net import RetinaFaceNet

    folder = tmp_path_factory.mktemp("face_models")
    state = RetinaFaceNet("mobilenet0.25").state_dict()  # its random initialisation
    for level in range(3):
        state[f"ClassHead.{level}.conv1x1.bias"] = torch.tensor([20.0, -20.0, 20.0, -20.0])  # p(face) ~ 0
    torch.save(state, folder / MOBILE_FILE)
    return folder


def _app(make_settings: Any, tiny_runner: Any, **overrides: Any) -> Any:
    """The embedded service whose worker detects with the settings' detector and face models."""
    from service.app import create_app, load_models
    from service.metrics import Metrics
    from service.queue.memory import MemoryJobQueue
    from service.runner import PipelineRunner
    from service.worker import Worker

    settings = make_settings(face_mode="auto", **overrides)
    runner = PipelineRunner(tiny_runner.pipelines, tiny_runner.config, face_detector=settings.face_detector,
                            face_models=settings.face_models, face_parser=settings.face_parser)
    metrics = Metrics()
    queue = MemoryJobQueue(settings.max_queue, settings.result_ttl_s)
    worker = Worker(queue, lambda: runner, settings, metrics)
    return create_app(settings, queue, load_models(settings), worker=worker, metrics=metrics)


def _astronaut_png() -> bytes:
    import skimage

    with Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png") as im:
        buffer = io.BytesIO()
        im.convert("RGB").resize((128, 128), Image.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def test_models_lists_the_retinaface_whose_file_is_in_face_models(make_app, face_models):
    from fastapi.testclient import TestClient

    with TestClient(make_app(worker=False, face_models=str(face_models),
                             face_detector="retinaface_mobile0.25")) as client:
        body = client.get("/models").json()
    assert "retinaface_mobile0.25" in body["face_detectors"]
    assert "retinaface_resnet50" not in body["face_detectors"]  # its file is not there
    assert body["face_detector"] == "retinaface_mobile0.25"


def test_a_whole_photo_goes_through_the_configured_retinaface(make_settings, tiny_runner, face_models):
    from fastapi.testclient import TestClient

    app = _app(make_settings, tiny_runner, face_detector="retinaface_mobile0.25", face_models=str(face_models))
    with TestClient(app) as client:
        response = client.post("/enhance", files={"image": ("a.png", _astronaut_png(), "image/png")},
                               data={"faces": "detect", "background": "resize", "seed": "3"})
    assert response.status_code == 200, response.text
    assert response.headers["x-faces"] == "0"
    assert Image.open(io.BytesIO(response.content)).size == (128, 128)


def test_a_missing_weights_file_refuses_whole_photos_saying_what_to_put_where(make_settings, tiny_runner,
                                                                             tmp_path):
    from fastapi.testclient import TestClient

    app = _app(make_settings, tiny_runner, face_detector="retinaface_resnet50", face_models=str(tmp_path))
    with TestClient(app) as client:
        refused = client.post("/enhance", files={"image": ("a.png", _astronaut_png(), "image/png")},
                              data={"faces": "detect", "background": "resize"})
        aligned = client.post("/enhance", files={"image": ("a.png", _astronaut_png(), "image/png")},
                              data={"faces": "aligned"})
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "detection_Resnet50_Final.pth is missing" in detail and "FLOWIE_FACE_MODELS" in detail
    assert str(tmp_path) not in detail
    assert aligned.status_code == 200  # aligned faces are still served


def test_the_detector_setting_offers_every_detector_the_worker_knows():
    import typing

    from flowie.faces.weights import DETECTORS
    from service.settings import Settings

    assert typing.get_args(Settings.model_fields["face_detector"].annotation) == DETECTORS


def test_a_retinaface_detector_without_face_models_is_refused_at_start():
    from service.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="FLOWIE_FACE_DETECTOR=retinaface_resnet50 needs FLOWIE_FACE_MODELS"):
        load_settings(face_detector="retinaface_resnet50")
