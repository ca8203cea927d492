"""Align -> identity "restore" -> paste-back: how much of the photo comes back, per warp interpolation.

    python loadtests/face_paste_fidelity.py

For each photo (scikit-image's astronaut and camera, matplotlib's grace_hopper, variants with grain
or enlarged, a tiled group), MTCNN's faces are aligned with one interpolation and pasted back with
another (``geometry.FACE_INTERPOLATION`` set for each warp); prints the PSNR over the region the
faces' crops cover, seam included, and how much the crop enlarges the first face (x s).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib.cbook
import numpy as np
import skimage
from PIL import Image

from flowie.faces import geometry
from flowie.faces.mtcnn import MTCNN

INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}


def _open(path: Path | str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _enlarged(photo: np.ndarray, factor: float) -> np.ndarray:
    height, width = photo.shape[:2]
    return np.asarray(Image.fromarray(photo).resize((int(width * factor), int(height * factor)), Image.BICUBIC))


def _grain(photo: np.ndarray, sigma: float = 6.0) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0, sigma, photo.shape)
    return np.clip(photo + noise, 0, 255).astype(np.uint8)


def _group(astronaut: np.ndarray, hopper: np.ndarray) -> np.ndarray:
    tiles = [astronaut[40:240, 120:320], hopper[80:380, 110:410], astronaut[40:240, 120:320][:, ::-1],
             hopper[80:380, 110:410][:, ::-1]]
    tiles = [np.asarray(Image.fromarray(np.ascontiguousarray(t)).resize((260, 260), Image.BICUBIC)) for t in tiles]
    return np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])


def region_psnr(photo: np.ndarray, detector: MTCNN, forward: int, inverse: int) -> float:
    faces = detector.detect(photo)
    geometry.FACE_INTERPOLATION = forward
    alignments = [geometry.align(photo, face.landmarks) for face in faces]
    geometry.FACE_INTERPOLATION = inverse
    pasted = geometry.paste_faces(photo, [a.crop for a in alignments], [a.inverse for a in alignments])
    touched = np.zeros(photo.shape[:2], bool)
    for a in alignments:
        top, bottom, left, right = geometry.face_region(a.inverse, *photo.shape[:2])
        touched[top:bottom, left:right] = True
    mse = float(np.mean((pasted[touched].astype(np.float64) - photo[touched]) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    cv2.setNumThreads(1)
    data = Path(skimage.__file__).parent / "data"
    astronaut, camera = _open(data / "astronaut.png"), _open(data / "camera.png")
    hopper = _open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    photos = {"astronaut": astronaut, "camera": camera, "grace_hopper": hopper, "grace_hopper+grain": _grain(hopper),
              "group of 4": _group(astronaut, hopper), "grace_hopper x3": _enlarged(hopper, 3.0),
              "grace_hopper x3+grain": _grain(_enlarged(hopper, 3.0))}
    detector = MTCNN.load("cpu")
    pairs = [("bilinear", "bilinear"), ("bilinear", "lanczos"), ("bicubic", "bicubic"), ("lanczos", "lanczos")]
    print("photo | x s | " + " | ".join(f"{f} + {i}" for f, i in pairs))
    for name, photo in photos.items():
        first = detector.detect(photo)[0]
        scale = float(np.sqrt(abs(np.linalg.det(geometry.similarity_to_template(first.landmarks)[:, :2]))))
        cells = [f"{region_psnr(photo, detector, INTERPOLATIONS[f], INTERPOLATIONS[i]):.1f} dB" for f, i in pairs]
        print(f"{name} | {scale:.2f} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
