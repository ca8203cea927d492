"""Alignment onto the FFHQ 512 template and soft-mask paste-back, with the official constants.

The official face helper (facexlib's ``FaceRestoreHelper`` as FlowIE's ``inference_bfr.py`` uses it,
upscale factor 1) does, per face:
- ``M = estimateAffinePartial2D(landmarks, TEMPLATE, LMEDS)`` (rotation + uniform scale + shift);
  the crop is ``warpAffine(photo, M, 512x512)`` with a constant grey border (135, 133, 132);
- paste-back warps the restored crop and a 512x512 square of ones with ``invertAffineTransform(M)``,
  erodes the square by 2x2 (its anti-aliased edge), takes edge = floor(sqrt(area)) // 20, erodes
  by 2*edge more and blurs with a (2*edge+1)-wide Gaussian: the soft mask; the face is blended in
  as ``soft * face + (1 - soft) * background``, faces one after another;
- with a parse mask, the soft mask is its minimum with the warped parse mask.
Without ParseNet we take the minimum with a blurred ellipse around the template face instead, so
that a face's square, which reaches well past its cheeks, does not paint over its neighbours.
We round the blend to uint8 (the official ``astype`` truncates: half a level darker on average).

Both warps of the face resample with Lanczos (``FACE_INTERPOLATION``) where the official helper
uses bilinear: two bilinear resamplings soften the photo, so that aligning a face and pasting the
unchanged crop back gave 39-43 dB around a 180-px face, against 53-62 dB with Lanczos for faces up
to the crop's size (docs/FACES.md). The crop the face model sees differs from the bilinear one by
about 3 grey levels RMS, fine detail the bilinear warp loses. The masks keep the official warps.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from flowie.params import FACE_CROP_SIDE

FACE_SIZE = FACE_CROP_SIDE
# The 5 landmarks (eyes, nose tip, mouth corners) of the FFHQ-aligned 512 x 512 face.
TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float64)
BORDER_VALUE = (135, 133, 132)
FACE_INTERPOLATION = cv2.INTER_LANCZOS4
# The offline face mask in the aligned 512 frame: an ellipse from above the brows to below the
# chin, about 1.4 eye distances either side of the nose (the template's eyes are 126 px apart).
ELLIPSE_CENTRE = (256, 290)
ELLIPSE_AXES = (185, 230)  # half-width, half-height
ELLIPSE_BLUR_SIGMA = 16.0


@dataclass(frozen=True)
class Alignment:
    """One face's crop and the affine maps (2 x 3) between the photo and the crop."""

    crop: np.ndarray  # uint8 [512, 512, 3]
    affine: np.ndarray  # photo -> crop
    inverse: np.ndarray  # crop -> photo


def similarity_to_template(landmarks: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity (LMEDS fit) that maps landmarks [5, 2] onto TEMPLATE."""
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), TEMPLATE,
                                            method=cv2.LMEDS)
    if matrix is None:  # degenerate points (all equal): no similarity exists
        raise ValueError("the landmarks do not determine a similarity transform")
    return matrix


def align(photo: np.ndarray, landmarks: np.ndarray) -> Alignment:
    """Warp the face at ``landmarks`` (photo pixels) from uint8 RGB photo [H, W, 3] to the 512 template."""
    affine = similarity_to_template(landmarks)
    crop = cv2.warpAffine(photo, affine, (FACE_SIZE, FACE_SIZE), flags=FACE_INTERPOLATION,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE)
    return Alignment(crop=crop, affine=affine, inverse=cv2.invertAffineTransform(affine))


def ellipse_crop_mask() -> np.ndarray:
    """The offline face mask in the 512 frame: a blurred ellipse, float32 [512, 512] in [0, 1]."""
    mask = np.zeros((FACE_SIZE, FACE_SIZE), dtype=np.float32)
    cv2.ellipse(mask, ELLIPSE_CENTRE, ELLIPSE_AXES, 0, 0, 360, 1.0, thickness=-1)
    return cv2.GaussianBlur(mask, (0, 0), ELLIPSE_BLUR_SIGMA)


_ELLIPSE = ellipse_crop_mask()


def face_region(inverse: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the photo that a crop covers under ``inverse`` (2 px margin),
    clipped to the photo; None when it lies wholly outside."""
    corners = np.array([[0, 0, 1], [FACE_SIZE, 0, 1], [0, FACE_SIZE, 1], [FACE_SIZE, FACE_SIZE, 1]], dtype=np.float64)
    mapped = corners @ inverse.T
    left, top = np.floor(mapped.min(axis=0)).astype(int) - 2
    right, bottom = np.ceil(mapped.max(axis=0)).astype(int) + 2
    top, left, bottom, right = max(int(top), 0), max(int(left), 0), min(int(bottom), height), min(int(right), width)
    if bottom <= top or right <= left:
        return None
    return top, bottom, left, right


def paste_faces(background: np.ndarray, restored: list[np.ndarray], inverses: list[np.ndarray],
                crop_masks: list[np.ndarray | None] | None = None) -> np.ndarray:
    """Blend restored 512 crops into ``background`` (uint8 [H, W, 3]), one after another.

    inverses: crop -> photo maps. crop_masks: per face a float [512, 512] mask in the crop frame
    (ParseNet's), or None for the offline ellipse; each is warped and min'd with the square mask.
    Each face is warped into its own region of the photo only (``face_region``): the same pixels
    as a whole-photo warp, at the cost of the face's size."""
    height, width = background.shape[:2]
    canvas = background.astype(np.float32)
    masks = crop_masks if crop_masks is not None else [None] * len(restored)
    for face, inverse, crop_mask in zip(restored, inverses, masks, strict=True):
        region = face_region(inverse, height, width)
        if region is None:
            continue
        top, bottom, left, right = region
        local = inverse.copy()
        local[:, 2] -= (left, top)
        size = (right - left, bottom - top)
        eroded_and_soft = _square_masks(local, size)
        if eroded_and_soft is None:
            continue
        eroded, soft = eroded_and_soft
        shape_mask = _ELLIPSE if crop_mask is None else crop_mask.astype(np.float32)
        soft = np.minimum(soft, np.clip(cv2.warpAffine(shape_mask, local, size, flags=cv2.INTER_CUBIC), 0.0, 1.0))
        warped = cv2.warpAffine(face, local, size, flags=FACE_INTERPOLATION).astype(np.float32) * eroded[:, :, None]
        alpha = soft[:, :, None]
        canvas[top:bottom, left:right] = alpha * warped + (1 - alpha) * canvas[top:bottom, left:right]
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _square_masks(inverse: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(2x2-eroded warped square, soft mask) of one face within a region of ``size`` (w, h)."""
    ones = np.ones((FACE_SIZE, FACE_SIZE), dtype=np.float32)
    eroded = cv2.erode(cv2.warpAffine(ones, inverse, size), np.ones((2, 2), np.uint8))
    area = float(eroded.sum())
    if area <= 0:
        return None
    edge = int(area ** 0.5) // 20
    if edge == 0:
        return eroded, eroded
    centre = cv2.erode(eroded, np.ones((2 * edge, 2 * edge), np.uint8))
    return eroded, cv2.GaussianBlur(centre, (2 * edge + 1, 2 * edge + 1), 0)
