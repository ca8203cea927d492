"""RetinaFace detection around ``retinaface_net``: prior boxes, decoding, confidence cut and NMS.

As the official face helper runs it (facexlib ``FaceRestoreHelper.get_face_landmarks_5(resize=640)``
then ``RetinaFace.detect_faces(conf_threshold=0.97)``), on a uint8 RGB photo:
1. the photo is resized (Lanczos, up or down) so its short side is ``DETECT_SHORT_SIDE`` (640);
   we also hold its long side to ``MAX_LONG_SIDE`` (2150, facexlib's cap when it resizes itself),
   which bounds the work on a panorama;
2. it enters the network as **BGR** float minus the mean (104, 117, 123), as it was trained (the
   official script hands the helper RGB; we do not copy that);
3. each of the P priors (``prior_boxes``) gets a face probability, box and 5 landmark offsets;
   ``decode_boxes`` / ``decode_landmarks`` undo the SSD encoding with variances (0.1, 0.2);
4. faces with probability > ``CONF_THRESHOLD`` are kept, at most ``PRE_NMS_TOP_K`` of them (the
   best: Pytorch_Retinaface's bound), then NMS at IoU 0.4;
5. boxes and landmarks are scaled back to the photo.
The landmarks are the left eye, right eye, nose tip, left and right mouth corners (left/right as
seen in the image), the order MTCNN gives and the 512 template expects.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

from flowie.faces.checkpoints import load_state
from flowie.faces.mtcnn import nms
from flowie.faces.retinaface_net import ANCHORS_PER_CELL, RetinaFaceNet
from flowie.faces.types import Face
from flowie.faces.weights import retinaface_path

# Prior boxes: per pyramid level (stride), the two square anchor sizes in pixels.
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)  # centre, size
BGR_MEAN = (104.0, 117.0, 123.0)
DETECT_SHORT_SIDE = 640
MAX_LONG_SIDE = 2150
CONF_THRESHOLD = 0.97
NMS_IOU = 0.4
PRE_NMS_TOP_K = 5000
BACKBONES = {"retinaface_resnet50": "resnet50", "retinaface_mobile0.25": "mobilenet0.25"}


def prior_count(height: int, width: int) -> int:
    """How many priors an input of height x width pixels has: 2 per cell of each level."""
    return sum(math.ceil(height / s) * math.ceil(width / s) * ANCHORS_PER_CELL for s in STEPS)


def prior_boxes(height: int, width: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Priors [P, 4] (cx, cy, w, h), as fractions of the input's width and height.

    Level by level (strides 8, 16, 32), cells row by row, and within a cell its two anchor sizes:
    the order in which the heads emit their predictions. A cell (i, j) of stride s is centred at
    ((j + 0.5) s, (i + 0.5) s) px."""
    levels = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) * step / width
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack([grid_x, grid_y], dim=-1)[:, :, None, :].expand(rows, cols, len(sizes), 2)
        extent = torch.tensor([[size / width, size / height] for size in sizes], device=device)
        extent = extent[None, None].expand(rows, cols, len(sizes), 2)
        levels.append(torch.cat([centres, extent], dim=-1).reshape(-1, 4))
    return torch.cat(levels)


def decode_boxes(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Box offsets [P, 4] -> boxes [P, 4] (x1, y1, x2, y2) in the priors' units:
    centre = prior centre + 0.1 * offset * prior size; size = prior size * exp(0.2 * offset)."""
    centre = priors[:, :2] + offsets[:, :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(offsets[:, 2:] * VARIANCES[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def decode_landmarks(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Landmark offsets [P, 10] (x, y of 5 points) -> points [P, 5, 2]: prior centre + 0.1 * offset * prior size."""
    return priors[:, None, :2] + offsets.reshape(-1, 5, 2) * VARIANCES[0] * priors[:, None, 2:]


def detection_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) the photo is resized to before the network: short side 640, long side <= 2150."""
    scale = DETECT_SHORT_SIDE / min(height, width)
    scale = min(scale, MAX_LONG_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class RetinaFace:
    """The detector: ``detect(rgb) -> [Face]`` in the photo's pixel coordinates."""

    def __init__(self, net: RetinaFaceNet, name: str, device: str | torch.device = "cpu",
                 conf_threshold: float = CONF_THRESHOLD) -> None:
        self.name = name
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.conf_threshold = conf_threshold
        self.mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, name: str, models_dir: str | Path | None, device: str | torch.device = "cpu") -> RetinaFace:
        """Detector ``name`` (retinaface_resnet50 | retinaface_mobile0.25) with facexlib's weights
        file from ``models_dir``; FaceWeightsError says what is missing, ValueError what does not fit."""
        if name not in BACKBONES:
            raise ValueError(f"unknown RetinaFace detector {name!r}: one of {', '.join(BACKBONES)}")
        path = retinaface_path(name, models_dir)
        return cls(load_state(RetinaFaceNet(BACKBONES[name]), path), name, device)

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray) -> list[Face]:
        """uint8 [H,W,3] RGB -> faces, best score first."""
        height, width = rgb.shape[:2]
        size_h, size_w = detection_size(height, width)
        pixels = np.ascontiguousarray(rgb[:, :, ::-1])  # BGR, as the network was trained
        if (size_h, size_w) != (height, width):
            pixels = cv2.resize(pixels, (size_w, size_h), interpolation=cv2.INTER_LANCZOS4)
        x = torch.from_numpy(pixels).to(self.device).permute(2, 0, 1)[None].float() - self.mean
        offsets, prob, landmark_offsets = self.net(x)
        priors = prior_boxes(size_h, size_w, self.device)
        prob = prob[0]
        passed = torch.nonzero(prob > self.conf_threshold, as_tuple=True)[0]
        if len(passed) > PRE_NMS_TOP_K:
            passed = passed[torch.topk(prob[passed], PRE_NMS_TOP_K).indices]
        if len(passed) == 0:
            return []
        frame = torch.tensor([size_w, size_h], dtype=torch.float32, device=self.device)
        # The few survivors go to the CPU: NMS is a loop that would wait on the device at every step.
        boxes = (decode_boxes(offsets[0, passed], priors[passed]) * frame.repeat(2)).cpu()
        points = (decode_landmarks(landmark_offsets[0, passed], priors[passed]) * frame).cpu()
        scores = prob[passed].cpu()
        keep = nms(boxes, scores, NMS_IOU, inclusive=False)
        boxes, scores, points = boxes[keep].double(), scores[keep], points[keep].double()
        sx, sy = width / size_w, height / size_h
        return [Face(box=boxes[i].numpy(), score=float(scores[i]), landmarks=points[i].numpy()).scaled(sx, sy)
                for i in range(len(keep)) if math.isfinite(float(scores[i]))]
