"""ParseNet (PSFR-GAN's face parser, as facexlib ships it): 19 classes over a 512 aligned face, and the
paste-back mask the official face helper makes of them.

``parsing_parsenet.pth`` is ``ParseNet(in_size=512, out_size=512, parsing_ch=19)``: min feature
size 32, 64 base channels clipped to [32, 256], LeakyReLU(0.2), BatchNorm. Every conv is 3x3 after
a reflection pad of 1 (``*.conv2d``, BN in ``*.norm.norm``); the layout:
- ``encoder.0`` conv 3 -> 64, then ``encoder.1..4`` residual blocks that halve the size
  (64 -> 128 -> 256 -> 256 -> 256 channels, 512 -> 32 px); a block's ``conv1`` keeps the size,
  its ``conv2`` has stride 2 and its ``shortcut_func`` is a strided conv;
- ``body.0..9``: residual blocks at 32 px (identity shortcut), added to their input;
- ``decoder.0..3``: blocks that double the size (256 -> 256 -> 256 -> 128 -> 64 channels); their
  ``conv1`` and ``shortcut_func`` upsample x2 (nearest) before the conv;
- ``out_mask_conv`` (19 logits) and ``out_img_conv`` (3, an image head the mask does not use).
Blocks are conv-BN-LeakyReLU, conv-BN, plus the shortcut; the single convs carry a bias and no BN.

The mask (``paste_faces_to_input_image`` with ``use_parse``): the face is fed as RGB in [-1, 1] at
512 px; classes ``FACE_CLASSES`` (skin, nose, glasses, eyes, brows, ears, mouth, lips, hair,
earrings) are 1 and background, hat, necklace, neck and cloth 0; the map is blurred twice by a 101 x 101 Gaussian of
sigma 11 and its outer 10 px are zeroed. ``geometry.paste_faces`` takes its minimum with the
square mask.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowie.faces.checkpoints import load_state
from flowie.faces.weights import parsenet_path

PARSE_CLASSES = 19
PARSE_SIDE = 512
# The 19 labels (CelebAMask-HQ's order, as facexlib's ParseNet demo names them): 0 background,
# 1 skin, 2 nose, 3 glasses, 4/5 eyes, 6/7 brows, 8/9 ears, 10 mouth, 11/12 lips, 13 hair, 14 hat,
# 15 earring, 16 necklace, 17 neck, 18 cloth. The official colour map keeps 1..13 and 15 (its
# 255s: the face, its hair and earrings) and drops 0, 14, 16, 17, 18 (background, hat, neck, cloth).
FACE_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)
MASK_BLUR_SIZE = 101
MASK_BLUR_SIGMA = 11
MASK_BORDER = 10
LEAKY_SLOPE = 0.2
CHANNEL_RANGE = (32, 256)
# Faces parsed per network call: bounds the activations (one 512 face peaks at about 0.6 GB of them,
# measured on the CPU).
PARSE_BATCH = 2


class ConvLayer(nn.Module):
    """Reflection pad 1, 3x3 conv (stride 2 when ``scale="down"``, after a x2 nearest upsample when
    ``"up"``), then BN and LeakyReLU when asked."""

    def __init__(self, c_in: int, c_out: int, scale: str = "none", norm: bool = False, act: bool = False) -> None:
        super().__init__()
        self.scale = scale
        self.conv2d = nn.Conv2d(c_in, c_out, 3, 2 if scale == "down" else 1, bias=not norm)
        if norm:
            self.norm = nn.Module()
            self.norm.norm = nn.BatchNorm2d(c_out)  # the checkpoint's ``norm.norm`` nesting
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        if hasattr(self, "norm"):
            x = self.norm.norm(x)
        return F.leaky_relu(x, LEAKY_SLOPE) if self.act else x


class ResidualBlock(nn.Module):
    """conv-BN-act, conv-BN, plus the input (or a conv of it when the size or width changes)."""

    def __init__(self, c_in: int, c_out: int, scale: str = "none") -> None:
        super().__init__()
        if scale != "none" or c_in != c_out:
            self.shortcut_func = ConvLayer(c_in, c_out, scale)
        self.conv1 = ConvLayer(c_in, c_out, "up" if scale == "up" else "none", norm=True, act=True)
        self.conv2 = ConvLayer(c_out, c_out, "down" if scale == "down" else "none", norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut_func(x) if hasattr(self, "shortcut_func") else x
        return shortcut + self.conv2(self.conv1(x))


def _clip(channels: int) -> int:
    return max(CHANNEL_RANGE[0], min(channels, CHANNEL_RANGE[1]))


class ParseNet(nn.Module):
    """[N,3,H,W] RGB in [-1, 1] (H, W multiples of 16; 512 for the official weights) ->
    (class logits [N,19,H,W], image [N,3,H,W])."""

    def __init__(self, steps: int = 4, depth: int = 10, base: int = 64) -> None:
        super().__init__()
        encoder: list[nn.Module] = [ConvLayer(3, base)]
        width = base
        for _ in range(steps):
            encoder.append(ResidualBlock(_clip(width), _clip(width * 2), "down"))
            width *= 2
        self.encoder = nn.Sequential(*encoder)
        self.body = nn.Sequential(*(ResidualBlock(_clip(width), _clip(width)) for _ in range(depth)))
        decoder = []
        for _ in range(steps):
            decoder.append(ResidualBlock(_clip(width), _clip(width // 2), "up"))
            width //= 2
        self.decoder = nn.Sequential(*decoder)
        self.out_img_conv = ConvLayer(_clip(width), 3)
        self.out_mask_conv = ConvLayer(_clip(width), PARSE_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        x = self.decoder(features + self.body(features))
        return self.out_mask_conv(x), self.out_img_conv(x)


def face_mask(labels: np.ndarray) -> np.ndarray:
    """Parse labels [H, W] (ints in 0..18) -> the soft face mask float32 [H, W] in [0, 1]."""
    mask = np.isin(labels, FACE_CLASSES).astype(np.float32)
    for _ in range(2):
        mask = cv2.GaussianBlur(mask, (MASK_BLUR_SIZE, MASK_BLUR_SIZE), MASK_BLUR_SIGMA)
    mask[:MASK_BORDER, :] = 0
    mask[-MASK_BORDER:, :] = 0
    mask[:, :MASK_BORDER] = 0
    mask[:, -MASK_BORDER:] = 0
    return mask


def parser_input(crops: list[np.ndarray], side: int = PARSE_SIDE) -> torch.Tensor:
    """uint8 RGB crops [H, W, 3] -> [N, 3, side, side] in [-1, 1] (bilinear resize, as the helper)."""
    resized = [crop if crop.shape[:2] == (side, side) else
               cv2.resize(crop, (side, side), interpolation=cv2.INTER_LINEAR) for crop in crops]
    x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


class FaceParser:
    """Restored crops -> paste-back masks: ``parser(crops) -> [float32 [h, w]]`` in each crop's size."""

    def __init__(self, net: ParseNet, device: str | torch.device = "cpu", side: int = PARSE_SIDE) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.side = side

    @classmethod
    def load(cls, models_dir: str | Path | None, device: str | torch.device = "cpu") -> FaceParser | None:
        """The parser with ``parsing_parsenet.pth`` of ``models_dir``; None when that file is not there."""
        path = parsenet_path(models_dir)
        if path is None:
            return None
        return cls(load_state(ParseNet(), path), device)

    @torch.inference_mode()
    def labels(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 RGB crops -> class maps int64 [side, side]."""
        out = []
        for first in range(0, len(crops), PARSE_BATCH):
            x = parser_input(crops[first:first + PARSE_BATCH], self.side).to(self.device)
            logits, _ = self.net(x)
            out.extend(logits.argmax(dim=1).cpu().numpy())
        return out

    def __call__(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        masks = []
        for crop, labels in zip(crops, self.labels(crops), strict=True):
            mask = face_mask(labels)
            height, width = crop.shape[:2]
            masks.append(mask if mask.shape == (height, width) else
                         cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR))
        return masks
