"""The synthetic degradation: seeded, deterministic, and inside its documented ranges."""

from __future__ import annotations

import numpy as np
import pytest

from flowie.train import degrade
from flowie.train.data import CropSampler, NamedImage
from flowie.train.degrade import DegradationParams, DegradationRanges


def _clean(h: int = 96, w: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth colour test picture with some edges, float32 HWC in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([xx / w, yy / h, 0.5 + 0.4 * np.sin(xx / 5) * np.cos(yy / 7)], axis=-1)
    img[h // 3 : h // 2, w // 4 : w // 2] = rng.uniform(0, 1, 3)
    return img.clip(0, 1).astype(np.float32)


def test_same_seed_same_degradation_and_different_seed_differs():
    hr = _clean()
    first, p1 = degrade.degrade(hr, np.random.default_rng(123))
    again, p2 = degrade.degrade(hr, np.random.default_rng(123))
    other, p3 = degrade.degrade(hr, np.random.default_rng(124))
    assert p1 == p2 and np.array_equal(first, again)
    assert p1 != p3 and not np.array_equal(first, other)


def test_drawn_parameters_stay_inside_the_documented_ranges():
    ranges = DegradationRanges()
    rng = np.random.default_rng(0)
    drawn = [degrade.sample_params(rng, ranges) for _ in range(400)]
    kinds = {p.kernel for p in drawn}
    assert kinds == {"iso", "aniso", "generalized", "none"}
    for p in drawn:
        assert p.kernel_size in ranges.kernel_sizes
        if p.kernel != "none":
            assert ranges.blur_sigma[0] <= min(p.sigma_x, p.sigma_y) <= max(p.sigma_x, p.sigma_y) <= ranges.blur_sigma[1]
        if p.kernel == "iso":
            assert p.sigma_x == p.sigma_y
        assert ranges.generalized_beta[0] <= p.beta <= ranges.generalized_beta[1] or p.beta == 2.0
        assert ranges.scale[0] <= p.scale <= ranges.scale[1]
        assert p.resize in degrade.RESIZE_MODES
        assert p.noise in ("gaussian", "poisson")
        if p.noise == "gaussian":
            assert ranges.noise_sigma[0] <= p.noise_sigma <= ranges.noise_sigma[1]
        else:
            assert ranges.poisson_scale[0] <= p.poisson_scale <= ranges.poisson_scale[1]
        assert p.jpeg_quality is None or ranges.jpeg_quality[0] <= p.jpeg_quality <= ranges.jpeg_quality[1]
    # The scale range is really used, both ends.
    scales = [p.scale for p in drawn]
    assert min(scales) < 1.3 and max(scales) > 3.7


def test_blur_kernels_are_normalised_and_shaped_as_asked():
    iso = degrade.blur_kernel(DegradationParams(kernel="iso", kernel_size=15, sigma_x=2.0, sigma_y=2.0))
    assert iso.shape == (15, 15) and iso.sum() == pytest.approx(1.0)
    assert np.allclose(iso, iso.T) and np.allclose(iso, iso[::-1])
    aniso = degrade.blur_kernel(DegradationParams(kernel="aniso", kernel_size=15, sigma_x=3.0, sigma_y=0.5, theta=0.0))
    # Wide along x (columns), narrow along y (rows).
    assert aniso.sum(axis=0).std() < aniso.sum(axis=1).std()
    assert degrade.blur_kernel(DegradationParams(kernel="none")) is None


def test_gaussian_noise_has_the_requested_sigma():
    flat = np.full((128, 128, 3), 0.5, dtype=np.float32)
    p = DegradationParams(kernel="none", scale=1.0, noise="gaussian", noise_sigma=10.0, jpeg_quality=None)
    noisy = degrade.apply_uint8(flat, p, np.random.default_rng(0)).astype(np.float64)
    # Rounding to uint8 adds 1/12 of a level squared; 10 levels of noise dominate.
    assert np.std(noisy - 127.5) == pytest.approx(10.0, rel=0.05)


def test_x4_bar_preset_gives_a_quarter_size_image_and_is_deterministic():
    hr = (_clean(128, 96) * 255).round().astype(np.uint8)
    lq = degrade.degrade_uint8(hr, "x4_bar", seed=5)
    assert lq.shape == (32, 24, 3) and lq.dtype == np.uint8
    assert np.array_equal(lq, degrade.degrade_uint8(hr, "x4_bar", seed=5))
    full = degrade.degrade_uint8(hr, "x4_bar", seed=5, out_size=None)
    assert full.shape == hr.shape
    with pytest.raises(ValueError, match="unknown degradation preset"):
        degrade.degrade_uint8(hr, "nope", seed=0)


def test_stronger_jpeg_and_larger_scale_lose_more():
    hr = _clean(128, 128)

    def err(**kw):
        p = DegradationParams(**{"kernel": "none", "noise": "none", "jpeg_quality": None, **kw})
        return float(np.abs(degrade.apply(hr, p, np.random.default_rng(0)) - hr).mean())

    assert err(scale=1.0) < 0.003  # only uint8 rounding
    assert err(scale=2.0) < err(scale=4.0)
    assert err(scale=1.0, jpeg_quality=90) < err(scale=1.0, jpeg_quality=20)


def test_crop_sampler_is_a_pure_function_of_seed_stream_and_index():
    images = [NamedImage("a", (_clean(140, 150, 1) * 255).astype(np.uint8)),
              NamedImage("b", (_clean(160, 130, 2) * 255).astype(np.uint8))]
    sampler = CropSampler(images, crop=64, seed=3, work_scale=(1.0, 2.0))
    clean, lq = sampler.batch(stream=1, index=7, batch_size=3)
    assert clean.shape == lq.shape == (3, 3, 64, 64)
    assert 0.0 <= float(lq.min()) and float(lq.max()) <= 1.0
    again_clean, again_lq = CropSampler(images, crop=64, seed=3, work_scale=(1.0, 2.0)).batch(1, 7, 3)
    assert np.array_equal(clean.numpy(), again_clean.numpy()) and np.array_equal(lq.numpy(), again_lq.numpy())
    other_clean, _ = sampler.batch(stream=1, index=8, batch_size=3)
    assert not np.array_equal(clean.numpy(), other_clean.numpy())
    # Degraded and clean crops show the same place: they correlate strongly.
    corr = np.corrcoef(clean.numpy().ravel(), lq.numpy().ravel())[0, 1]
    assert corr > 0.7


def test_degradation_ranges_from_text_replace_only_the_named_fields():
    ranges = degrade.parse_ranges("scale=2:4, noise_sigma=1:10,jpeg_quality=40:95,jpeg_prob=0.5")
    assert ranges.scale == (2.0, 4.0) and ranges.noise_sigma == (1.0, 10.0)
    assert ranges.jpeg_quality == (40, 95) and ranges.jpeg_prob == 0.5
    assert ranges.blur_sigma == DegradationRanges().blur_sigma == (0.2, 3.0)
    assert degrade.parse_ranges("scale=3").scale == (3.0, 3.0)
    assert degrade.parse_ranges(None) == DegradationRanges()
    rng = np.random.default_rng(5)
    drawn = [degrade.sample_params(rng, degrade.parse_ranges("scale=2:3")).scale for _ in range(200)]
    assert 2.0 <= min(drawn) and max(drawn) <= 3.0


@pytest.mark.parametrize("text, message", [
    ("scale=4:2", "scale=LO:HI"), ("jpeg_prob=1.5", "probability"), ("sharpen=1:2", "unknown degradation field 'sharpen'"),
    ("noise_sigma=a:b", "noise_sigma=LO:HI"), ("jpeg_quality=50:120", "0..100"), ("scale=0.5:2", "scale start at 1"),
])
def test_bad_degradation_ranges_are_refused_naming_the_item(text, message):
    with pytest.raises(ValueError, match=message):
        degrade.parse_ranges(text)


def test_flowie_train_refuses_bad_degradation_ranges_before_training(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "service.cli", "train", "--out", str(tmp_path / "m"), "--degrade", "scale=4:2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "flowie train: degradation 'scale=4:2'" in done.stderr
    assert not (tmp_path / "m").exists()
