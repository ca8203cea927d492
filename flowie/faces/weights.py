"""Where the face networks' weights are found (torch-free: the HTTP process lists the detectors with it).

MTCNN's three small state dicts ship inside the ``facenet-pytorch`` wheel (``facenet_pytorch/data``,
MIT). That package is installed with ``--no-deps`` and never imported: its declared pins would
replace our torch and numpy, and importing it pulls torchvision. ``importlib.util.find_spec`` of a
top-level name only finds its folder; it runs none of its code.

RetinaFace and ParseNet are facexlib's release files, which the user puts in a directory of their
choosing (the face-models directory); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MTCNN_PACKAGE = "facenet_pytorch"
MTCNN_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
# Detector name -> the facexlib release file that holds its weights.
RETINAFACE_FILES = {"retinaface_resnet50": "detection_Resnet50_Final.pth",
                    "retinaface_mobile0.25": "detection_mobilenet0.25_Final.pth"}
PARSENET_FILE = "parsing_parsenet.pth"
DETECTORS = ("mtcnn", *RETINAFACE_FILES)


class FaceWeightsError(FileNotFoundError):
    """A detector's weights are missing; the message says what to install or where to put what."""


def mtcnn_dir() -> Path | None:
    """The folder holding pnet.pt, rnet.pt and onet.pt, or None when the wheel is not installed."""
    spec = importlib.util.find_spec(MTCNN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        data = Path(location) / "data"
        if all((data / name).is_file() for name in MTCNN_FILES):
            return data
    return None


def mtcnn_paths() -> dict[str, Path]:
    """{"pnet": path, "rnet": ..., "onet": ...}; FaceWeightsError when the wheel is missing."""
    folder = mtcnn_dir()
    if folder is None:
        raise FaceWeightsError("the MTCNN weights are missing: install them with "
                               "`pip install --no-deps facenet-pytorch==2.6.0`")
    return {name.removesuffix(".pt"): folder / name for name in MTCNN_FILES}


def face_model_path(filename: str, models_dir: str | Path | None) -> Path:
    """``models_dir / filename``; FaceWeightsError, one sentence saying where to put it, when absent.
    (The sentence names no server path: a refused request may carry it.)"""
    if not models_dir:
        raise FaceWeightsError(f"{filename} is needed but no face-models directory is set: put facexlib's "
                               f"{filename} in a directory and name it with FLOWIE_FACE_MODELS (or --face-models)")
    path = Path(models_dir) / filename
    if not path.is_file():
        raise FaceWeightsError(f"{filename} is missing from the face-models directory (FLOWIE_FACE_MODELS or "
                               f"--face-models): put facexlib's {filename} there")
    return path


def retinaface_path(name: str, models_dir: str | Path | None) -> Path:
    """The weights file of detector ``name`` (a key of RETINAFACE_FILES) in ``models_dir``."""
    if name not in RETINAFACE_FILES:
        raise ValueError(f"unknown RetinaFace detector {name!r}: one of {', '.join(RETINAFACE_FILES)}")
    return face_model_path(RETINAFACE_FILES[name], models_dir)


def parsenet_path(models_dir: str | Path | None) -> Path | None:
    """``parsing_parsenet.pth`` in ``models_dir``, or None when it is not there."""
    if not models_dir or not (Path(models_dir) / PARSENET_FILE).is_file():
        return None
    return Path(models_dir) / PARSENET_FILE


def available_detectors(models_dir: str | Path | None = None) -> list[str]:
    """The detectors whose weights are present (the order of DETECTORS): MTCNN when its wheel is
    installed, each RetinaFace whose file is in ``models_dir``."""
    found = ["mtcnn"] if mtcnn_dir() is not None else []
    if models_dir:
        found += [name for name, filename in RETINAFACE_FILES.items() if (Path(models_dir) / filename).is_file()]
    return found
