"""Whole photos through a face model: detect, align, restore all crops as one batch, paste back.

The path of one photo, as the official ``inference_bfr.py`` goes (its slips left out):

    photo (input size)
      -> work image: bicubic x upscale, short side >= 512, zero-padded to 64 (``Pipeline.plan``)
      -> faces detected on the photo, landmarks mapped to the work image
      -> each face warped onto the 512 template (``geometry.align``)
      -> every crop of every photo in the call restored in one ``Pipeline.enhance`` batch
      -> background of the work image: ``resize`` (the bicubic work image itself), ``swinir`` (the
         face model's stage 1) or ``model`` (another pipeline: a BSR or general model)
      -> restored crops pasted onto the background (``geometry.paste_faces``)
      -> padding cropped, Lanczos to the output size (input x upscale)
A photo without a face is the background path alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from flowie import imageops
from flowie.faces import geometry
from flowie.faces.types import Face
from flowie.params import BACKGROUNDS, FACE_CROP_SIDE, EnhanceParams

# The official script enlarges the work image so its short side is at least the face size.
MIN_WORK_SIDE = FACE_CROP_SIDE
MAX_SEED = 2**63
# Faces whose eyes are closer than this in the work image (px) are skipped, as the official script
# does (``eye_dist_threshold=5``; it measures between the wrong coordinates, we between the eyes).
MIN_EYE_DISTANCE = 5.0


class Detector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """uint8 [H, W, 3] RGB -> faces in its pixel coordinates."""


@dataclass
class PhotoResult:
    image: np.ndarray  # uint8 [H, W, 3] at the output size (input x upscale)
    seed: int
    faces: list[Face]  # in output-image coordinates
    timings: dict[str, float] = field(default_factory=dict)
    aligned: list[np.ndarray] = field(default_factory=list)  # the 512 crops (when asked for)
    restored_faces: list[np.ndarray] = field(default_factory=list)  # the restored crops (when asked for)

    def face_dicts(self) -> list[dict]:
        return [face.as_dict() for face in self.faces]


def eye_distance(face: Face) -> float:
    """Distance between the two eye landmarks, pixels."""
    return float(np.linalg.norm(face.landmarks[1] - face.landmarks[0]))


def map_face(face: Face, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Face:
    """A face in an image of ``from_hw`` moved to the same image resized to ``to_hw`` (pixel centres
    kept: x' = (x + 0.5) * s - 0.5)."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    shift_box = np.array([0.5, 0.5, 0.5, 0.5])
    box = (face.box + shift_box) * np.array([sx, sy, sx, sy]) - shift_box
    landmarks = (face.landmarks + 0.5) * np.array([sx, sy]) - 0.5
    return Face(box=box, score=face.score, landmarks=landmarks)


class FaceRestorer:
    """Restores whole photos with ``pipeline`` (a face model on aligned 512 crops).

    detector: finds faces (``flowie.faces.mtcnn.MTCNN`` or ``retinaface.RetinaFace``).
    background_pipeline: restores the background for ``background="model"`` (None: not offered).
    parser: optional crops [N] uint8 512 -> masks [N] float [512, 512] (ParseNet), used for paste-back.
    """

    def __init__(self, pipeline: Any, detector: Detector, background_pipeline: Any | None = None,
                 parser: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None) -> None:
        self.pipeline = pipeline
        self.detector = detector
        self.background_pipeline = background_pipeline
        self.parser = parser

    def default_background(self) -> str:
        return "model" if self.background_pipeline is not None else "resize"

    def plan(self, height: int, width: int, params: EnhanceParams) -> imageops.ResizePlan:
        """Sizes of a photo: output = input x upscale; work short side >= 512 (and the model's min_side)."""
        resolved = self.pipeline.resolve(params)
        min_side = max(int(resolved.min_side or 0), MIN_WORK_SIDE)
        return self.pipeline.plan(height, width, dataclasses.replace(resolved, min_side=min_side))

    def enhance(self, photos: Sequence[np.ndarray], params: EnhanceParams, seeds: Sequence[int],
                keep_crops: bool = False) -> list[PhotoResult]:
        """uint8 photos (gray, RGB or RGBA) -> PhotoResults; all their faces restored in one batch."""
        started = time.perf_counter()
        background_mode = params.background or self.default_background()
        if background_mode not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {background_mode!r}")
        if background_mode == "model" and self.background_pipeline is None:
            raise ValueError("background=model needs a background model (FLOWIE_BACKGROUND_TASK); use swinir or resize")
        rgbs = [imageops.ensure_rgb(photo) for photo in photos]
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        detected = [self.detector.detect(rgb) for rgb in rgbs]
        timings["face_detect"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        plans = [self.plan(rgb.shape[0], rgb.shape[1], params) for rgb in rgbs]
        works = [imageops.prepare(rgb, plan) for rgb, plan in zip(rgbs, plans, strict=True)]
        alignments: list[list[geometry.Alignment]] = []
        for i, (rgb, plan, work) in enumerate(zip(rgbs, plans, works, strict=True)):
            in_work = [map_face(face, rgb.shape[:2], plan.work_hw) for face in detected[i]]
            kept = [eye_distance(face) >= MIN_EYE_DISTANCE for face in in_work]
            detected[i] = [face for face, keep in zip(detected[i], kept, strict=True) if keep]
            in_work = [face for face, keep in zip(in_work, kept, strict=True) if keep]
            alignments.append([geometry.align(work, face.landmarks) for face in in_work])
        timings["face_align"] = time.perf_counter() - t0

        crops = [a.crop for photo in alignments for a in photo]
        restored_crops = self._restore_crops(crops, params, seeds, alignments, timings)
        masks = None
        if self.parser is not None and restored_crops:
            t0 = time.perf_counter()
            masks = self.parser(restored_crops)
            timings["face_parse"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        backgrounds = self._backgrounds(works, background_mode, params, seeds)
        timings["background"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        results, first = [], 0
        for i, (rgb, plan, photo_alignments) in enumerate(zip(rgbs, plans, alignments, strict=True)):
            count = len(photo_alignments)
            own = restored_crops[first:first + count]
            own_masks = masks[first:first + count] if masks is not None else None
            first += count
            pasted = geometry.paste_faces(backgrounds[i], own, [a.inverse for a in photo_alignments], own_masks)
            image = imageops.finish(pasted, plan)
            faces = [map_face(face, rgb.shape[:2], plan.output_hw) for face in detected[i]]
            results.append(PhotoResult(image=image, seed=int(seeds[i]), faces=faces, timings=timings,
                                       aligned=[a.crop for a in photo_alignments] if keep_crops else [],
                                       restored_faces=list(own) if keep_crops else []))
        timings["face_paste"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - started
        return results

    def _restore_crops(self, crops: list[np.ndarray], params: EnhanceParams, seeds: Sequence[int],
                       alignments: list[list[geometry.Alignment]], timings: dict[str, float]) -> list[np.ndarray]:
        """Every crop through the face model in one call (a crop's seed: its photo's seed + 1 + its index)."""
        if not crops:
            return []
        crop_seeds = [(int(seeds[i]) + 1 + k) % MAX_SEED for i, photo in enumerate(alignments) for k in range(len(photo))]
        face_params = dataclasses.replace(params, upscale=1.0, min_side=0, seed=None, faces=None, background=None)
        outputs = self.pipeline.enhance(crops, face_params, seeds=crop_seeds, keep_restored=False)
        for stage, seconds in outputs[0].timings.items():
            if stage != "total":
                timings[stage] = timings.get(stage, 0.0) + float(seconds)
        return [out.image for out in outputs]

    def _backgrounds(self, works: list[np.ndarray], mode: str, params: EnhanceParams,
                     seeds: Sequence[int]) -> list[np.ndarray]:
        """The background of each padded work image, at its size."""
        if mode == "resize":
            return works
        same_size = EnhanceParams(upscale=1.0, min_side=0, tile=params.tile)
        if mode == "swinir":
            pipe, bg_params = self.pipeline, dataclasses.replace(same_size, sampler="restore_only")
        else:
            pipe, bg_params = self.background_pipeline, same_size
        outputs = pipe.enhance(works, bg_params, seeds=[int(s) for s in seeds], keep_restored=False)
        return [out.image for out in outputs]
