"""Promises of flowie.tiling: tiles cover everything, outputs line up at any scale, seams vanish.

Seam metric: mean |tiled - untiled| over the output pixels that two or more tiles cover (the
overlap bands, where a seam would show). Each seam test also runs the same tiles with uniform
weights (the official ``count`` average) to show the metric does detect a seam.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowie import tiling
from flowie.tiling import blend_weights, needs_tiling, tile_starts, tiled_apply


def _box_blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 box blur, zero padding: wrong only in the outermost pixel of a tile."""
    kernel = torch.full((x.shape[1], 1, 3, 3), 1 / 9, dtype=x.dtype)
    return F.conv2d(x, kernel, padding=1, groups=x.shape[1])


def _nearest_up8(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=8, mode="nearest")


def _decoder_like(x: torch.Tensor) -> torch.Tensor:
    """blur -> nearest x8 -> blur: a scale-8 map whose tile borders are wrong over ~9 output px."""
    return _box_blur(_nearest_up8(_box_blur(x)))


def _avg_pool8(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 8)


def _encoder_like(x: torch.Tensor) -> torch.Tensor:
    """blur -> avg-pool /8: a scale-1/8 map whose tile borders are wrong in one output pixel."""
    return _avg_pool8(_box_blur(x))


def _overlap_band(h: int, w: int, tile: int, stride: int, scale: float) -> torch.Tensor:
    """Bool [H*scale, W*scale]: output pixels covered by two or more tiles."""
    cover_h = torch.zeros(h)
    cover_w = torch.zeros(w)
    for start in tile_starts(h, tile, stride):
        cover_h[start:start + min(tile, h)] += 1
    for start in tile_starts(w, tile, stride):
        cover_w[start:start + min(tile, w)] += 1
    band = (cover_h[:, None] > 1) | (cover_w[None, :] > 1)
    if scale >= 1:
        return band.repeat_interleave(int(scale), 0).repeat_interleave(int(scale), 1)
    step = round(1 / scale)
    return band[::step, ::step]


def _seam(out: torch.Tensor, ref: torch.Tensor, band: torch.Tensor) -> float:
    assert band.any(), "the test tiling must produce overlaps"
    return (out - ref).abs()[..., band].mean().item()


def _uniform_weights(tile_h, tile_w, dtype=torch.float32, device=None, ramp=None):
    return torch.ones(1, 1, tile_h, tile_w, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# tile_starts


@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 100, 119, 120, 121, 200, 513])
@pytest.mark.parametrize("tile, stride", [(64, 56), (64, 48), (64, 64), (32, 8), (16, 1)])
def test_tile_starts_cover_without_gaps_and_end_flush(length, tile, stride):
    starts = tile_starts(length, tile, stride)
    size = min(tile, length)
    assert starts[0] == 0
    assert starts[-1] + size == length, "last tile must end flush with the input"
    assert starts == sorted(set(starts)), "starts must be strictly increasing (no duplicates)"
    for prev, nxt in zip(starts, starts[1:], strict=False):
        assert 0 < nxt - prev <= stride, "consecutive tiles must overlap or touch, never leave a gap"
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start:start + size] = True
    assert covered.all()


@pytest.mark.parametrize("length", [64, 100, 120, 127, 128, 300])
def test_tile_starts_match_official_sliding_windows(length):
    # The official inference_bsr.py offsets, for inputs at least one tile large.
    tile, stride = 64, 56
    official = list(range(0, length - tile + 1, stride))
    if (length - tile) % stride != 0:
        official.append(length - tile)
    assert tile_starts(length, tile, stride) == official


def test_tile_starts_rejects_gaps_and_nonpositive_sizes():
    with pytest.raises(ValueError, match="gaps"):
        tile_starts(100, 32, 33)
    for bad in [(0, 32, 16), (100, 0, 16), (100, 32, 0)]:
        with pytest.raises(ValueError):
            tile_starts(*bad)


# --------------------------------------------------------------------------------------------
# weights and helpers


def test_blend_weights_positive_peak_in_middle_and_fall_towards_border():
    weight = blend_weights(32, 48, torch.float32)
    assert weight.shape == (1, 1, 32, 48)
    assert (weight > 0).all()
    assert 0.99 < weight.max().item() <= 1.0
    row = weight[0, 0, 16]
    assert (row[1:24] >= row[:23]).all() and (row[24:] <= row[23:-1]).all()
    assert torch.allclose(weight, weight.flip(-1)) and torch.allclose(weight, weight.flip(-2))


def test_blend_weights_crossfade_sums_to_one_over_the_overlap():
    # Tile A ramps down over its last r pixels, tile B up over its first r: same band.
    r = 16
    a = blend_weights(1, 64, torch.float64, ramp=(0, 0, 0, r))[0, 0, 0]
    b = blend_weights(1, 64, torch.float64, ramp=(0, 0, r, 0))[0, 0, 0]
    torch.testing.assert_close(a[-r:] + b[:r], torch.ones(r, dtype=torch.float64))
    assert (a[:-r] == 1).all() and (b[r:] == 1).all()


def test_needs_tiling_compares_pixel_count():
    assert not needs_tiling(512, 512, 512 * 512)
    assert needs_tiling(512, 513, 512 * 512)
    with pytest.raises(ValueError):
        needs_tiling(0, 512, 100)


# --------------------------------------------------------------------------------------------
# tiled_apply: exactness


def test_single_tile_calls_fn_once_on_the_whole_input_and_returns_its_result():
    x = torch.randn(2, 4, 40, 56, generator=torch.Generator().manual_seed(1))
    calls = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return _box_blur(t)

    progress = []
    out = tiled_apply(fn, [x], tile=64, stride=48, progress=lambda done, total: progress.append((done, total)))
    assert calls == [x.shape]
    assert torch.equal(out, _box_blur(x))
    assert progress == [(1, 1)]


@pytest.mark.parametrize("pointwise", [lambda t: t, lambda t: torch.sigmoid(t) * 3 - 1],
                         ids=["identity", "sigmoid"])
def test_pointwise_fn_is_reproduced_because_weights_normalise(pointwise):
    x = torch.randn(2, 4, 77, 93, generator=torch.Generator().manual_seed(2))
    out = tiled_apply(pointwise, [x], tile=32, stride=24)
    # Equal up to float32 rounding of sum(w*y)/sum(w) (measured max 1 ulp).
    torch.testing.assert_close(out, pointwise(x), rtol=3e-7, atol=1e-7)


def test_identity_in_half_precision_is_exact_and_keeps_dtype():
    x = torch.randn(1, 4, 50, 70, generator=torch.Generator().manual_seed(3)).half()
    out = tiled_apply(lambda t: t, [x], tile=32, stride=20)
    assert out.dtype == torch.float16
    assert torch.equal(out, x)


def test_multiple_inputs_are_cut_into_the_same_tiles():
    gen = torch.Generator().manual_seed(4)
    x_t, c_latent = torch.randn(1, 4, 70, 90, generator=gen), torch.randn(1, 4, 70, 90, generator=gen)

    def flow(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x * 2 - c

    out = tiled_apply(flow, [x_t, c_latent], tile=32, stride=24)
    torch.testing.assert_close(out, flow(x_t, c_latent), rtol=3e-7, atol=1e-7)


def test_progress_reports_every_tile():
    x = torch.zeros(1, 1, 100, 70)
    seen = []
    tiled_apply(lambda t: t, [x], tile=64, stride=48, progress=lambda done, total: seen.append((done, total)))
    total = len(tile_starts(100, 64, 48)) * len(tile_starts(70, 64, 48))
    assert seen == [(i, total) for i in range(1, total + 1)]


# --------------------------------------------------------------------------------------------
# tiled_apply: output geometry


@pytest.mark.parametrize("fn, scale, hw, tile, stride", [
    (_box_blur, 1.0, (70, 90), 32, 24),
    (_nearest_up8, 8.0, (13, 21), 8, 6),
    (_avg_pool8, 1 / 8, (104, 168), 64, 48),
], ids=["scale1", "scale8", "scale1/8"])
def test_output_size_is_input_size_times_scale(fn, scale, hw, tile, stride):
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(5))
    out = tiled_apply(fn, [x], tile=tile, stride=stride, scale=scale, out_channels=3)
    assert out.shape == (2, 3, round(hw[0] * scale), round(hw[1] * scale))


def test_wrong_scale_or_channels_is_an_error_not_a_misplaced_tile():
    x = torch.rand(1, 3, 40, 40)
    with pytest.raises(ValueError, match="tile x scale"):
        tiled_apply(_nearest_up8, [x], tile=16, stride=12, scale=1.0)
    with pytest.raises(ValueError, match="out_channels"):
        tiled_apply(_box_blur, [x], tile=16, stride=12, out_channels=4)
    with pytest.raises(ValueError, match="whole number"):
        tiled_apply(_avg_pool8, [torch.rand(1, 3, 100, 100)], tile=60, stride=44, scale=1 / 8)
    with pytest.raises(ValueError, match="share H, W"):
        tiled_apply(lambda a, b: a, [x, torch.rand(1, 3, 40, 41)], tile=16, stride=12)


# --------------------------------------------------------------------------------------------
# tiled_apply: seams


def test_box_blur_tiles_blend_without_seam(monkeypatch):
    # Only the outermost pixel of a tile is wrong (zero padding), by at most 5/9 of the value range.
    # The crossfade gives that pixel a weight of sin^2(pi / (4 r)) next to ~1 for the neighbour,
    # r = overlap = 16 here, so no pixel can be off by more than 5/9 * 0.0024 = 1.3e-3.
    # Measured: seam 1.6e-5, max 7.8e-4; uniform averaging: seam 6.9e-3, max 0.22.
    x = torch.rand(2, 3, 100, 132, generator=torch.Generator().manual_seed(6))
    tile, stride, r = 64, 48, 16
    ref = _box_blur(x)
    band = _overlap_band(100, 132, tile, stride, 1.0)
    out = tiled_apply(_box_blur, [x], tile=tile, stride=stride)
    max_edge_weight = math.sin(math.pi / (4 * r)) ** 2
    assert (out - ref).abs().max().item() <= 5 / 9 * max_edge_weight + 1e-6
    assert _seam(out, ref, band) < 1e-4

    monkeypatch.setattr(tiling, "blend_weights", _uniform_weights)
    uniform = tiled_apply(_box_blur, [x], tile=tile, stride=stride)
    assert _seam(uniform, ref, band) > 3e-3, "the metric must see the seam of a plain average"


def test_nearest_upsampler_scale8_tiles_line_up_exactly():
    # Each output pixel depends on one input pixel: any misplaced tile would show as an O(1) error.
    x = torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(7))
    out = tiled_apply(_nearest_up8, [x], tile=16, stride=12, scale=8)
    ref = _nearest_up8(x)
    assert _seam(out, ref, _overlap_band(40, 52, 16, 12, 8)) < 1e-6
    torch.testing.assert_close(out, ref, rtol=3e-7, atol=1e-7)


def test_decoder_like_scale8_tiles_blend_without_seam(monkeypatch):
    # Border errors reach ~9 output px into a tile against a 32 px (4 latent px) crossfade, where the
    # weight has already risen to 0.16, so the bound is looser than for the blur: the crossfade
    # can only hide errors that stay well inside the overlap. Measured: seam 4.8e-3, uniform
    # averaging 5.0e-2 (10x worse).
    x = torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(7))
    tile, stride = 16, 12
    ref = _decoder_like(x)
    band = _overlap_band(40, 52, tile, stride, 8)
    out = tiled_apply(_decoder_like, [x], tile=tile, stride=stride, scale=8)
    assert _seam(out, ref, band) < 8e-3

    monkeypatch.setattr(tiling, "blend_weights", _uniform_weights)
    uniform = tiled_apply(_decoder_like, [x], tile=tile, stride=stride, scale=8)
    assert _seam(uniform, ref, band) > 3 * 8e-3


def test_avg_pool_scale_one_eighth_tiles_line_up_exactly():
    x = torch.rand(1, 3, 320, 416, generator=torch.Generator().manual_seed(8))
    out = tiled_apply(_avg_pool8, [x], tile=128, stride=96, scale=1 / 8)
    ref = _avg_pool8(x)
    assert _seam(out, ref, _overlap_band(320, 416, 128, 96, 1 / 8)) < 1e-6
    torch.testing.assert_close(out, ref, rtol=3e-7, atol=1e-7)


def test_encoder_like_scale_one_eighth_tiles_blend_without_seam(monkeypatch):
    # One wrong output pixel per tile border (the blurred border row enters one 8x8 pool), with a
    # 4-output-px crossfade (edge weight 0.038). Measured: seam 4.5e-4; uniform averaging: 5.9e-3.
    x = torch.rand(1, 3, 320, 416, generator=torch.Generator().manual_seed(8))
    tile, stride = 128, 96
    ref = _encoder_like(x)
    band = _overlap_band(320, 416, tile, stride, 1 / 8)
    out = tiled_apply(_encoder_like, [x], tile=tile, stride=stride, scale=1 / 8)
    assert _seam(out, ref, band) < 1e-3

    monkeypatch.setattr(tiling, "blend_weights", _uniform_weights)
    uniform = tiled_apply(_encoder_like, [x], tile=tile, stride=stride, scale=1 / 8)
    assert _seam(uniform, ref, band) > 3 * 1e-3


# --------------------------------------------------------------------------------------------
# tiled_apply: separable weight sums (no image-sized weight buffer)


def _grid(height: int, width: int, tile: int, stride: int, scale: float):
    """Per tile: output offsets (oy, ox) and the (top, bottom, left, right) ramp in output pixels."""
    starts_h, starts_w = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    size_h, size_w = min(tile, height), min(tile, width)
    for y0, (top, bottom) in zip(starts_h, tiling._overlaps(starts_h, size_h), strict=True):
        for x0, (left, right) in zip(starts_w, tiling._overlaps(starts_w, size_w), strict=True):
            yield (round(y0 * scale), round(x0 * scale)), tuple(round(v * scale) for v in (top, bottom, left, right))


def _two_d_weight_sum(height, width, tile, stride, scale, dtype=torch.float64):
    """The image-sized sum of every tile's 2-D blend weight, as tiled_apply used to build it."""
    out_tile_h, out_tile_w = round(min(tile, height) * scale), round(min(tile, width) * scale)
    total = torch.zeros(round(height * scale), round(width * scale), dtype=dtype)
    for (oy, ox), ramp in _grid(height, width, tile, stride, scale):
        total[oy:oy + out_tile_h, ox:ox + out_tile_w] += blend_weights(out_tile_h, out_tile_w, dtype, ramp=ramp)[0, 0]
    return total


@pytest.mark.parametrize("hw, tile, stride, scale", [
    ((100, 132), 64, 48, 1.0),
    ((77, 93), 32, 24, 1.0),  # last tiles pulled back: irregular overlaps
    ((40, 52), 16, 12, 8.0),
    ((320, 416), 128, 96, 1 / 8),
    ((40, 200), 64, 48, 1.0),  # one tile row
    ((1984, 2048), 512, 448, 1.0),  # the pipeline's pixel tiles at 4 MP
])
def test_separable_weight_sums_equal_the_two_d_sum(hw, tile, stride, scale):
    rows, cols = tiling.summed_weights(tile_starts(hw[0], tile, stride), tile_starts(hw[1], tile, stride),
                                       min(tile, hw[0]), min(tile, hw[1]), scale)
    torch.testing.assert_close(rows[:, None] * cols[None, :], _two_d_weight_sum(*hw, tile, stride, scale),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("fn, hw, tile, stride, scale", [
    (_box_blur, (100, 132), 64, 48, 1.0),
    (_decoder_like, (40, 52), 16, 12, 8.0),
    (_encoder_like, (320, 416), 128, 96, 1 / 8),
])
def test_tiled_apply_equals_blending_with_the_two_d_weight_sum(fn, hw, tile, stride, scale):
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(11))
    out_tile_h, out_tile_w = round(min(tile, hw[0]) * scale), round(min(tile, hw[1]) * scale)
    acc = torch.zeros(2, 3, round(hw[0] * scale), round(hw[1] * scale))
    for (oy, ox), ramp in _grid(*hw, tile, stride, scale):
        y0, x0 = round(oy / scale), round(ox / scale)
        out = fn(x[:, :, y0:y0 + min(tile, hw[0]), x0:x0 + min(tile, hw[1])])
        acc[:, :, oy:oy + out_tile_h, ox:ox + out_tile_w] += out * blend_weights(out_tile_h, out_tile_w, ramp=ramp)
    reference = acc / _two_d_weight_sum(*hw, tile, stride, scale, torch.float32)
    torch.testing.assert_close(tiled_apply(fn, [x], tile=tile, stride=stride, scale=scale), reference,
                               rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- tiles batched per call


def _recording(fn, calls: list[int]):
    def wrapped(*xs):
        calls.append(xs[0].shape[0])
        return fn(*xs)
    return wrapped


def test_tile_batch_stacks_a_rows_tiles_and_blends_them_to_the_same_result():
    """A 2-image input with 5 x 5 tiles: tile_batch 6 runs 3 tiles (6 batch rows) per call, so
    each tile row takes calls of 6, 4 (3 + 2 tiles x 2 images) and the result is the one of one
    tile per call. The fn is a 3x3 convolution, which sees each batch row alone."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 40, 40)
    one, batched = [], []
    with torch.no_grad():
        expected = tiled_apply(_recording(conv, one), [x], tile=16, stride=6)
        got = tiled_apply(_recording(conv, batched), [x], tile=16, stride=6, tile_batch=6)
    assert len(tiling.tile_starts(40, 16, 6)) == 5
    assert one == [2] * 25
    assert batched == [6, 4] * 5
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_tile_batch_keeps_a_pointwise_result_exact_and_never_splits_an_image():
    """tile_batch below the image count still runs whole tiles (all N images of one tile); a
    pointwise fn gives the exact bits of one tile at a time."""
    x = torch.rand(3, 2, 30, 30)
    calls: list[int] = []
    expected = tiled_apply(lambda t: t * 3 + 1, [x], tile=12, stride=9)
    got = tiled_apply(_recording(lambda t: t * 3 + 1, calls), [x], tile=12, stride=9, tile_batch=2)
    assert set(calls) == {3}
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="tile_batch"):
        tiled_apply(lambda t: t, [x], tile=12, stride=9, tile_batch=0)


def test_tile_batch_streams_the_same_rows_with_several_inputs():
    """tiled_rows with two inputs (the flow UNet's x_t and c_latent) stacks both the same way."""
    x, c = torch.rand(1, 2, 24, 40), torch.rand(1, 2, 24, 40)
    fn = lambda a, b: a * 2 - b  # noqa: E731
    one = list(tiling.tiled_rows(fn, [x, c], tile=8, stride=6))
    four = list(tiling.tiled_rows(fn, [x, c], tile=8, stride=6, tile_batch=4))
    assert [top for top, _ in one] == [top for top, _ in four]
    for (_, a), (_, b) in zip(one, four, strict=True):
        assert torch.equal(a, b)
