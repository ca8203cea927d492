"""PSNR / SSIM against values known in closed form and against scikit-image's implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flowie import metrics


def _image(seed: int = 0, h: int = 48, w: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 5, yy * 4, (xx + yy) * 3], axis=-1) % 256
    return (base + rng.integers(0, 20, base.shape)).clip(0, 255).astype(np.uint8)


def test_psnr_of_a_known_mse():
    a = np.full((20, 30, 3), 100, dtype=np.uint8)
    b = a + np.uint8(5)  # MSE = 25 everywhere
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))  # 34.151 dB
    # Half the pixels off by 10: MSE = 50.
    c = a.copy()
    c[:10] += 10
    assert metrics.psnr(a, c) == pytest.approx(10 * math.log10(255**2 / 50))


def test_psnr_of_identical_images_is_infinite_and_border_crop_removes_edge_errors():
    a = _image()
    assert metrics.psnr(a, a) == math.inf
    b = a.copy()
    b[:2] = 0
    b[:, -2:] = 0
    assert metrics.psnr(a, b) < 30
    assert metrics.psnr(a, b, crop_border=2) == math.inf
    with pytest.raises(ValueError, match="crop_border"):
        metrics.psnr(a, b, crop_border=30)


def test_y_channel_is_bt601_studio_range():
    black = np.zeros((1, 1, 3))
    white = np.full((1, 1, 3), 255.0)
    assert metrics.rgb_to_y(black)[0, 0] == pytest.approx(16.0)
    assert metrics.rgb_to_y(white)[0, 0] == pytest.approx(235.0)
    # PSNR on Y of a pure grey shift of 5 levels: Y moves by 5 * 219/255.
    a = np.full((16, 16, 3), 100, dtype=np.uint8)
    expected = 10 * math.log10(255**2 / (5 * 219 / 255) ** 2)
    assert metrics.psnr(a, a + np.uint8(5), y_channel=True) == pytest.approx(expected)


def test_ssim_is_one_for_identical_images_and_lower_for_noisy_ones():
    a = _image()
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    assert metrics.ssim(a, a, y_channel=True) == pytest.approx(1.0)
    noisy = (a + np.random.default_rng(1).normal(0, 25, a.shape)).clip(0, 255).astype(np.uint8)
    worse = (a + np.random.default_rng(1).normal(0, 60, a.shape)).clip(0, 255).astype(np.uint8)
    assert 1.0 > metrics.ssim(a, noisy) > metrics.ssim(a, worse)


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    a = _image(2, 64, 56)
    b = (a + np.random.default_rng(3).normal(0, 15, a.shape)).clip(0, 255).astype(np.uint8)
    ours = metrics.ssim(a, b)
    theirs = skm.structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False)
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert metrics.psnr(a, b) == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=255))


def test_all_metrics_has_every_key_and_checks_shapes():
    a = _image()
    out = metrics.all_metrics(a, a, crop_border=1)
    assert set(out) == {"psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y"}
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(a, a[:-1])
