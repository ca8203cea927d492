"""Whole-photo face jobs in the worker: one ``flowie.faces.restore.FaceRestorer`` per face-model task.

Worker side only (torch). The face model is every loaded pipeline whose task is ``bfr``; the
background model is the pipeline of FLOWIE_BACKGROUND_TASK when one is set. The detector is loaded
once, on the worker's device, and shared by the face models, with ParseNet when its file is given.
"""

from __future__ import annotations

import logging
from typing import Any

from flowie.params import FACE_CROP_SIDE, FACE_TASKS, EnhanceParams

log = logging.getLogger("flowie.service.faces")

# Batch key of whole-photo jobs: their faces all become 512 x 512 crops, so photos of any size batch.
FACE_BATCH_SHAPE = (FACE_CROP_SIDE, FACE_CROP_SIDE)


def load_detector(name: str, device: str, models_dir: str = "") -> Any:
    """The detector ``name`` on ``device``; RetinaFace reads its file from ``models_dir``
    (FaceWeightsError says what is missing, ValueError what does not fit)."""
    from flowie.faces.weights import DETECTORS

    if name not in DETECTORS:
        raise ValueError(f"unknown face detector {name!r}: one of {', '.join(DETECTORS)}")
    if name == "mtcnn":
        from flowie.faces.mtcnn import MTCNN

        return MTCNN.load(device)
    from flowie.faces.retinaface import RetinaFace

    return RetinaFace.load(name, models_dir or None, device)


def load_parser(mode: str, models_dir: str, device: str) -> Any:
    """ParseNet's paste-back masks when ``mode`` is auto and parsing_parsenet.pth is in ``models_dir``;
    None (the offline ellipse) otherwise."""
    if mode == "none" or not models_dir:
        return None
    from flowie.faces.parsenet import FaceParser

    return FaceParser.load(models_dir, device)


def build_restorers(pipelines: dict[str, Any], device: str, detector: str = "mtcnn",
                    background_task: str = "", models_dir: str = "", parser: str = "auto") -> dict[str, Any]:
    """task -> FaceRestorer for every face-model task among ``pipelines`` ({} when there is none); when
    the detector's or the parser's weights are missing or do not fit, task -> the sentence saying so
    instead (whole photos are refused with it; aligned faces are served)."""
    face_tasks = [task for task in pipelines if task in FACE_TASKS]
    if not face_tasks:
        return {}
    if background_task and background_task not in pipelines:
        raise ValueError(f"FLOWIE_BACKGROUND_TASK={background_task!r} is not a served task "
                         f"({', '.join(pipelines)})")
    from flowie.faces.restore import FaceRestorer
    from flowie.faces.weights import FaceWeightsError

    try:
        found = load_detector(detector, device, models_dir)
        face_parser = load_parser(parser, models_dir, device)
    except (FaceWeightsError, ValueError) as exc:
        # Weights absent or not the expected network's: serve aligned faces, refuse whole photos saying why.
        log.warning("whole photos are not served: %s", exc)
        return {task: str(exc) for task in face_tasks}
    background = pipelines[background_task] if background_task else None
    log.info("face detector loaded", extra={"detector": detector, "background_task": background_task or None,
                                            "face_parser": face_parser is not None})
    return {task: FaceRestorer(pipelines[task], found, background, parser=face_parser) for task in face_tasks}


def check_face_params(restorers: dict[str, Any], task: str, params: EnhanceParams) -> None:
    """Refuse (ValueError -> 422) a whole-photo job this worker cannot run."""
    if task not in restorers:
        raise ValueError(f"faces=detect needs a face model (task bfr); {task!r} is not one: send faces=aligned")
    if isinstance(restorers[task], str):
        raise LookupError(f"this worker cannot detect faces: {restorers[task]}")
    if params.background == "model" and restorers[task].background_pipeline is None:
        raise ValueError("background=model needs FLOWIE_BACKGROUND_TASK; send background=swinir or resize")


def answer_faces(output: Any, metrics: Any, task: str) -> list[dict[str, Any]] | None:
    """The faces of a whole-photo output for its answer (counted in the faces-per-request metric);
    None for an output of the aligned path."""
    if not hasattr(output, "face_dicts"):
        return None
    faces = output.face_dicts()
    metrics.faces.labels(task=task).observe(len(faces))
    return faces
