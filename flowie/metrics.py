"""Full-reference image quality: PSNR and SSIM on RGB or on the Y channel (BasicSR conventions).

Inputs are uint8 HWC RGB arrays of the same shape (or float arrays on the 0..255 scale).
``crop_border`` pixels are removed on every side before measuring, as super-resolution papers
do (commonly the scale factor). Y is ITU-R BT.601 luma of studio range, 16..235, computed
from RGB in [0, 255] (MATLAB's ``rgb2ycbcr``), the channel SR papers report.
SSIM is Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, L 255, only
"valid" windows, averaged over channels for RGB.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import correlate1d


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """RGB in [0, 255] (HWC) -> Y in [16, 235] (HW), float64."""
    rgb = np.asarray(img, dtype=np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _prepare(img1: np.ndarray, img2: np.ndarray, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(img1), np.asarray(img2)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected HWC RGB images, got shape {a.shape}")
    if crop_border < 0 or 2 * crop_border >= min(a.shape[:2]):
        raise ValueError(f"crop_border {crop_border} does not fit an image of {a.shape[:2]}")
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        return rgb_to_y(a)[..., None], rgb_to_y(b)[..., None]
    return a.astype(np.float64), b.astype(np.float64)


def psnr(img1: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB, peak 255: ``10 log10(255^2 / MSE)``; inf for identical images."""
    a, b = _prepare(img1, img2, crop_border, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable filtering keeping only windows fully inside the image."""
    half = len(g) // 2
    out = correlate1d(correlate1d(x, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    return out[half:-half, half:-half]


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(img1: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Structural similarity in [-1, 1] (1 for identical images); mean over channels for RGB."""
    a, b = _prepare(img1, img2, crop_border, y_channel)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 after the border crop, got {a.shape[:2]}")
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))


def all_metrics(result: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> dict[str, float]:
    """PSNR and SSIM on RGB and on Y: keys psnr_rgb, ssim_rgb, psnr_y, ssim_y."""
    return {
        "psnr_rgb": psnr(result, reference, crop_border),
        "ssim_rgb": ssim(result, reference, crop_border),
        "psnr_y": psnr(result, reference, crop_border, y_channel=True),
        "ssim_y": ssim(result, reference, crop_border, y_channel=True),
    }
