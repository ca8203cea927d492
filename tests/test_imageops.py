"""Promises of flowie.imageops: official-exact conversions, sizes planned once, padding undone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowie.imageops import (
    ResizePlan,
    bytes_to_unit_float,
    crop_tensor,
    ensure_rgb,
    finish,
    images_to_tensor,
    pad_tensor,
    plan_resize,
    prepare,
    tensor_to_uint8,
)


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# conversions


def test_images_to_tensor_is_bit_identical_to_the_official_expression():
    images = [_random_image(24, 40, seed) for seed in (1, 2)]
    official = torch.tensor(np.stack(images) / 255.0, dtype=torch.float32).clamp_(0, 1).permute(0, 3, 1, 2)
    x = images_to_tensor(images)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 24, 40)
    assert torch.equal(x, official)


def test_images_to_tensor_maps_every_uint8_value_to_float32_of_v_over_255():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = images_to_tensor([values])[0, 0].flatten()
    expected = torch.tensor(np.arange(256) / 255.0, dtype=torch.float32)
    assert torch.equal(x, expected)


def test_bytes_to_unit_float_is_the_official_division_for_every_value_and_shape():
    values = torch.arange(256, dtype=torch.uint8)
    expected = torch.from_numpy((np.arange(256) / 255.0).astype(np.float32))
    assert torch.equal(bytes_to_unit_float(values), expected)
    image = torch.from_numpy(_random_image(5, 7, 9))
    out = bytes_to_unit_float(image)
    assert out.shape == (5, 7, 3) and out.dtype == torch.float32
    assert torch.equal(out, torch.tensor(image.numpy() / 255.0, dtype=torch.float32))
    with pytest.raises(ValueError, match="uint8"):
        bytes_to_unit_float(values.float())


def test_a_reciprocal_multiplication_would_not_be_official():
    """Why the conversion looks bytes up instead of dividing on the device: a division by a
    scalar that a kernel turns into a multiplication by float32(1/255) misses the official value
    for some bytes. If this ever stops failing, the table is still right, only no longer needed."""
    official = (np.arange(256) / 255.0).astype(np.float32)
    by_reciprocal = np.arange(256, dtype=np.float32) * np.float32(1 / 255)
    assert (by_reciprocal != official).any()


def test_images_to_tensor_converts_on_the_device_it_is_given():
    """The result lands on the device asked for (the meta device stands in for a GPU here; that
    the conversion itself runs there is the implementation's comment, measured only on a card)."""
    x = images_to_tensor([_random_image(8, 8)], device="meta")
    assert x.device.type == "meta" and x.dtype == torch.float32 and x.shape == (1, 3, 8, 8)


def test_tensor_to_uint8_truncates_like_numpy_at_every_step_boundary():
    """Every float32 next to each k/255 and each exact product: the device-side cast must drop the
    fraction exactly where the official numpy ``astype(uint8)`` does."""
    k = torch.arange(256, dtype=torch.float32) / 255
    near = torch.cat([k, torch.nextafter(k, torch.ones_like(k)), torch.nextafter(k, torch.zeros_like(k)),
                      torch.linspace(0, 1, 100_001)])
    x = near.view(1, 1, 1, -1)
    official = (np.clip(near.numpy(), 0, 1) * np.float32(255)).astype(np.uint8)
    np.testing.assert_array_equal(tensor_to_uint8(x)[0, 0, :, 0], official)


def test_images_to_tensor_rejects_mixed_sizes_and_empty_batches():
    with pytest.raises(ValueError, match="same size"):
        images_to_tensor([_random_image(8, 8), _random_image(8, 9)])
    with pytest.raises(ValueError):
        images_to_tensor([])


def test_tensor_to_uint8_truncates_instead_of_rounding():
    values = torch.tensor([0.999 / 255, 1.0 / 255, 254.9 / 255, 0.5, 1.0, 1.7, -0.3, float("nan")])
    x = values.view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = tensor_to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, values.numel(), 3)
    # 0.5 * 255 = 127.5 -> 127 (rounding would give 128).
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 1, 254, 127, 255, 255, 0, 0])


def test_tensor_to_uint8_quantises_half_precision_like_float32():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)).half()
    np.testing.assert_array_equal(tensor_to_uint8(x), tensor_to_uint8(x.float()))


def test_uint8_tensor_uint8_round_trip_is_identical_for_every_value():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    images = [values, _random_image(16, 16, 4)]
    np.testing.assert_array_equal(tensor_to_uint8(images_to_tensor(images)), np.stack(images))


def test_ensure_rgb_converts_gray_and_drops_alpha():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = ensure_rgb(gray)
    assert rgb.shape == (3, 4, 3) and all((rgb[..., c] == gray).all() for c in range(3))
    np.testing.assert_array_equal(ensure_rgb(gray[..., None]), rgb)
    rgba = np.dstack([_random_image(3, 4), np.full((3, 4), 7, np.uint8)])
    # Same as the official Image.open(...).convert("RGB").
    np.testing.assert_array_equal(ensure_rgb(rgba), np.asarray(Image.fromarray(rgba).convert("RGB")))
    image = _random_image(3, 4)
    assert ensure_rgb(image) is image


def test_ensure_rgb_rejects_float_and_odd_channel_counts():
    with pytest.raises(ValueError, match="uint8"):
        ensure_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="channels"):
        ensure_rgb(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError):
        ensure_rgb(np.zeros((2, 4, 4, 3), np.uint8))


# --------------------------------------------------------------------------------------------
# plan_resize


def test_plan_upscale2_min_side512_on_100x60():
    plan = plan_resize(100, 60, upscale=2, min_side=512)
    assert plan.input_hw == (100, 60)
    assert plan.output_hw == (200, 120)
    # short side 120 -> exactly 512; long side ceil(200 * 512 / 120) = ceil(853.33) = 854.
    assert plan.work_hw == (854, 512)
    assert plan.padded_hw == (896, 512)
    assert plan.pad_hw == (42, 0)


def test_plan_min_side_zero_disables_enlargement():
    plan = plan_resize(100, 60, upscale=2, min_side=0)
    assert plan.output_hw == plan.work_hw == (200, 120)
    assert plan.padded_hw == (256, 128)


def test_plan_leaves_already_large_images_alone():
    plan = plan_resize(600, 800, upscale=1, min_side=512)
    assert plan.output_hw == plan.work_hw == (600, 800)
    assert plan.padded_hw == (640, 832)


def test_plan_square_small_image_goes_to_exactly_min_side():
    plan = plan_resize(50, 50, upscale=1, min_side=512)
    assert plan.work_hw == plan.padded_hw == (512, 512)


def test_plan_long_side_uses_exact_integer_ceil():
    # 273 / 91 = 3 exactly; the official float ceil gives 1537 here.
    plan = plan_resize(91, 273, upscale=1, min_side=512)
    assert plan.work_hw == (512, 1536)


def test_plan_upscale_ignores_float_noise():
    # 100 * 1.1 = 110.00000000000001 in floats; the user asked for 110.
    assert plan_resize(100, 50, upscale=1.1, min_side=0).output_hw == (110, 55)
    assert plan_resize(100, 50, upscale=1.5, min_side=0).output_hw == (150, 75)
    assert plan_resize(33, 7, upscale=1.5, min_side=0).output_hw == (50, 11)


@pytest.mark.parametrize("h, w, multiple", [(1, 1, 64), (64, 65, 64), (127, 200, 64), (100, 100, 8), (17, 33, 1)])
def test_plan_pads_to_the_next_multiple(h, w, multiple):
    plan = plan_resize(h, w, upscale=1, min_side=0, multiple=multiple)
    for padded, work in zip(plan.padded_hw, plan.work_hw, strict=True):
        assert padded % multiple == 0 and work <= padded < work + multiple


@pytest.mark.parametrize("kwargs, message", [
    (dict(h=0, w=10, upscale=1, min_side=0), "h must be"),
    (dict(h=10, w=-1, upscale=1, min_side=0), "w must be"),
    (dict(h=10, w=10, upscale=0.5, min_side=0), "upscale"),
    (dict(h=10, w=10, upscale=float("nan"), min_side=0), "upscale"),
    (dict(h=10, w=10, upscale=1, min_side=-1), "min_side"),
    (dict(h=10, w=10, upscale=1, min_side=0, multiple=0), "multiple"),
    (dict(h=10.0, w=10, upscale=1, min_side=0), "h must be"),
])
def test_plan_rejects_invalid_sizes_with_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_resize(**kwargs)


def test_plan_is_frozen():
    plan = plan_resize(10, 10, upscale=1, min_side=0)
    with pytest.raises(AttributeError):
        plan.output_hw = (1, 1)  # type: ignore[misc]
    assert isinstance(plan, ResizePlan)


# --------------------------------------------------------------------------------------------
# prepare / finish


def test_prepare_matches_the_official_resize_and_pad_sequence():
    image = _random_image(50, 30, 5)
    plan = plan_resize(50, 30, upscale=2, min_side=128)
    prepared = prepare(image, plan)
    # Official: bicubic x upscale, then auto_resize (bicubic) to the min side, then pad.
    upscaled = Image.fromarray(image).resize((plan.output_hw[1], plan.output_hw[0]), Image.BICUBIC)
    enlarged = np.asarray(upscaled.resize((plan.work_hw[1], plan.work_hw[0]), Image.BICUBIC))
    pad_h, pad_w = plan.pad_hw
    expected = np.pad(enlarged, ((0, pad_h), (0, pad_w), (0, 0)))
    assert prepared.shape == (*plan.padded_hw, 3)
    np.testing.assert_array_equal(prepared, expected)


def test_prepare_pads_with_zeros_at_bottom_right_only():
    image = np.full((70, 90, 3), 200, np.uint8)
    plan = plan_resize(70, 90, upscale=1, min_side=0)
    prepared = prepare(image, plan)
    assert prepared.shape == (128, 128, 3)
    np.testing.assert_array_equal(prepared[:70, :90], image)
    assert not prepared[70:].any() and not prepared[:, 90:].any()


def test_prepare_rejects_an_image_of_another_size():
    with pytest.raises(ValueError, match="plan"):
        prepare(_random_image(10, 12), plan_resize(12, 10, upscale=1, min_side=0))


@pytest.mark.parametrize("h, w, upscale, min_side", [(100, 60, 2, 512), (70, 90, 1, 0), (600, 800, 1, 512),
                                                      (37, 53, 1.5, 64)])
def test_prepare_then_finish_returns_the_output_size(h, w, upscale, min_side):
    image = _random_image(h, w, 6)
    plan = plan_resize(h, w, upscale=upscale, min_side=min_side)
    restored = finish(prepare(image, plan), plan)
    assert restored.shape == (*plan.output_hw, 3) and restored.dtype == np.uint8


def test_prepare_then_finish_is_lossless_when_only_padding_was_added():
    image = _random_image(70, 90, 7)
    plan = plan_resize(70, 90, upscale=1, min_side=0)
    np.testing.assert_array_equal(finish(prepare(image, plan), plan), image)


def test_finish_resizes_back_with_lanczos_like_the_official_script():
    plan = plan_resize(100, 60, upscale=1, min_side=128)
    network_out = _random_image(*plan.padded_hw, 8)
    cropped = network_out[:plan.work_hw[0], :plan.work_hw[1]]
    expected = np.asarray(Image.fromarray(cropped).resize((60, 100), Image.LANCZOS))
    np.testing.assert_array_equal(finish(network_out, plan), expected)


def test_finish_rejects_an_image_that_is_not_the_padded_size():
    plan = plan_resize(70, 90, upscale=1, min_side=0)
    with pytest.raises(ValueError, match="expected an image"):
        finish(_random_image(70, 90), plan)


# --------------------------------------------------------------------------------------------
# tensors


def test_pad_then_crop_tensor_round_trip():
    x = torch.randn(2, 4, 13, 21, generator=torch.Generator().manual_seed(9))
    padded = pad_tensor(x, 8)
    assert padded.shape == (2, 4, 16, 24)
    assert not padded[..., 13:, :].any() and not padded[..., :, 21:].any()
    assert torch.equal(crop_tensor(padded, 13, 21), x)


def test_pad_tensor_returns_aligned_input_unchanged():
    x = torch.randn(1, 3, 64, 128)
    assert pad_tensor(x, 64) is x


def test_crop_tensor_rejects_sizes_larger_than_the_tensor():
    with pytest.raises(ValueError):
        crop_tensor(torch.zeros(1, 1, 8, 8), 9, 8)
    with pytest.raises(ValueError):
        pad_tensor(torch.zeros(1, 1, 8, 8), 0)


@pytest.mark.parametrize("band_pixels", [1, 7 * 13, 1000, 1 << 19])
def test_tensor_to_uint8_in_row_bands_equals_one_pass(band_pixels):
    x = torch.randn(2, 3, 37, 13, generator=torch.Generator().manual_seed(5)) * 0.6 + 0.5
    x[1, 2, 30, 4] = float("nan")
    before = x.clone()
    one_pass = (torch.nan_to_num(x, nan=0.0).clamp(0, 1).permute(0, 2, 3, 1) * 255).numpy().astype(np.uint8)
    np.testing.assert_array_equal(tensor_to_uint8(x, band_pixels=band_pixels), one_pass)
    assert torch.equal(x.nan_to_num(), before.nan_to_num()) and x.isnan().sum() == 1  # input untouched
