"""Pipeline behaviour on the tiny converted model: sizes, seeds, tiling, CLI reproduction."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from engines import build_pipeline
from flowie import colorfix, samplers, tiling
from flowie.params import EnhanceParams, ParamError
from flowie.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return build_pipeline(tiny_model_dir)


@pytest.fixture(scope="module")
def lq(fixture_dir):
    return np.load(fixture_dir / "inputs" / "lq.npy")


def test_output_has_the_requested_size(pipe, lq):
    crop = lq[0, :100, :70]
    out = pipe.enhance([crop], EnhanceParams(upscale=1.5, min_side=128, sampler="one_step", seed=1))[0]
    assert out.image.shape == (150, 105, 3) and out.image.dtype == np.uint8
    assert out.restored.shape == (150, 105, 3)
    assert set(out.timings) >= {"swinir", "cond_encoder", "flow_unet", "vae_decoder", "total"}


def test_same_seed_same_image_other_seed_other_image(pipe, lq):
    params = EnhanceParams(min_side=0, sampler="mean_value", color_fix="none")
    a = pipe.enhance([lq[0]], params, seeds=[5])[0]
    b = pipe.enhance([lq[0]], params, seeds=[5])[0]
    c = pipe.enhance([lq[0]], params, seeds=[6])[0]
    assert a.seed == 5 and np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def test_batch_result_equals_single_results(pipe, lq):
    params = EnhanceParams(min_side=0, sampler="one_step", color_fix="wavelet")
    both = pipe.enhance(list(lq), params, seeds=[1, 2])
    one = pipe.enhance([lq[1]], params, seeds=[2])[0]
    diff = np.abs(both[1].image.astype(int) - one.image.astype(int))
    assert diff.max() <= 1


def test_random_seed_is_reported(pipe, lq):
    out = pipe.enhance([lq[0]], EnhanceParams(min_side=0, sampler="restore_only"))[0]
    assert isinstance(out.seed, int) and out.seed >= 0


def test_mixed_sizes_are_grouped_and_returned_in_order(pipe, lq):
    images = [lq[0], lq[1, :64, :64], lq[0, :128, :64]]
    outs = pipe.enhance(images, EnhanceParams(min_side=0, sampler="restore_only"))
    assert [o.image.shape[:2] for o in outs] == [(128, 128), (64, 64), (128, 64)]


def test_bad_params_are_refused(pipe, lq):
    with pytest.raises(ParamError):
        pipe.enhance([lq[0]], EnhanceParams(steps=0))
    with pytest.raises(ParamError):
        pipe.enhance([lq[0]], EnhanceParams(sampler="ddim"))


def test_one_tile_covering_the_image_equals_untiled(pipe, lq):
    lq_t = torch.tensor(lq / 255.0, dtype=torch.float32).permute(0, 3, 1, 2)
    params = EnhanceParams(sampler="mean_value", color_fix="wavelet", upscale=1.0, min_side=0)
    off = pipe.run_batch(lq_t, params.__class__(**{**params.__dict__, "tile": "off"}), seeds=[1, 2])
    on = pipe.run_batch(lq_t, params.__class__(**{**params.__dict__, "tile": "on"}), seeds=[1, 2])
    torch.testing.assert_close(on.image, off.image, rtol=0, atol=0)


def test_tiled_large_image_has_no_visible_seams(pipe):
    """A 576x704 image in overlapping tiles (2 x 2): the jump across tile borders is like anywhere else."""
    gen = np.random.default_rng(0)
    # A smooth image (no real edges), so any seam would stand out.
    y, x = np.mgrid[0:576, 0:704]
    base = 0.5 + 0.25 * np.sin(x / 70.0)[..., None] * np.cos(y / 90.0)[..., None] * np.array([1.0, 0.8, 0.6])
    img = np.clip(base * 255 + gen.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
    lq_t = torch.tensor(img[None] / 255.0, dtype=torch.float32).permute(0, 3, 1, 2)
    out = pipe.run_batch(lq_t, EnhanceParams(sampler="one_step", color_fix="wavelet", upscale=1.0, min_side=0,
                                             tile="on"), seeds=[3]).image[0]
    col_jump = (out[:, :, 1:] - out[:, :, :-1]).abs().mean(dim=(0, 1))  # [W-1]
    # Pixel columns where a latent tile (64 latent = 512 px, stride 56 = 448 px) starts or ends.
    starts = tiling.tile_starts(704 // 8, 64, 56)
    borders = sorted({s * 8 for s in starts[1:]} | {(s + 64) * 8 for s in starts[:-1]})
    at_borders = torch.stack([col_jump[b - 1] for b in borders]).mean()
    assert float(at_borders) < 1.5 * float(col_jump.mean()), (float(at_borders), float(col_jump.mean()))


def test_cli_convert_and_enhance_reproduce_the_fixture(tiny_model_dir, fixture_dir, tmp_path):
    from service.cli import main

    x_T = fixture_dir / "inputs" / "x_T.npy"
    inputs = sorted((fixture_dir / "inputs").glob("lq_*.png"))
    rc = main(["enhance", *map(str, inputs), "-o", str(tmp_path), "--model", str(tiny_model_dir),
               "--noise", str(x_T), "--min-side", "0", "--upscale", "1", "--sampler", "mean_value",
               "--steps", "5", "--color-fix", "wavelet"])
    assert rc == 0
    expected = np.load(fixture_dir / "expected" / "meanvalue_wavelet_uint8.npy")
    for i, path in enumerate(inputs):
        ours = np.asarray(Image.open(tmp_path / f"{path.stem}.png"))
        diff = np.abs(ours.astype(int) - expected[i].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.001


def test_enhance_without_a_model_says_what_to_do(tmp_path, capsys, monkeypatch, fixture_dir):
    import flowie.modeldir as modeldir
    from service.cli import main

    monkeypatch.setattr(modeldir, "DEMO_MODEL_DIR", tmp_path / "no-demo")
    rc = main(["enhance", str(fixture_dir / "inputs" / "lq_0.png"), "-o", str(tmp_path)])
    assert rc == 2
    assert "flowie convert" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--engine-overrides", "channels_last=nhwc"], "engine override channels_last='nhwc' names no stage"),
    (["--engine-overrides", "tile_batch=-1"], "engine override tile_batch='-1' is not a whole number from 0 to 64"),
    (["--engine-overrides", "cuda_graphs=on"], "cuda_graphs=on needs a CUDA device"),
    (["--backend", "onnx"], "flowie export --model"),  # a model never exported: one sentence, no traceback
])
def test_enhance_refuses_bad_engine_settings_with_one_sentence(tiny_model_dir, fixture_dir, tmp_path, capsys, args, says):
    from service.cli import main

    rc = main(["enhance", str(fixture_dir / "inputs" / "lq_0.png"), "-o", str(tmp_path / "out"),
               "--model", str(tiny_model_dir), *args])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("kind", ["wavelet", "adain"])
def test_colour_fix_in_place_changes_only_the_decoded_image(pipe, kind):
    """run_batch fixes the colours in place into the decoded image: the SwinIR output it returns
    (and reads as the style) stays as it was, and the result is the out-of-place fix's, bit for bit.
    576 x 128 px, so the tiled paths (tile accumulators) are the buffers written into."""
    lq_t = torch.rand(1, 3, 576, 128, generator=torch.Generator().manual_seed(4))
    params = EnhanceParams(sampler="one_step", upscale=1.0, min_side=0, tile="on")
    raw = pipe.run_batch(lq_t, EnhanceParams(**{**params.__dict__, "color_fix": "none"}), seeds=[7])
    fixed = pipe.run_batch(lq_t, EnhanceParams(**{**params.__dict__, "color_fix": kind}), seeds=[7])
    restore_only = pipe.run_batch(lq_t, EnhanceParams(**{**params.__dict__, "sampler": "restore_only"}), seeds=[7])
    assert torch.equal(fixed.restored, restore_only.image) and torch.equal(raw.restored, restore_only.image)
    assert fixed.image.data_ptr() != fixed.restored.data_ptr()
    assert torch.equal(fixed.image, colorfix.color_fix(kind, raw.image, raw.restored))


def _with_tiling(pipe: Pipeline, **tiling_cfg) -> Pipeline:
    from flowie.modeldir import ModelInfo

    info = ModelInfo(path=pipe.info.path, meta={**pipe.info.meta, "tiling": tiling_cfg})
    return Pipeline(info, pipe.stages, pipe.null_context)


def test_the_decoder_uses_its_own_tiles_when_the_model_declares_them(pipe, lq):
    """One UNet tile covers the 16x16 latent; the decoder tiles as declared: by default like the
    UNet (one tile, i.e. the untiled decode), with its own 8-latent tiles a blend of those."""
    lq_t = torch.tensor(lq[:1] / 255.0, dtype=torch.float32).permute(0, 3, 1, 2)
    params = EnhanceParams(sampler="one_step", color_fix="none", upscale=1.0, min_side=0, tile="auto")
    whole_tile = {"latent_tile": 16, "latent_stride": 12, "max_untiled_pixels": 64 * 64}
    shared = _with_tiling(pipe, **whole_tile).run_batch(lq_t, params, seeds=[4])
    own = _with_tiling(pipe, **whole_tile, decoder_latent_tile=8, decoder_latent_stride=6).run_batch(lq_t, params,
                                                                                                   seeds=[4])
    torch.testing.assert_close(own.latent, shared.latent, rtol=0, atol=0)  # the UNet ran alike
    with torch.inference_mode():
        whole = pipe.stages["vae_decoder"](own.latent)
    torch.testing.assert_close(shared.image, whole, rtol=0, atol=0)
    assert not torch.equal(own.image, whole)  # 8-latent decoder tiles blend to something else


def test_swinir_and_the_cond_encoder_use_the_models_pixel_tiles(pipe):
    """576 x 128 px with latent tiling forced: the official 512 px pixel tiles cut the height in two
    and blend; a model's own 576 px tile covers it, which is the untiled SwinIR and encoder exactly."""
    lq_t = torch.rand(1, 3, 576, 128, generator=torch.Generator().manual_seed(5))
    params = EnhanceParams(sampler="one_step", color_fix="none", upscale=1.0, min_side=0, tile="auto")
    forced = {"latent_tile": 16, "latent_stride": 12, "max_untiled_pixels": 64 * 64}
    official = _with_tiling(pipe, **forced).run_batch(lq_t, params, seeds=[4])
    own = _with_tiling(pipe, **forced, pixel_tile=576, pixel_stride=512).run_batch(lq_t, params, seeds=[4])
    with torch.inference_mode():
        whole_restored = pipe.stages["swinir"](lq_t)
        whole_latent = pipe.stages["cond_encoder"](whole_restored)
    torch.testing.assert_close(own.restored, whole_restored, rtol=0, atol=0)
    assert not torch.equal(official.restored, whole_restored)  # two blended 512 px tiles
    # The cond encoder's latent is not returned; the flow's output follows from it and the noise.
    reference = _with_tiling(pipe, **forced)
    x_T = samplers.initial_noise((1, 4, 72, 16), [4])
    with torch.inference_mode():
        expected = reference._sample(reference._velocity(whole_latent, pipe.null_context, tiled=True), x_T,
                                     reference.resolve(params), None)
    torch.testing.assert_close(own.latent, expected, rtol=0, atol=0)


@pytest.mark.parametrize("tiles, says", [
    ({"pixel_tile": 500, "pixel_stride": 448}, "tiling.pixel_tile / pixel_stride = 500 / 448: both must be multiples of 64"),
    ({"pixel_tile": 512, "pixel_stride": 576}, "the stride at most the tile"),
    ({"decoder_latent_tile": 8, "decoder_latent_stride": 0}, "tiling.decoder_latent_tile / decoder_latent_stride"),
])
def test_a_model_with_tiles_that_cannot_cover_an_image_is_refused(pipe, tiles, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        _with_tiling(pipe, **tiles)
