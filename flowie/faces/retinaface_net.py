"""RetinaFace's networks (Deng et al. 2019), laid out so the official facexlib checkpoints load as they are.

``detection_Resnet50_Final.pth`` and ``detection_mobilenet0.25_Final.pth`` (trained with
biubug6/Pytorch_Retinaface) hold, once a ``module.`` prefix is stripped:
- ``body.*``: the backbone up to its last stage. ResNet-50 in torchvision's naming (``conv1``,
  ``bn1``, ``layer1`` .. ``layer4`` of bottlenecks with ``conv1..3``, ``bn1..3`` and
  ``downsample.0/1``; the stride sits on the 3x3 conv), no ``fc``; or MobileNetV1 x0.25 as three
  ``stage1..3`` sequences of conv-BN-LeakyReLU(0.1) triples, no classifier.
- ``fpn.output1..3`` (1x1 conv-BN-act from the strides 8/16/32 features), ``fpn.merge1/2`` (3x3
  conv-BN-act after adding the nearest-upsampled coarser level).
- ``ssh1..3``: the SSH context module on each level: a 3x3 branch of C/2 channels and two chained
  3x3 branches of C/4 (the "5x5" and "7x7"), concatenated, then ReLU.
- ``ClassHead.k`` / ``BboxHead.k`` / ``LandmarkHead.k``: a 1x1 ``conv1x1`` per level giving, per
  cell and for each of its 2 anchors, 2 logits / 4 box offsets / 10 landmark offsets.
Activations are LeakyReLU with slope 0.1 when a module has at most 64 channels (MobileNet's
FPN and SSH), slope 0 (a ReLU) otherwise, as those checkpoints were trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ANCHORS_PER_CELL = 2


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, slope: float | None = 0.0,
             groups: int = 1) -> list[nn.Module]:
    """[conv (no bias), BN] and the LeakyReLU of ``slope`` unless it is None: the layers of one unit."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if slope is not None:
        layers.append(nn.LeakyReLU(slope, inplace=True))
    return layers


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4 channels), plus the shortcut."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut, inplace=True)


class ResNet50Body(nn.Module):
    """ResNet-50 without its classifier: [N,3,H,W] -> features at strides 8, 16, 32 (512, 1024, 2048 ch)."""

    out_channels = (512, 1024, 2048)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in = 64
        for index, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
            layer = []
            for k in range(blocks):
                layer.append(Bottleneck(c_in, width, stride if k == 0 else 1))
                c_in = width * Bottleneck.expansion
            setattr(self, f"layer{index}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x)), inplace=True), 3, 2, 1)
        x = self.layer1(x)
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


def _depthwise_separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """MobileNetV1 unit: 3x3 depthwise conv-BN-act, then 1x1 conv-BN-act (LeakyReLU 0.1)."""
    return nn.Sequential(*_conv_bn(c_in, c_in, 3, stride, 0.1, groups=c_in), *_conv_bn(c_in, c_out, 1, 1, 0.1))


class MobileNetBody(nn.Module):
    """MobileNetV1 x0.25: [N,3,H,W] -> features at strides 8, 16, 32 (64, 128, 256 ch)."""

    out_channels = (64, 128, 256)

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Sequential(*_conv_bn(3, 8, 3, 2, 0.1)),
                                    _depthwise_separable(8, 16, 1), _depthwise_separable(16, 32, 2),
                                    _depthwise_separable(32, 32, 1), _depthwise_separable(32, 64, 2),
                                    _depthwise_separable(64, 64, 1))
        self.stage2 = nn.Sequential(_depthwise_separable(64, 128, 2),
                                    *(_depthwise_separable(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(_depthwise_separable(128, 256, 2), _depthwise_separable(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return [c3, c4, self.stage3(c4)]


def _slope(channels: int) -> float:
    return 0.1 if channels <= 64 else 0.0


class FPN(nn.Module):
    """Top-down pyramid over three backbone levels, every output ``channels`` wide."""

    def __init__(self, in_channels: tuple[int, int, int], channels: int) -> None:
        super().__init__()
        slope = _slope(channels)
        self.output1, self.output2, self.output3 = (nn.Sequential(*_conv_bn(c, channels, 1, 1, slope))
                                                    for c in in_channels)
        self.merge1 = nn.Sequential(*_conv_bn(channels, channels, 3, 1, slope))
        self.merge2 = nn.Sequential(*_conv_bn(channels, channels, 3, 1, slope))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """Single-stage headless context module: 3x3, "5x5" and "7x7" receptive fields, concatenated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        slope, quarter = _slope(channels), channels // 4
        self.conv3X3 = nn.Sequential(*_conv_bn(channels, channels // 2, slope=None))
        self.conv5X5_1 = nn.Sequential(*_conv_bn(channels, quarter, slope=slope))
        self.conv5X5_2 = nn.Sequential(*_conv_bn(quarter, quarter, slope=None))
        self.conv7X7_2 = nn.Sequential(*_conv_bn(quarter, quarter, slope=slope))
        self.conv7x7_3 = nn.Sequential(*_conv_bn(quarter, quarter, slope=None))  # lower-case x: the checkpoints'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.conv5X5_1(x)
        branches = [self.conv3X3(x), self.conv5X5_2(context), self.conv7x7_3(self.conv7X7_2(context))]
        return F.relu(torch.cat(branches, dim=1))


class _Head(nn.Module):
    """A 1x1 conv whose output [N, A*k, h, w] is read as [N, h*w*A, k] (row, column, anchor order)."""

    def __init__(self, channels: int, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(channels, ANCHORS_PER_CELL * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFaceNet(nn.Module):
    """[N,3,H,W] BGR minus the mean (104, 117, 123) -> (box offsets [N,P,4], face probability [N,P],
    landmark offsets [N,P,10]) for the P priors of ``retinaface.prior_boxes(H, W)``."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        if backbone == "resnet50":
            self.body: nn.Module = ResNet50Body()
            channels = 256
        elif backbone == "mobilenet0.25":
            self.body = MobileNetBody()
            channels = 64
        else:
            raise ValueError(f"unknown RetinaFace backbone {backbone!r}: resnet50 or mobilenet0.25")
        self.fpn = FPN(self.body.out_channels, channels)
        self.ssh1, self.ssh2, self.ssh3 = SSH(channels), SSH(channels), SSH(channels)
        self.ClassHead = nn.ModuleList(_Head(channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(channels, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = self.fpn(self.body(x))
        features = [ssh(level) for ssh, level in zip((self.ssh1, self.ssh2, self.ssh3), levels, strict=True)]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features, strict=True)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features, strict=True)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features, strict=True)], dim=1)
        return boxes, torch.softmax(logits, dim=-1)[..., 1], landmarks
