"""Colour correction after decoding, as the official ``utils/image/align_color.py`` defines it.

Both take ``content`` (the decoded image) and ``style`` (the unclamped SwinIR output), NCHW
float in nominal [0, 1], and return the corrected content (unclamped). The ``*_`` variants
(:func:`color_fix_`) correct ``content`` in place, for the pipeline: its decoded image is not
needed afterwards, so the fix then adds no image-sized buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

WAVELET_LEVELS = 5
# How far the blur chain reaches along each axis: the sum of its dilations, 1 + 2 + 4 + 8 + 16.
WAVELET_HALO = 2**WAVELET_LEVELS - 1
# Pixels per row band of the in-place wavelet fix: a float32 RGB temporary is 6 MiB plus the
# halo. Larger bands spend less time on the halo rows, but glibc then serves the band buffers
# from its heap, where they fragment (measured alone at 16 MP: 45 MiB peak for 2^19, 164 for 2^20).
BAND_PIXELS = 1 << 19


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
    """[1, 2, 1] / 4 along ``dim`` with dilation ``radius`` and replicate padding.

    Per element ((left + 2 * mid) + right) * 0.25, where left = x[i - radius] and right =
    x[i + radius], replaced by the first / last element beyond the border (replicate padding).
    Built by in-place adds of shifted slices into the output buffer, without a padded copy or
    other temporaries: the blur needs one buffer the size of ``x``.
    """
    n = x.shape[dim]
    r = min(radius, n)  # with radius >= n, every element's neighbour is past the border
    out = x * 2
    out.narrow(dim, r, n - r).add_(x.narrow(dim, 0, n - r))  # left neighbours inside x
    out.narrow(dim, 0, r).add_(x.narrow(dim, 0, 1))  # left neighbours beyond the first element
    out.narrow(dim, 0, n - r).add_(x.narrow(dim, r, n - r))  # right neighbours inside x
    out.narrow(dim, n - r, r).add_(x.narrow(dim, n - 1, 1))  # right neighbours beyond the last
    return out.mul_(0.25)


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


def wavelet_color_fix_(content: torch.Tensor, style: torch.Tensor, band_pixels: int = BAND_PIXELS
                       ) -> torch.Tensor:
    """:func:`wavelet_color_fix` in place into ``content``, in row bands; returns ``content``.

    Every temporary is one band (about ``band_pixels`` pixels per image) plus a halo of
    ``WAVELET_HALO`` rows on each side, not an image. The low-pass of a row depends only on the
    rows within the halo, and the blur is elementwise arithmetic on shifted slices, so each band
    equals the whole-image result bit for bit.

    The difference ``style - content`` must come from the uncorrected content, but the bands
    above have already been corrected in place. So each band's window reuses the difference rows
    the previous window computed (before their content changed) and computes only its new rows.
    """
    _check_in_place(content, style)
    height, width = content.shape[-2:]
    rows = max(64, band_pixels // width)
    diff: torch.Tensor | None = None  # style - content of rows [diff_lo, diff_hi), uncorrected
    diff_lo = diff_hi = 0
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        lo, hi = max(top - WAVELET_HALO, 0), min(bottom + WAVELET_HALO, height)
        # Rows >= diff_hi >= top are still uncorrected; rows [lo, diff_hi) are carried over.
        fresh = style[:, :, diff_hi:hi] - content[:, :, diff_hi:hi]
        diff = fresh if diff is None else torch.cat([diff[:, :, lo - diff_lo:], fresh], dim=2)
        del fresh
        diff_lo, diff_hi = lo, hi
        content[:, :, top:bottom] += low_pass(diff)[:, :, top - lo:bottom - lo]
    return content


def wavelet_fix_rows(content: Iterable[tuple[int, torch.Tensor]], read_style: Callable[[int, int], torch.Tensor],
                     height: int, band_pixels: int = BAND_PIXELS) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`wavelet_color_fix`, streamed: content arrives as (first row, rows) blocks, top to bottom.

    ``read_style(top, bottom)`` gives the style's rows [top, bottom). Yields (first row, fixed
    rows) blocks, top to bottom, each as soon as the content rows within ``WAVELET_HALO`` below
    it have arrived. Between blocks it keeps only the rows a later band still reads (two halos,
    copied, so the producer's block can be freed); each band is about ``band_pixels`` pixels, so
    nothing image-sized is held. Every row is the same bits as the whole-image fix, for the
    reason :func:`wavelet_color_fix_` gives: a row's low-pass reads only rows within the halo,
    through elementwise arithmetic.
    """
    kept: torch.Tensor | None = None  # uncorrected content rows [kept_top, top of the current block)
    kept_top = done = 0  # rows [0, done) have been yielded
    arrived = 0
    for top, rows in content:
        if top != arrived:
            raise ValueError(f"content rows must arrive in order without gaps; got a block at row {top}, "
                             f"expected {arrived}")
        arrived = top + rows.shape[2]

        ready = height if arrived >= height else arrived - WAVELET_HALO  # rows < ready are fixable
        band_rows = max(64, band_pixels // max(1, rows.shape[3]))
        while done < ready:
            bottom = min(done + band_rows, ready)
            lo, hi = max(done - WAVELET_HALO, 0), min(bottom + WAVELET_HALO, height)
            local = _rows_between(kept, kept_top, rows, top, lo, hi)
            diff = read_style(lo, hi).to(local.device, local.dtype) - local
            fixed = local[:, :, done - lo:bottom - lo] + low_pass(diff)[:, :, done - lo:bottom - lo]
            del diff, local
            yield done, fixed
            done = bottom
        keep = max(done - WAVELET_HALO, kept_top if kept is not None else top)  # the next band's upper halo
        kept, kept_top = _rows_between(kept, kept_top, rows, top, keep, arrived).clone(), keep
        del rows  # the producer's block is not referenced past this point
    if done != height:
        raise ValueError(f"content ended at row {done}, expected {height} rows")


def _rows_between(kept: torch.Tensor | None, kept_top: int, block: torch.Tensor, block_top: int, lo: int, hi: int
                  ) -> torch.Tensor:
    """Rows [lo, hi) of kept rows followed by a block (a view, or a copy across the two)."""
    if lo >= block_top:
        return block[:, :, lo - block_top:hi - block_top]
    assert kept is not None and lo >= kept_top
    if hi <= block_top:
        return kept[:, :, lo - kept_top:hi - kept_top]
    return torch.cat([kept[:, :, lo - kept_top:], block[:, :, : hi - block_top]], dim=2)


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


def adain_color_fix_(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """:func:`adain_color_fix` in place into ``content`` (the same operations, so the same bits)."""
    _check_in_place(content, style)
    c_mean, c_std = _mean_std(content)
    s_mean, s_std = _mean_std(style)
    return content.sub_(c_mean).div_(c_std).mul_(s_std).add_(s_mean)


def _check_in_place(content: torch.Tensor, style: torch.Tensor) -> None:
    if content.shape != style.shape:
        raise ValueError(f"content {tuple(content.shape)} and style {tuple(style.shape)} must have the same shape")
    # Writing into content would change style's values before they are read.
    if content.untyped_storage().data_ptr() == style.untyped_storage().data_ptr():
        raise ValueError("an in-place colour fix needs a style that does not share memory with the content")


def _no_fix(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    return content


# kind -> (out-of-place, in-place into content)
_FIXES = {"wavelet": (wavelet_color_fix, wavelet_color_fix_), "adain": (adain_color_fix, adain_color_fix_),
          "none": (_no_fix, _no_fix)}


def _lookup(kind: str):
    try:
        return _FIXES[kind]
    except KeyError:
        raise ValueError(f"color_fix must be wavelet, adain or none, got {kind!r}") from None


def color_fix(kind: str, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    return _lookup(kind)[0](content, style)


def color_fix_(kind: str, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """:func:`color_fix` in place into ``content`` (which it returns); ``style`` is only read."""
    return _lookup(kind)[1](content, style)
