"""Colour correction after decoding, as the official ``utils/image/align_color.py`` defines it.

Both take ``content`` (the decoded image) and ``style`` (the unclamped SwinIR output), NCHW
float in nominal [0, 1], and return the corrected content (unclamped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WAVELET_LEVELS = 5


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Depthwise 3x3 binomial blur [[1,2,1],[2,4,2],[1,2,1]]/16 with dilation ``radius``, replicate padding."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    channels = x.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decompose(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): high = sum over radii 1, 2, 4, ... of (x - blur(x)), low = the last blur."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _blur(x, 2**i)
        high = high + (x - low)
        x = low
    return high, x


def _blur_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """[1, 2, 1] / 4 along ``dim`` with dilation ``radius`` and replicate padding."""
    n = x.shape[dim]
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    size = list(x.shape)
    size[dim] = radius
    padded = torch.cat([first.expand(size), x, last.expand(size)], dim=dim)
    left, mid, right = padded.narrow(dim, 0, n), padded.narrow(dim, radius, n), padded.narrow(dim, 2 * radius, n)
    return (left + 2 * mid + right) * 0.25


def low_pass(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The low band of :func:`wavelet_decompose`: the chain of dilated blurs, done separably.

    The 3x3 binomial kernel is the outer product of [1, 2, 1] / 4 with itself and replicate
    padding is separable too, so two 1-D passes equal the official depthwise conv2d up to float
    rounding, with far less memory (no im2col buffer of 9x the image on the CPU).
    """
    for i in range(levels):
        x = _blur_1d(_blur_1d(x, 2**i, dim=-2), 2**i, dim=-1)
    return x


def wavelet_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """High frequencies of ``content`` + low frequencies of ``style``.

    high(content) + low(style) = content - L(content) + L(style) = content + L(style - content),
    because the low-pass chain L is linear: one chain instead of two, on one difference image.
    """
    return content + low_pass(style - content)


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    var = flat.var(dim=2, unbiased=True) + eps  # the official code uses the unbiased variance
    return flat.mean(dim=2).view(b, c, 1, 1), var.sqrt().view(b, c, 1, 1)


def adain_color_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Per image and channel, give ``content`` the mean and std of ``style``."""
    c_mean, c_std = _mean_std(content)
    s_mean, s_std = _mean_std(style)
    return (content - c_mean) / c_std * s_std + s_mean


def color_fix(kind: str, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    if kind == "wavelet":
        return wavelet_color_fix(content, style)
    if kind == "adain":
        return adain_color_fix(content, style)
    if kind == "none":
        return content
    raise ValueError(f"color_fix must be wavelet, adain or none, got {kind!r}")
