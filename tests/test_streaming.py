"""The streamed path for large images: tile rows, the row store, the streamed colour fix, and
``Pipeline.run_streamed``. Its promise is the same bits as the whole-image computation with
nothing image-sized held in float, so every test here compares exactly (``torch.equal``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engines import build_pipeline
from flowie import imageops, tiling
from flowie.colorfix import WAVELET_HALO, wavelet_color_fix, wavelet_fix_rows
from flowie.modeldir import ModelInfo
from flowie.params import EnhanceParams
from flowie.pipeline import Pipeline, PipelineOptions
from flowie.rowstore import RowStore


def _conv_net(scale: float):
    """A small conv net with zero padding (tile borders differ from the whole image) at scale 1, 8 or 1/8."""
    gen = torch.Generator().manual_seed(5)
    kernel = torch.randn(4, 3, 3, 3, generator=gen) * 0.2

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, kernel, padding=1)[:, :3]
        if scale > 1:
            y = F.interpolate(y, scale_factor=int(scale), mode="nearest")
        elif scale < 1:
            y = F.avg_pool2d(y, round(1 / scale))
        return torch.tanh(y)

    return fn


def _whole_accumulator(fn, x, tile, stride, scale):
    """The blend as a whole-image accumulator: every tile in row-major order, then the division."""
    h, w = x.shape[-2:]
    starts_h, starts_w = tiling.tile_starts(h, tile, stride), tiling.tile_starts(w, tile, stride)
    th, tw = min(tile, h), min(tile, w)
    oth, otw = round(th * scale), round(tw * scale)
    acc = torch.zeros(x.shape[0], 3, round(h * scale), round(w * scale))
    for y0, (top, bottom) in zip(starts_h, tiling._overlaps(starts_h, th), strict=True):
        for x0, (left, right) in zip(starts_w, tiling._overlaps(starts_w, tw), strict=True):
            out = fn(x[:, :, y0:y0 + th, x0:x0 + tw].contiguous())
            ramp = tuple(round(v * scale) for v in (top, bottom, left, right))
            oy, ox = round(y0 * scale), round(x0 * scale)
            acc[:, :, oy:oy + oth, ox:ox + otw].addcmul_(out, tiling.blend_weights(oth, otw, ramp=ramp))
    rows, cols = tiling.summed_weights(starts_h, starts_w, th, tw, scale)
    return acc.div_(rows.float().view(1, 1, -1, 1)).div_(cols.float().view(1, 1, 1, -1))


CASES = [((100, 132), 64, 48, 1.0), ((77, 93), 32, 24, 1.0), ((40, 52), 16, 12, 8.0), ((320, 416), 128, 96, 1 / 8),
         ((40, 200), 64, 48, 1.0)]


@pytest.mark.parametrize("hw, tile, stride, scale", CASES)
def test_tiled_rows_are_the_bits_of_a_whole_image_accumulator(hw, tile, stride, scale):
    fn = _conv_net(scale)
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    blocks = list(tiling.tiled_rows(fn, [x], tile, stride, scale))
    tops = [top for top, _ in blocks]
    assert tops == sorted(tops) and tops[0] == 0
    for (top, rows), (nxt, _) in zip(blocks, blocks[1:], strict=False):
        assert top + rows.shape[2] == nxt  # no gap, no overlap
    streamed = torch.cat([rows for _, rows in blocks], dim=2)
    reference = _whole_accumulator(fn, x, tile, stride, scale)
    assert torch.equal(streamed, reference)
    assert torch.equal(tiling.tiled_apply(fn, [x], tile, stride, scale), reference)


def test_tiled_rows_hands_over_rows_before_the_last_tile_row_runs():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    x = torch.rand(1, 3, 200, 64)
    seen = [(top, rows.shape[2], len(calls)) for top, rows in tiling.tiled_rows(fn, [x], 64, 48)]
    starts = tiling.tile_starts(200, 64, 48)  # one tile per row: 0, 48, 96, 136
    assert len(seen) == len(starts)
    # Block k (rows up to the next tile row's start) is out after k + 1 tile rows, not at the end.
    assert [n for _, _, n in seen] == list(range(1, len(starts) + 1))
    assert seen[0][:2] == (0, 48)


class _CountingRows:
    """A row source that records which rows were read."""

    def __init__(self, x):
        self.x, self.shape, self.reads = x, tuple(x.shape), []

    def read(self, top, bottom, left=0, right=None):
        self.reads.append((top, bottom, left, right))
        return self.x[:, :, top:bottom, left:right]


def test_a_row_source_is_read_one_tile_at_a_time_and_gives_the_same_result():
    x = torch.rand(1, 3, 100, 132, generator=torch.Generator().manual_seed(2))
    source = _CountingRows(x)
    fn = _conv_net(1.0)
    assert torch.equal(tiling.tiled_apply(fn, [source], 64, 48), tiling.tiled_apply(fn, [x], 64, 48))
    assert source.reads == [(y, y + 64, x, x + 64) for y in tiling.tile_starts(100, 64, 48)
                            for x in tiling.tile_starts(132, 64, 48)]


@pytest.mark.parametrize("spill", [False, True])
def test_row_store_gives_back_the_rows_written(tmp_path, spill):
    x = torch.randn(1, 3, 50, 17, generator=torch.Generator().manual_seed(3))
    with RowStore(3, 50, 17, tmp_path if spill else None) as store:
        assert store.spilled == spill
        for top in range(0, 50, 12):
            store.write(top, x[:, :, top:top + 12])
        assert torch.equal(store.read(0, 50), x)
        assert torch.equal(store.read(7, 31), x[:, :, 7:31])
        assert store.read(7, 31).is_contiguous()
        assert torch.equal(store.read(7, 31, 3, 11), x[:, :, 7:31, 3:11])
        assert store.read(7, 31, 3, 11).is_contiguous()
        # The spill file is unlinked at once: nothing is left behind in the directory.
        assert list(tmp_path.iterdir()) == []


def test_row_store_refuses_out_of_order_writes_unwritten_reads_and_a_missing_directory(tmp_path):
    store = RowStore(3, 10, 4)
    with pytest.raises(ValueError, match="in order"):
        store.write(2, torch.zeros(1, 3, 2, 4))
    store.write(0, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="not stored"):
        store.read(0, 5)
    with pytest.raises(ValueError, match="columns"):
        store.read(0, 4, 2, 5)
    with pytest.raises(ValueError, match="shape"):
        store.write(4, torch.zeros(1, 3, 2, 5))
    with pytest.raises(ValueError, match="past the height"):
        store.write(4, torch.zeros(1, 3, 7, 4))
    with pytest.raises(ValueError, match="does not exist"):
        RowStore(3, 10, 4, tmp_path / "missing")


@pytest.mark.parametrize("cuts, band_pixels", [
    ([70, 75, 200], 64 * 40),  # blocks shorter and longer than the halo, small bands
    ([150], 1 << 19),  # two blocks, one band each
    ([WAVELET_HALO, 2 * WAVELET_HALO + 1], 64 * 40),  # blocks exactly at the halo
])
def test_streamed_wavelet_fix_is_the_whole_image_fix_bit_for_bit(cuts, band_pixels):
    gen = torch.Generator().manual_seed(4)
    content, style = torch.rand(1, 3, 300, 40, generator=gen), torch.rand(1, 3, 300, 40, generator=gen)
    edges = [0, *cuts, 300]
    blocks = [(a, content[:, :, a:b]) for a, b in zip(edges, edges[1:], strict=False)]
    out = list(wavelet_fix_rows(iter(blocks), lambda a, b: style[:, :, a:b], 300, band_pixels))
    assert torch.equal(torch.cat([rows for _, rows in out], dim=2), wavelet_color_fix(content, style))


def test_streamed_wavelet_fix_refuses_missing_rows():
    content = torch.rand(1, 3, 100, 8)
    style = torch.rand(1, 3, 100, 8)
    with pytest.raises(ValueError, match="in order"):
        list(wavelet_fix_rows(iter([(0, content[:, :, :40]), (50, content[:, :, 50:])]),
                              lambda a, b: style[:, :, a:b], 100))
    with pytest.raises(ValueError, match="expected 100 rows"):
        list(wavelet_fix_rows(iter([(0, content[:, :, :60])]), lambda a, b: style[:, :, a:b], 100))


# --------------------------------------------------------------------------------------------
# the pipeline


@pytest.fixture(scope="module")
def small_tile_pipe(tiny_model_dir):
    """The tiny model with tiling from 64x64 pixels on and 8-latent decoder tiles (fast, many tiles)."""
    base = build_pipeline(tiny_model_dir)
    tiles = {"latent_tile": 16, "latent_stride": 12, "max_untiled_pixels": 64 * 64, "decoder_latent_tile": 8,
             "decoder_latent_stride": 6}
    # One tile per call: the reference the batched-tile tests compare with.
    return Pipeline(ModelInfo(path=base.info.path, meta={**base.info.meta, "tiling": tiles}), base.stages,
                    base.null_context, options=PipelineOptions(tile_batch=1))


def _image(h, w, seed=0):
    y, x = np.mgrid[0:h, 0:w]
    base = 0.5 + 0.3 * np.sin(x / 23.0)[..., None] * np.cos(y / 31.0)[..., None] * np.array([1.0, 0.7, 0.4])
    noise = np.random.default_rng(seed).normal(0, 6, base.shape)
    return np.clip(base * 255 + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("sampler, color_fix, spill", [
    ("one_step", "wavelet", False),
    ("one_step", "none", True),
    ("mean_value", "wavelet", True),
    ("restore_only", "wavelet", False),
])
def test_run_streamed_gives_the_bits_of_run_batch(small_tile_pipe, tmp_path, sampler, color_fix, spill):
    # 576 rows: SwinIR and the cond encoder run on two 512-px tile rows, the decoder on many.
    work = _image(576, 128)
    params = EnhanceParams(sampler=sampler, color_fix=color_fix, upscale=1.0, min_side=0, tile="auto")
    reference = small_tile_pipe.run_batch(imageops.images_to_tensor([work]), params, seeds=[9])
    pipe = small_tile_pipe.with_options(spill_dir=str(tmp_path) if spill else None)
    streamed = pipe.run_streamed(work, params, seed=9, keep_restored=True)
    assert np.array_equal(streamed.image, imageops.tensor_to_uint8(reference.image)[0])
    assert np.array_equal(streamed.restored, imageops.tensor_to_uint8(reference.restored)[0])
    if reference.latent is not None:
        assert torch.equal(streamed.latent, reference.latent)
    assert os.listdir(tmp_path) == []


def test_enhance_streams_a_lone_tiled_image_and_batches_the_rest(small_tile_pipe, monkeypatch):
    params = EnhanceParams(sampler="one_step", color_fix="wavelet", upscale=1.0, min_side=0, tile="auto")
    image = _image(200, 130)
    assert small_tile_pipe.streams(small_tile_pipe.padded_shape(200, 130, params), params)
    assert not small_tile_pipe.streams((64, 64), params)  # fits untiled
    adain = EnhanceParams(sampler="one_step", color_fix="adain", upscale=1.0, min_side=0, tile="auto")
    assert not small_tile_pipe.streams((256, 192), adain)  # AdaIN needs the whole image first
    calls = []
    original = small_tile_pipe.run_streamed
    monkeypatch.setattr(small_tile_pipe, "run_streamed", lambda *a, **k: calls.append(1) or original(*a, **k))
    streamed = small_tile_pipe.enhance([image], params, seeds=[2])[0]
    assert calls == [1]
    # The reference: the same image through run_batch, cropped like enhance crops.
    plan = small_tile_pipe.plan(200, 130, params)
    batch = small_tile_pipe.run_batch(imageops.images_to_tensor([imageops.prepare(image, plan)]), params, seeds=[2])
    assert np.array_equal(streamed.image, imageops.finish(imageops.tensor_to_uint8(batch.image)[0], plan))
    assert np.array_equal(streamed.restored, imageops.finish(imageops.tensor_to_uint8(batch.restored)[0], plan))
    # Two images of one size make a batch, which runs through run_batch, not the streamed path.
    small_tile_pipe.enhance([image, image], params, seeds=[2, 2])
    assert calls == [1]
    assert streamed.image.shape == (200, 130, 3)


def test_run_streamed_refuses_what_it_cannot_stream(small_tile_pipe):
    params = EnhanceParams(sampler="one_step", color_fix="adain", upscale=1.0, min_side=0, tile="auto")
    with pytest.raises(ValueError, match="adain"):
        small_tile_pipe.run_streamed(_image(128, 128), params, seed=1)
    ok = EnhanceParams(sampler="one_step", color_fix="none", upscale=1.0, min_side=0, tile="auto")
    with pytest.raises(ValueError, match="multiples of 64"):
        small_tile_pipe.run_streamed(_image(100, 128), ok, seed=1)
    with pytest.raises(ValueError, match="uint8"):
        small_tile_pipe.run_streamed(_image(128, 128).astype(np.float32), ok, seed=1)


def test_spill_auto_spills_outputs_over_16_mib_on_the_cpu_only(tmp_path):
    import tempfile

    from engines import EngineConfig

    def spill(setting, device):
        config = EngineConfig.for_device(device, spill_dir=setting)
        return config.spill_dir, config.spill_min_bytes

    assert spill("auto", "cpu") == (tempfile.gettempdir(), 16 * 1024 * 1024)
    assert spill("", "cpu") == (tempfile.gettempdir(), 16 * 1024 * 1024)
    assert spill("auto", "cuda:0") == (None, 0)  # host RAM is off the card already
    assert spill("off", "cpu") == (None, 0)
    assert spill(str(tmp_path), "cuda") == (str(tmp_path), 0)
    with pytest.raises(ValueError, match="does not exist"):
        spill(str(tmp_path / "missing"), "cpu")


def test_run_streamed_spills_only_stores_above_the_threshold(small_tile_pipe, tmp_path, monkeypatch):
    import flowie.pipeline as pipeline_module

    opened = []

    class SeenRowStore(RowStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self.spilled)

    monkeypatch.setattr(pipeline_module, "RowStore", SeenRowStore)
    params = EnhanceParams(sampler="restore_only", color_fix="none", upscale=1.0, min_side=0, tile="auto")
    work = _image(128, 128)  # a 196,608-byte float32 store
    small_tile_pipe.with_options(spill_dir=str(tmp_path), spill_min_bytes=12 * 128 * 128 + 1).run_streamed(
        work, params, seed=1)
    small_tile_pipe.with_options(spill_dir=str(tmp_path), spill_min_bytes=12 * 128 * 128).run_streamed(
        work, params, seed=1)
    assert opened == [False, True]


@pytest.mark.parametrize("hw", [(200, 130), (60, 60)])  # streamed (tiles), batch path (fits untiled)
def test_enhance_can_skip_the_stage_one_image_without_changing_the_result(small_tile_pipe, hw):
    params = EnhanceParams(sampler="one_step", color_fix="wavelet", upscale=1.0, min_side=0, tile="auto")
    image = _image(*hw)
    kept = small_tile_pipe.enhance([image], params, seeds=[5])[0]
    skipped = small_tile_pipe.enhance([image], params, seeds=[5], keep_restored=False)[0]
    assert kept.restored is not None and kept.restored.shape == (*hw, 3)
    assert skipped.restored is None
    assert np.array_equal(skipped.image, kept.image)


@pytest.fixture()
def batched_tiles(small_tile_pipe):
    return small_tile_pipe.with_options(tile_batch=4)


def test_tiles_batched_per_call_give_the_result_of_one_at_a_time(small_tile_pipe):
    """Two tiled images (N = 2) with tile_batch 4: two tiles per call in every stage, and the flow
    UNet's time and context repeated per stacked tile. Same images as one tile per call, up to the
    kernels' batch-size rounding."""
    params = EnhanceParams(sampler="mean_value", color_fix="wavelet", upscale=1.0, min_side=0, tile="auto")
    lq = imageops.images_to_tensor([_image(128, 256, 1), _image(128, 256, 2)])
    one = small_tile_pipe.run_batch(lq, params, seeds=[3, 4])
    seen: list[int] = []
    unet = small_tile_pipe.stages["flow_unet"]
    small_tile_pipe.stages["flow_unet"] = lambda *xs: seen.append(xs[0].shape[0]) or unet(*xs)
    try:
        batched = small_tile_pipe.with_options(tile_batch=4).run_batch(lq, params, seeds=[3, 4])
    finally:
        small_tile_pipe.stages["flow_unet"] = unet
    assert 4 in seen and max(seen) == 4
    torch.testing.assert_close(batched.image, one.image, rtol=0, atol=1e-4)
    torch.testing.assert_close(batched.latent, one.latent, rtol=0, atol=1e-4)


def test_run_streamed_gives_the_bits_of_run_batch_with_tiles_batched(batched_tiles):
    work = _image(576, 128)
    params = EnhanceParams(sampler="mean_value", color_fix="wavelet", upscale=1.0, min_side=0, tile="auto")
    reference = batched_tiles.run_batch(imageops.images_to_tensor([work]), params, seeds=[9])
    streamed = batched_tiles.run_streamed(work, params, seed=9, keep_restored=True)
    assert np.array_equal(streamed.image, imageops.tensor_to_uint8(reference.image)[0])
    assert torch.equal(streamed.latent, reference.latent)


def test_auto_tiles_per_call_fill_one_official_tile_on_the_cpu(small_tile_pipe):
    """tile_batch 0 (the CPU's default): official 512-pixel tiles stay one per call (the CPU memory
    record's setting); smaller tiles are stacked up to the same area. This pipe's 16-latent UNet
    tiles (128 px) go 16 batch rows per call (a tile row here has fewer), its 8-latent decoder
    tiles (64 px) 64; the images are those of one tile per call up to the kernels' rounding."""
    params = EnhanceParams(sampler="mean_value", color_fix="wavelet", upscale=1.0, min_side=0, tile="auto")
    lq = imageops.images_to_tensor([_image(128, 448, 1)])
    one = small_tile_pipe.run_batch(lq, params, seeds=[3])
    calls: dict[str, list[int]] = {"flow_unet": [], "vae_decoder": []}
    originals = dict(small_tile_pipe.stages)
    for name, seen in calls.items():
        small_tile_pipe.stages[name] = lambda *xs, _f=originals[name], _s=seen: _s.append(xs[0].shape[0]) or _f(*xs)
    by_area = small_tile_pipe.with_options(tile_batch=0)
    try:
        assert [by_area.tiles_per_call(px) for px in (512, 1024, 256, 128, 64)] == [1, 1, 4, 16, 64]
        auto = by_area.run_batch(lq, params, seeds=[3])
    finally:
        small_tile_pipe.stages.update(originals)
    row_unet = len(tiling.tile_starts(448 // 8, 16, 12))  # every UNet tile of a row in one call
    row_decoder = len(tiling.tile_starts(448 // 8, 8, 6))
    assert max(calls["flow_unet"]) == row_unet > 1 and max(calls["vae_decoder"]) == row_decoder > 1
    torch.testing.assert_close(auto.image, one.image, rtol=0, atol=1e-4)
    assert small_tile_pipe.with_options(tile_batch=7).tiles_per_call(512) == 7  # a number set is used as it is
