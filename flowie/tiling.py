"""Run a spatial network on overlapping tiles and blend the results without seams.

Used for images too large for one pass: the flow UNet on latent tiles (scale 1), the VAE
decoder on latent tiles (scale 8), the encoder on pixel tiles (scale 1/8), SwinIR (scale 1).

Blending: each tile's output is weighted by a raised-cosine (Hann) crossfade over the
overlap with each neighbour and weight 1 elsewhere; the weighted sum is divided by the summed
weights. Why this and not the official uniform average (``count``) or a Gaussian:
- a network's output is least trustworthy at a tile's border (zero padding, missing context);
  the crossfade gives the border pixel a weight of sin^2(pi / 4r) (about 0.0024 for an overlap
  r = 16) while the neighbour, whose interior covers that pixel, weighs about 1. A uniform
  average gives the bad border pixel half the say, which is the visible seam;
- the two ramps of a pair of neighbours cover exactly the same band and sin^2 + cos^2 = 1, so
  the weights already sum to one there: the division only corrects where more than two tiles
  or irregular overlaps meet;
- a tile side at the image border has no neighbour, so it is not ramped (weight 1): the
  weights stay far from zero everywhere (no 0/0 in fp16 corners, unlike a Gaussian window
  whose corner weights vanish).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from flowie.progress import report_tiles

ProgressFn = Callable[[int, int], None]


def needs_tiling(h: int, w: int, max_pixels: int) -> bool:
    """True when an h x w input (pixels of the stage's input) exceeds max_pixels."""
    if h <= 0 or w <= 0 or max_pixels <= 0:
        raise ValueError(f"sizes must be positive, got h={h}, w={w}, max_pixels={max_pixels}")
    return h * w > max_pixels


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size min(tile, length) covering [0, length).

    Tiles step by ``stride``; the last tile is moved back to end flush with ``length`` (so it
    may overlap its predecessor more). Same offsets as the official ``_sliding_windows`` for
    length >= tile; for length < tile one tile of the whole length.
    """
    if length <= 0 or tile <= 0 or stride <= 0:
        raise ValueError(f"length, tile and stride must be positive, got {length}, {tile}, {stride}")
    if stride > tile:
        raise ValueError(f"stride {stride} > tile {tile} would leave gaps between tiles")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _ramp_1d(n: int, ramp_lo: int, ramp_hi: int, dtype: torch.dtype, device: torch.device | str | None
             ) -> torch.Tensor:
    """[n] weights: sin^2 rise over the first ramp_lo samples, cos^2 fall over the last ramp_hi.

    Sampled at pixel centres, so every value is > 0 and a rise over r samples plus the mirrored
    fall over the same r samples sum to exactly 1 (up to rounding).
    """
    # Build in float64 so fp16 weights are one rounding away from the exact values.
    idx = torch.arange(n, dtype=torch.float64, device=device) + 0.5
    weight = torch.ones(n, dtype=torch.float64, device=device)
    if ramp_lo > 0:
        rise = torch.sin(math.pi / 2 * idx / ramp_lo) ** 2
        weight = torch.where(idx < ramp_lo, weight * rise, weight)
    if ramp_hi > 0:
        fall = torch.sin(math.pi / 2 * (n - idx) / ramp_hi) ** 2
        weight = torch.where(n - idx < ramp_hi, weight * fall, weight)
    return weight.to(dtype)


def blend_weights(tile_h: int, tile_w: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None,
                  ramp: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """[1, 1, tile_h, tile_w] blending weight of one tile, > 0 everywhere, max 1.

    ``ramp`` = (top, bottom, left, right) widths in pixels of the raised-cosine fall-off on each
    side, normally the overlap with the neighbour on that side (0 = no neighbour, flat).
    Default: half the tile on every side, i.e. a full Hann-like window.
    """
    if tile_h <= 0 or tile_w <= 0:
        raise ValueError(f"tile size must be positive, got {tile_h} x {tile_w}")
    if ramp is None:
        ramp = (tile_h // 2, tile_h // 2, tile_w // 2, tile_w // 2)
    top, bottom, left, right = (int(r) for r in ramp)
    if min(top, bottom, left, right) < 0 or max(top, bottom) > tile_h or max(left, right) > tile_w:
        raise ValueError(f"ramp {ramp} does not fit a {tile_h} x {tile_w} tile")
    w_h = _ramp_1d(tile_h, top, bottom, dtype, device)
    w_w = _ramp_1d(tile_w, left, right, dtype, device)
    return (w_h[:, None] * w_w[None, :]).view(1, 1, tile_h, tile_w)


def _scaled(n: int, scale: float, what: str) -> int:
    """n * scale as an int, or a ValueError when it is not whole (tiles would not line up)."""
    value = n * scale
    whole = round(value)
    if abs(value - whole) > 1e-6:
        raise ValueError(f"{what} = {n} times scale {scale} is not a whole number of output pixels; "
                         f"choose tile, stride and input size divisible by {1 / scale:g}")
    return int(whole)


def _overlaps(starts: list[int], size: int) -> list[tuple[int, int]]:
    """(overlap with previous tile, overlap with next tile) for each start, in input pixels."""
    result = []
    for i, start in enumerate(starts):
        before = starts[i - 1] + size - start if i > 0 else 0
        after = start + size - starts[i + 1] if i + 1 < len(starts) else 0
        result.append((before, after))
    return result


class TensorRows:
    """A row source over an NCHW tensor: what :func:`tiled_rows` reads its tiles from."""

    def __init__(self, x: torch.Tensor):
        if x.ndim != 4:
            raise ValueError(f"expected an NCHW tensor, got shape {tuple(x.shape)}")
        self.x = x
        self.shape = tuple(x.shape)

    def read(self, top: int, bottom: int, left: int = 0, right: int | None = None) -> torch.Tensor:
        return self.x[:, :, top:bottom, left:right]


class RowSource(Protocol):
    """Anything with an NCHW ``shape`` whose region [top, bottom) x [left, right) can be read.

    ``read`` may return a view; :func:`tiled_rows` makes each tile contiguous itself.
    """

    shape: tuple[int, ...]

    def read(self, top: int, bottom: int, left: int = 0, right: int | None = None) -> torch.Tensor: ...


def _as_source(x: torch.Tensor | RowSource) -> RowSource:
    return TensorRows(x) if isinstance(x, torch.Tensor) else x


def tiled_apply(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | RowSource], tile: int, stride: int,
                scale: float = 1.0, out_channels: int | None = None,
                progress: ProgressFn | None = None, tile_batch: int = 1) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``inputs`` and blend the outputs.

    inputs:  NCHW tensors (or row sources) with the same H, W (e.g. x_t and c_latent); cut into
             the same tiles.
    tile, stride: tile size and step in input pixels (a tile is min(tile, H) x min(tile, W)).
    fn(*tiles) -> [N, C, tile_h * scale, tile_w * scale]; scale 8 for a decoder on latents,
             1/8 for an encoder on pixels, 1 for the UNet or SwinIR.
    out_channels: if given, fn's channel count is checked against it.
    progress: called with (tiles done, tiles total) after each tile (default: flowie.progress's watcher).
    tile_batch: most batch rows per call of ``fn``: neighbouring tiles of a tile row go through
             it together, stacked on the batch axis (tile j's N images at rows [j*N, (j+1)*N));
             see :func:`tiled_rows`.
    Returns [N, C, H * scale, W * scale] in fn's output dtype.

    When one tile covers the input, returns ``fn(*inputs)`` itself (one call, no blending).
    Extra memory: the output, one band of tile rows being blended (float32 when fn returns
    fp16/bf16, for an accurate sum), and one tile's inputs and output. The output is assembled
    from :func:`tiled_rows`, so both give the same bits.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    sources = [_as_source(x) for x in inputs]
    _check_inputs(sources)
    height, width = sources[0].shape[-2:]
    if len(tile_starts(height, tile, stride)) * len(tile_starts(width, tile, stride)) == 1:
        # Exactly the untiled computation: the caller can switch tiling on without changing
        # results for inputs that fit (tiled_rows yields fn's own output; no copy).
        return next(tiled_rows(fn, sources, tile, stride, scale, out_channels, progress))[1]
    result: torch.Tensor | None = None
    for top, rows in tiled_rows(fn, sources, tile, stride, scale, out_channels, progress, tile_batch):
        if result is None:
            result = torch.empty((rows.shape[0], rows.shape[1], _scaled(height, scale, "height"), rows.shape[3]),
                                 dtype=rows.dtype, device=rows.device)
        result[:, :, top:top + rows.shape[2]] = rows
        del rows  # before the next tile row runs
    assert result is not None
    return result


def tiled_rows(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | RowSource], tile: int, stride: int,
               scale: float = 1.0, out_channels: int | None = None,
               progress: ProgressFn | None = None, tile_batch: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`tiled_apply`, streamed: yields (first output row, finished rows), top to bottom.

    Rows are yielded as soon as no later tile overlaps them, so only one band of tile rows is
    ever held: memory grows with the image's width, not its area. The tiles are visited and
    summed in the same order as a whole-image accumulator would sum them, so the rows are the
    same bits as :func:`tiled_apply`'s. Inputs are read one tile at a time (``read``), which lets
    a stage take its input from a :class:`flowie.rowstore.RowStore` rather than a tensor.

    ``tile_batch`` > 1 runs neighbouring tiles of a tile row together in one call of ``fn``,
    stacked on the batch axis, as many as keep the call's batch (tiles x N) within
    ``tile_batch``, one tile at least: a GPU runs a tile at batch 1 far below its throughput
    (the H200 ran the flow UNet 2.4x and SwinIR 1.6x faster per image at batch 4 than at 1). The
    outputs are blended in the same order as one at a time; a network treats each batch row
    alone, so only its kernels' batch-size-dependent rounding can differ. Working memory grows
    with ``tile_batch``, never with the image.
    """
    if len(inputs) == 0:
        raise ValueError("tiled_rows needs at least one input")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be at least 1, got {tile_batch}")
    progress = progress or report_tiles  # by default the call's watcher (flowie.progress), if any
    sources = [_as_source(x) for x in inputs]
    _check_inputs(sources)
    batch = sources[0].shape[0]
    height, width = sources[0].shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    starts_h = tile_starts(height, tile, stride)
    starts_w = tile_starts(width, tile, stride)
    total = len(starts_h) * len(starts_w)
    out_h, out_w = _scaled(height, scale, "height"), _scaled(width, scale, "width")
    if total == 1:
        # One tile: fn on the input as it is, as tiled_apply does (same memory layout, same bits).
        out = fn(*[s.read(0, height) for s in sources])
        _check_out(out, batch, out_h, out_w, out_channels)
        if progress is not None:
            progress(1, 1)
        yield 0, out
        return
    out_tile_h, out_tile_w = _scaled(tile_h, scale, "tile height"), _scaled(tile_w, scale, "tile width")
    overlaps_h, overlaps_w = _overlaps(starts_h, tile_h), _overlaps(starts_w, tile_w)
    # The summed weights factor into rows x cols (see summed_weights): each finished band is
    # divided by its slice of each, in place.
    row_sums, col_sums = summed_weights(starts_h, starts_w, tile_h, tile_w, scale)

    band: torch.Tensor | None = None  # weighted sums of output rows [band_top, band_top + band rows)
    band_top = 0
    carry: torch.Tensor | None = None  # the finished band's rows that the next tile row overlaps
    out_dtype: torch.dtype | None = None
    weights: dict[tuple[int, int, int, int], torch.Tensor] = {}
    done = 0

    def finish(rows: torch.Tensor, top: int) -> torch.Tensor:
        assert out_dtype is not None
        n = rows.shape[2]
        rows.div_(row_sums[top:top + n].to(rows.device, rows.dtype).view(1, 1, -1, 1))
        rows.div_(col_sums.to(rows.device, rows.dtype).view(1, 1, 1, -1))
        return rows.to(out_dtype)

    for y0, (top, bottom) in zip(starts_h, overlaps_h, strict=True):
        oy = _scaled(y0, scale, "tile start")
        if band is not None:
            # Rows above this tile row's first output row get no more contributions. Keep only the
            # overlap (a copy), so the finished band is freed once its consumer lets go of it,
            # before the next tile runs: the network's working memory never meets two bands.
            carry = band[:, :, oy - band_top:].clone()
            done_rows, band = band[:, :, : oy - band_top], None
            yield band_top, finish(done_rows, band_top)
            del done_rows
        row_tiles = list(zip(starts_w, overlaps_w, strict=True))
        per_call = max(1, tile_batch // batch)
        for first in range(0, len(row_tiles), per_call):
            group = row_tiles[first:first + per_call]
            # Read tile by tile, as contiguous copies: engines (ONNX Runtime, TensorRT) need dense
            # tensors, and nothing wider than a tile (or a group of them) is read or converted.
            tiles = [[s.read(y0, y0 + tile_h, x0, x0 + tile_w).contiguous() for x0, _ in group] for s in sources]
            stacked = [per_source[0] if len(group) == 1 else torch.cat(per_source) for per_source in tiles]
            del tiles
            outs = fn(*stacked)
            del stacked
            _check_out(outs, batch * len(group), out_tile_h, out_tile_w, out_channels)
            for j, (x0, (left, right)) in enumerate(group):
                out = outs if len(group) == 1 else outs[j * batch:(j + 1) * batch]
                if out_dtype is None:
                    out_dtype = out.dtype
                if band is None:
                    # Start this tile row's band, with the rows the previous band shares with it.
                    acc_dtype = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
                    band = torch.zeros((batch, out.shape[1], out_tile_h, out_w), dtype=acc_dtype, device=out.device)
                    if carry is not None:
                        band[:, :, : carry.shape[2]] = carry
                    band_top, carry = oy, None
                ramp = (_scaled(top, scale, "tile overlap"), _scaled(bottom, scale, "tile overlap"),
                        _scaled(left, scale, "tile overlap"), _scaled(right, scale, "tile overlap"))
                if ramp not in weights:
                    # Only a handful of distinct ramps exist (border, interior, last tile), so cache.
                    weights[ramp] = blend_weights(out_tile_h, out_tile_w, band.dtype, band.device, ramp=ramp)
                ox = _scaled(x0, scale, "tile start")
                band[:, :, :, ox:ox + out_tile_w].addcmul_(out.to(band.dtype), weights[ramp])
                del out
                done += 1
                if progress is not None:
                    progress(done, total)
            del outs
    assert band is not None and band_top + band.shape[2] == out_h
    yield band_top, finish(band, band_top)


def _check_inputs(sources: Sequence[RowSource]) -> None:
    if len(sources) == 0:
        raise ValueError("tiled_apply needs at least one input")
    for i, x in enumerate(sources):
        if len(x.shape) != 4:
            raise ValueError(f"input {i} must be NCHW, got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != tuple(sources[0].shape[-2:]):
            raise ValueError(f"all inputs must share H, W: input 0 is {tuple(sources[0].shape)}, "
                             f"input {i} is {tuple(x.shape)}")


def summed_weights(starts_h: list[int], starts_w: list[int], tile_h: int, tile_w: int, scale: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed blend weights of a tile grid as two float64 vectors: rows [H*scale], cols [W*scale].

    Tile (i, j)'s weight (:func:`blend_weights`) is the outer product of a row ramp that depends
    only on the grid row (its top and bottom overlaps) and a column ramp that depends only on the
    grid column, and the tiles form a product grid, so the sum over all tiles factors:
    sum_ij row_i(y) col_j(x) = (sum_i row_i(y)) (sum_j col_j(x)). The image-sized sum is
    ``rows[:, None] * cols[None, :]``, but it is never built: that would be a buffer of a third
    of the output image (RGB float32) per tiled stage.
    """
    def summed(starts: list[int], size: int, axis: int) -> torch.Tensor:
        out_size = _scaled(size, scale, "tile size")
        total = torch.zeros(_scaled(starts[-1], scale, "tile start") + out_size, dtype=torch.float64)
        for start, (before, after) in zip(starts, _overlaps(starts, size), strict=True):
            ramp = (_scaled(before, scale, "tile overlap"), _scaled(after, scale, "tile overlap"))
            # A one-pixel-wide tile's weight is the one factor along the other axis.
            if axis == 0:
                factor = blend_weights(out_size, 1, torch.float64, ramp=(*ramp, 0, 0))
            else:
                factor = blend_weights(1, out_size, torch.float64, ramp=(0, 0, *ramp))
            at = _scaled(start, scale, "tile start")
            total[at:at + out_size] += factor.view(-1)
        return total

    return summed(starts_h, tile_h, 0), summed(starts_w, tile_w, 1)


def _check_out(out: torch.Tensor, batch: int, h: int, w: int, channels: int | None) -> None:
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise ValueError(f"fn must return an NCHW tensor, got {getattr(out, 'shape', type(out))}")
    if out.shape[0] != batch or out.shape[-2:] != (h, w):
        raise ValueError(f"fn returned {tuple(out.shape)}; expected batch {batch} and spatial size "
                         f"({h}, {w}) = tile x scale")
    if channels is not None and out.shape[1] != channels:
        raise ValueError(f"fn returned {out.shape[1]} channels, expected out_channels={channels}")
