"""Where face detector weights are found (torch-free: the HTTP process lists the detectors with it).

MTCNN's three small state dicts ship inside the ``facenet-pytorch`` wheel (``facenet_pytorch/data``,
MIT). That package is installed with ``--no-deps`` and never imported: its declared pins would
replace our torch and numpy, and importing it pulls torchvision. ``importlib.util.find_spec`` of a
top-level name only finds its folder; it runs none of its code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MTCNN_PACKAGE = "facenet_pytorch"
MTCNN_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
DETECTORS = ("mtcnn",)


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


def available_detectors() -> list[str]:
    """The detectors whose weights are present (the order of DETECTORS)."""
    return ["mtcnn"] if mtcnn_dir() is not None else []
