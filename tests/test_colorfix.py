"""Colour-fix properties (exact values are checked against the official goldens in test_reference_parity)."""

from __future__ import annotations

import pytest
import torch

from flowie import colorfix


@pytest.fixture
def images():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 64, 48, generator=gen), torch.rand(2, 3, 64, 48, generator=gen)


def test_wavelet_decomposition_is_lossless(images):
    x, _ = images
    high, low = colorfix.wavelet_decompose(x)
    torch.testing.assert_close(high + low, x, rtol=0, atol=1e-6)


def test_wavelet_fix_takes_low_frequencies_from_style(images):
    content, style = images
    fixed = colorfix.wavelet_color_fix(content, style)
    _, low_fixed = colorfix.wavelet_decompose(fixed)
    _, low_style = colorfix.wavelet_decompose(style)
    # The low band is not exactly idempotent, but it is far closer to the style's than the content's.
    _, low_content = colorfix.wavelet_decompose(content)
    assert (low_fixed - low_style).abs().mean() < 0.5 * (low_content - low_style).abs().mean()


def test_wavelet_fix_of_a_constant_shift_removes_it(images):
    content, _ = images
    fixed = colorfix.wavelet_color_fix(content + 0.2, content)
    torch.testing.assert_close(fixed, content, rtol=0, atol=1e-5)


def test_adain_gives_content_the_style_statistics(images):
    content, style = images
    fixed = colorfix.adain_color_fix(content, style)
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), style.mean(dim=(2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(fixed.std(dim=(2, 3)), style.std(dim=(2, 3)), rtol=1e-3, atol=1e-4)


def test_none_is_identity_and_unknown_is_refused(images):
    content, style = images
    assert colorfix.color_fix("none", content, style) is content
    with pytest.raises(ValueError):
        colorfix.color_fix("sepia", content, style)


# --------------------------------------------------------------------------------------------
# In place, in row bands (what the pipeline runs)


def _padded_blur_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """The blur as first written: an explicit replicate-padded copy, then three shifted slices."""
    n = x.shape[dim]
    size = list(x.shape)
    size[dim] = radius
    padded = torch.cat([x.narrow(dim, 0, 1).expand(size), x, x.narrow(dim, n - 1, 1).expand(size)], dim=dim)
    left, mid, right = (padded.narrow(dim, k * radius, n) for k in range(3))
    return (left + 2 * mid + right) * 0.25


@pytest.mark.parametrize("length", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("radius", [1, 4, 16])
def test_blur_without_a_padded_copy_is_bit_identical(length, radius):
    x = torch.randn(1, 3, length, length + 3, generator=torch.Generator().manual_seed(length))
    for dim in (-2, -1):
        assert torch.equal(colorfix._blur_1d(x, radius, dim), _padded_blur_1d(x, radius, dim))


@pytest.mark.parametrize("shape, band_rows", [
    ((2, 3, 300, 40), 64),  # 5 bands, the last one short
    ((1, 3, 1000, 24), 100),  # bands larger than the halo on both sides
    ((1, 3, 130, 24), 64),  # a middle band whose halo reaches both image borders
    ((1, 3, 50, 24), 64),  # one band: the whole image
    ((1, 3, 700, 2), 64),  # tall and thin
])
def test_banded_in_place_fix_equals_the_whole_image_fix_bit_for_bit(shape, band_rows):
    gen = torch.Generator().manual_seed(sum(shape))
    content, style = torch.rand(*shape, generator=gen), torch.rand(*shape, generator=gen) * 1.2 - 0.1
    whole = colorfix.wavelet_color_fix(content, style)
    banded = colorfix.wavelet_color_fix_(content.clone(), style, band_pixels=band_rows * shape[-1])
    assert torch.equal(banded, whole)
    # And the official definition (conv2d blurs, high + low bands), to float rounding.
    high, _ = colorfix.wavelet_decompose(content)
    _, low = colorfix.wavelet_decompose(style)
    torch.testing.assert_close(banded, high + low, rtol=0, atol=1e-6)


def test_a_halo_one_row_short_would_show(monkeypatch):
    """The bit-exact band test above can fail: with a 30-row halo the band edges differ."""
    gen = torch.Generator().manual_seed(8)
    content, style = torch.rand(1, 3, 300, 16, generator=gen), torch.rand(1, 3, 300, 16, generator=gen)
    monkeypatch.setattr(colorfix, "WAVELET_HALO", colorfix.WAVELET_HALO - 1)
    banded = colorfix.wavelet_color_fix_(content.clone(), style, band_pixels=64 * 16)
    assert not torch.equal(banded, colorfix.wavelet_color_fix(content, style))


@pytest.mark.parametrize("kind", ["wavelet", "adain", "none"])
def test_in_place_fix_writes_into_content_only(images, kind):
    content, style = images
    content_before, style_before = content.clone(), style.clone()
    expected = colorfix.color_fix(kind, content_before, style_before)
    fixed = colorfix.color_fix_(kind, content, style)
    assert fixed is content
    assert torch.equal(fixed, expected)
    assert torch.equal(style, style_before)
    if kind != "none":
        assert not torch.equal(content, content_before)


@pytest.mark.parametrize("kind", ["wavelet", "adain"])
def test_in_place_fix_refuses_a_style_sharing_memory_with_the_content(images, kind):
    content, _ = images
    with pytest.raises(ValueError, match="share memory"):
        colorfix.color_fix_(kind, content, content)
    with pytest.raises(ValueError, match="share memory"):
        colorfix.color_fix_(kind, content[:1], content[1:])  # distinct views of one buffer
    with pytest.raises(ValueError, match="same shape"):
        colorfix.color_fix_(kind, content, content[:, :, 1:].clone())
    with pytest.raises(ValueError):
        colorfix.color_fix_("sepia", content, content.clone())
