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
