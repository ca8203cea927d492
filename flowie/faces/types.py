"""One detected face (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Face:
    """A face in some image's pixel coordinates (x right, y down).

    box: [x1, y1, x2, y2]; score: the detector's probability; landmarks: [5, 2] (x, y) of the
    left eye, right eye, nose tip, left and right mouth corners (left/right as seen in the image).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    def scaled(self, sx: float, sy: float) -> Face:
        """The same face in an image resized by (sx, sy)."""
        factor = np.array([sx, sy, sx, sy], dtype=np.float64)
        return Face(box=self.box * factor, score=self.score, landmarks=self.landmarks * np.array([sx, sy]))

    def as_dict(self) -> dict:
        """JSON-ready: box, score, landmarks rounded to 0.01 px."""
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4),
                "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks]}
