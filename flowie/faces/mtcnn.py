"""MTCNN (Zhang et al. 2016): a three-network cascade that finds faces and their 5 landmarks.

Our own networks and cascade, loading the state dicts that ship in the ``facenet-pytorch`` wheel
(``flowie.faces.weights``). Those weights were converted from the original Caffe models via
TensorFlow, which is why the dense layers read their input in (N, W, H, C) order.

The cascade, on a uint8 RGB photo:
1. the photo is enlarged (never shrunk) so its short side is >= ``DETECT_SHORT_SIDE`` (640, as the
   official helper's ``resize=640``);
2. P-Net, fully convolutional, scans an image pyramid (factor 0.709) whose largest level maps the
   ``MIN_FACE`` (20 px) to P-Net's 12-px window; candidates with p >= 0.6 are kept, NMS 0.5 per
   level, 0.7 across levels, then their box regression is applied and they are made square;
3. R-Net rescores 24x24 crops (p >= 0.7), NMS 0.7, regression, square;
4. O-Net rescores 48x48 crops and places the landmarks; faces with p >= ``FINAL_PROB`` (0.95)
   are kept, regression, NMS 0.7 over the smaller box ("Min").
Crops outside the photo are zero-filled. Pixels enter every network as (v - 127.5) / 128, RGB.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowie.faces.checkpoints import load_state
from flowie.faces.types import Face
from flowie.faces.weights import mtcnn_paths

DETECT_SHORT_SIDE = 640
MIN_FACE = 20
FINAL_PROB = 0.95
PYRAMID_FACTOR = 0.709
STAGE_PROBS = (0.6, 0.7)  # P-Net, R-Net
# Candidates that go on to R-Net / O-Net at most (the best by score): bounds the work per photo.
MAX_CANDIDATES = 4000


class PNet(nn.Module):
    """12x12 window scanner: [N,3,H,W] -> (box regression [N,4,h,w], face probability [N,h,w])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)[:, 1]


def _dense_input(x: torch.Tensor) -> torch.Tensor:
    # The converted weights flatten features in (W, H, C) order.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """24x24 crops [N,3,24,24] -> (box regression [N,4], face probability [N])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_dense_input(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """48x48 crops [N,3,48,48] -> (box regression [N,4], landmarks [N,10] (5 x, then 5 y, relative
    to the box), face probability [N])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_dense_input(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)[:, 1]


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, overlap: str = "union",
        inclusive: bool = True) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, best first.

    boxes [N,4] x1, y1, x2, y2, pixel-inclusive (a box's width is x2 - x1 + 1, MTCNN's convention) or
    not (``inclusive=False``: width x2 - x1, RetinaFace's); a box is dropped
    when its overlap with a kept one exceeds ``threshold``: intersection over union, or over the
    smaller area (``overlap="min"``)."""
    order = torch.argsort(scores, descending=True)
    boxes = boxes[order].double()
    extra = 1.0 if inclusive else 0.0
    area = (boxes[:, 2] - boxes[:, 0] + extra) * (boxes[:, 3] - boxes[:, 1] + extra)
    x1, y1, x2, y2 = boxes.unbind(1)
    alive = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    kept = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        kept.append(i)
        w = (torch.minimum(x2[i], x2[i + 1:]) - torch.maximum(x1[i], x1[i + 1:]) + extra).clamp(min=0)
        h = (torch.minimum(y2[i], y2[i + 1:]) - torch.maximum(y1[i], y1[i + 1:]) + extra).clamp(min=0)
        inter = w * h
        denominator = torch.minimum(area[i], area[i + 1:]) if overlap == "min" else area[i] + area[i + 1:] - inter
        alive[i + 1:] &= inter / denominator <= threshold
    return order[torch.tensor(kept, dtype=torch.long, device=order.device)]


def _regress(boxes: torch.Tensor, reg: torch.Tensor, inclusive: bool = True) -> torch.Tensor:
    """Apply box regression [N,4] (offsets in units of the box's width and height)."""
    extra = 1.0 if inclusive else 0.0
    w = boxes[:, 2] - boxes[:, 0] + extra
    h = boxes[:, 3] - boxes[:, 1] + extra
    return boxes[:, :4] + reg * torch.stack([w, h, w, h], dim=1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes made square around their centres (side = the longer side)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + 0.5 * (w - side)
    y1 = boxes[:, 1] + 0.5 * (h - side)
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _crops(image: np.ndarray, boxes: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """Crops of ``boxes`` (1-based inclusive pixel coordinates, as the original MTCNN) from image
    [H,W,3] float32, zero outside the image, area-resized to size x size: [N,3,size,size] on
    ``device``. OpenCV on the host: one small resize per box costs microseconds there."""
    height, width = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes.trunc().long().tolist()):
        # 1-based inclusive [x1, x2] -> 0-based half-open [x1 - 1, x2).
        left, top, right, bottom = x1 - 1, y1 - 1, x2, y2
        if right - left <= 0 or bottom - top <= 0:
            continue
        patch = np.zeros((bottom - top, right - left, 3), dtype=np.float32)
        sl, st, sr, sb = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
        if sr > sl and sb > st:
            patch[st - top:sb - top, sl - left:sr - left] = image[st:sb, sl:sr]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(out).to(device).permute(0, 3, 1, 2)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


class MTCNN:
    """The detector: ``detect(rgb) -> [Face]`` in the photo's pixel coordinates."""

    name = "mtcnn"

    def __init__(self, pnet: PNet, rnet: RNet, onet: ONet, device: str | torch.device = "cpu",
                 min_face: int = MIN_FACE, final_prob: float = FINAL_PROB) -> None:
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = (net.to(self.device).eval() for net in (pnet, rnet, onet))
        # P-Net's few channels over a whole photo run about 25% faster in NHWC on the CPU (2-core x86 VM).
        self.pnet = self.pnet.to(memory_format=torch.channels_last)
        self.min_face, self.final_prob = min_face, final_prob

    @classmethod
    def load(cls, device: str | torch.device = "cpu", paths: dict[str, Path] | None = None) -> MTCNN:
        """The networks with the wheel's weights (``flowie.faces.weights.mtcnn_paths``)."""
        paths = paths or mtcnn_paths()
        return cls(load_state(PNet(), paths["pnet"]), load_state(RNet(), paths["rnet"]),
                   load_state(ONet(), paths["onet"]), device)

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray) -> list[Face]:
        """uint8 [H,W,3] RGB -> faces, best score first."""
        height, width = rgb.shape[:2]
        scale = max(1.0, DETECT_SHORT_SIDE / min(height, width))
        pixels = np.ascontiguousarray(rgb, dtype=np.float32)
        if scale > 1.0:  # enlarged as the official helper does (bilinear)
            pixels = cv2.resize(pixels, (int(width * scale), int(height * scale)), interpolation=cv2.INTER_LINEAR)
        faces = self._cascade(pixels)
        sx, sy = width / pixels.shape[1], height / pixels.shape[0]
        return [face.scaled(sx, sy) for face in faces]

    def _pyramid(self, height: int, width: int) -> list[float]:
        scale = 12.0 / self.min_face
        side = min(height, width) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= PYRAMID_FACTOR
            side *= PYRAMID_FACTOR
        return scales

    def _proposals(self, pixels: np.ndarray) -> torch.Tensor:
        """P-Net over the pyramid of pixels [H,W,3]: candidate boxes [N,5] (x1, y1, x2, y2, score), squared."""
        height, width = pixels.shape[:2]
        found = []
        for scale in self._pyramid(height, width):
            level = cv2.resize(pixels, (int(width * scale + 1), int(height * scale + 1)), interpolation=cv2.INTER_AREA)
            level = torch.from_numpy(level).to(self.device).permute(2, 0, 1)[None]  # an NHWC view
            reg, prob = self.pnet(_normalise(level))
            ys, xs = torch.nonzero(prob[0] >= STAGE_PROBS[0], as_tuple=True)
            if len(ys) == 0:
                continue
            cells = torch.stack([xs, ys], dim=1).to(torch.float32)
            # Each output cell is a 12-px window at stride 2 of this level (1-based corners).
            top_left = torch.floor((2 * cells + 1) / scale)
            bottom_right = torch.floor((2 * cells + 12) / scale)
            boxes = torch.cat([top_left, bottom_right], dim=1)
            scores = prob[0, ys, xs]
            offsets = reg[0, :, ys, xs].T
            keep = nms(boxes, scores, 0.5)
            found.append(torch.cat([boxes[keep], scores[keep, None], offsets[keep]], dim=1))
        if not found:
            return torch.zeros(0, 5, device=self.device)
        everything = torch.cat(found)
        everything = everything[nms(everything[:, :4], everything[:, 4], 0.7)][:MAX_CANDIDATES]
        boxes = _square(_regress(everything[:, :4], everything[:, 5:9], inclusive=False))
        return torch.cat([boxes, everything[:, 4:5]], dim=1)

    def _cascade(self, image: np.ndarray) -> list[Face]:
        candidates = self._proposals(image)
        if len(candidates) == 0:
            return []
        # R-Net
        reg, prob = self.rnet(_normalise(_crops(image, candidates[:, :4].cpu(), 24, self.device)))
        passed = prob > STAGE_PROBS[1]
        boxes, prob, reg = candidates[passed, :4], prob[passed], reg[passed]
        if len(boxes) == 0:
            return []
        keep = nms(boxes, prob, 0.7)
        boxes = _square(_regress(boxes[keep], reg[keep]))
        # O-Net
        reg, points, prob = self.onet(_normalise(_crops(image, boxes.cpu(), 48, self.device)))
        passed = prob >= self.final_prob
        boxes, points, prob, reg = boxes[passed], points[passed], prob[passed], reg[passed]
        if len(boxes) == 0:
            return []
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        # Landmarks relative to the (1-based) box -> 0-based pixel coordinates.
        xs = w * points[:, :5] + boxes[:, 0:1] - 1
        ys = h * points[:, 5:] + boxes[:, 1:2] - 1
        landmarks = torch.stack([xs, ys], dim=2)
        boxes = _regress(boxes, reg)
        keep = nms(boxes, prob, 0.7, overlap="min")
        boxes, prob, landmarks = boxes[keep].cpu().double(), prob[keep].cpu(), landmarks[keep].cpu().double()
        return [Face(box=boxes[i].numpy() - np.array([1.0, 1.0, 0.0, 0.0]), score=float(prob[i]),
                     landmarks=landmarks[i].numpy()) for i in range(len(keep)) if math.isfinite(float(prob[i]))]
