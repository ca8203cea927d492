"""Pre- and post-processing of images, with the official FlowIE / DiffBIR semantics.

The path of one image through the service:

    uint8 HWC  --prepare(plan)-->  padded uint8 HWC  --images_to_tensor-->  float NCHW in [0, 1]
    ... networks ...
    float NCHW  --tensor_to_uint8-->  uint8 NHWC  --finish(plan)-->  uint8 HWC at plan.output_hw

``plan_resize`` decides every size once, up front, so the worker can batch requests by
``plan.padded_hw`` and the padding is undone exactly.

Where we follow the official scripts (``inference_bsr.py``, ``inference_bfr.py``, DiffBIR's
``utils/image``) to the bit, and where we knowingly differ, is said at each function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flowie.stages import SPATIAL_MULTIPLE

_BICUBIC = Image.Resampling.BICUBIC
_LANCZOS = Image.Resampling.LANCZOS


# --------------------------------------------------------------------------------------------
# colour layout and dtype conversion


def ensure_rgb(img: np.ndarray) -> np.ndarray:
    """Return a uint8 HWC RGB view or copy of ``img``.

    Accepts (H, W) grayscale, (H, W, 1), (H, W, 3) RGB (returned unchanged) and (H, W, 4) RGBA.
    Alpha is dropped, not composited: that is what the official scripts get from
    ``Image.open(path).convert("RGB")``.
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {img.dtype}")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    channels = img.shape[2]
    if channels == 3:
        return img
    if channels == 1:
        return np.repeat(img, 3, axis=2)
    if channels == 4:
        return img[:, :, :3]
    raise ValueError(f"expected 1, 3 or 4 channels, got {channels} (shape {img.shape})")


# The official conversion of every byte value: float64(v) / 255, rounded to float32. Looking bytes
# up in this table reproduces the official expression exactly on any device. A division on the
# device need not: torch's CUDA kernels divide by a scalar as a multiplication by its reciprocal,
# and v * float32(1/255) differs from the official value for some v.
_UNIT_FLOAT_OF_BYTE = torch.from_numpy((np.arange(256, dtype=np.float64) / 255.0).astype(np.float32))
_TABLE_ON: dict[torch.device, torch.Tensor] = {}  # the table per device: one copy each, not one per tile


def bytes_to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor (any shape, any device) -> float32 of the same shape and device: v / 255,
    bit-identical to the official ``torch.tensor(array / 255.0, dtype=float32)``."""
    if x.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {x.dtype}")
    table = _TABLE_ON.get(x.device)
    if table is None:
        table = _TABLE_ON.setdefault(x.device, _UNIT_FLOAT_OF_BYTE.to(x.device))
    return torch.index_select(table, 0, x.reshape(-1).to(torch.int32)).view(x.shape)


def images_to_tensor(images: list[np.ndarray], device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 HWC images of one size -> float32 [N, 3, H, W] in [0, 1] on ``device``.

    Bit-identical to the official ``torch.tensor(np.stack(lq) / 255.0, dtype=float32)``
    (:func:`bytes_to_unit_float`). The bytes travel to the device and are converted there: on a
    GPU this moves a quarter of the data and leaves the host's cores free (a batch of sixteen
    512x512 images cost the host about 120 ms both ways in float on an NVIDIA H200 host, 2026-11-27).
    """
    if len(images) == 0:
        raise ValueError("images_to_tensor needs at least one image")
    rgb = [ensure_rgb(img) for img in images]
    first = rgb[0].shape
    for i, img in enumerate(rgb):
        if img.shape != first:
            raise ValueError(f"all images must have the same size: image 0 is {first}, image {i} is {img.shape}")
    stacked = torch.from_numpy(np.stack(rgb)).to(device)
    return bytes_to_unit_float(stacked).permute(0, 3, 1, 2)


def tensor_to_uint8(x: torch.Tensor, band_pixels: int = 1 << 19) -> np.ndarray:
    """Float [N, C, H, W] (nominally [0, 1]) -> uint8 [N, H, W, C], by truncation.

    Exactly the official ``(x.clamp(0, 1) NHWC * 255).cpu().numpy().astype(uint8)``: the
    product is taken in float32 and the fraction is dropped, not rounded (0.999/255 -> 0).
    Keep it that way: the reference outputs were made like this. Half-precision input is
    promoted to float32 first so fp16 engines quantise like the fp32 reference. NaN maps to 0
    (the cast of NaN is otherwise undefined); no finite value is affected by that.

    The cast happens where ``x`` lives and only bytes travel to the host: torch's float-to-uint8
    cast truncates toward zero as numpy's ``astype`` does, and every value is in [0, 255] by then.
    Converted in row bands of about ``band_pixels`` pixels per image, straight into the uint8
    result, so the float temporaries (the copy, the clamp, the product) are band-sized instead
    of three float32 images. Every element goes through the same operations either way.
    """
    if x.ndim != 4:
        raise ValueError(f"expected an NCHW tensor, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    out = np.empty((n, h, w, c), dtype=np.uint8)
    rows = max(1, band_pixels // max(w, 1))
    for top in range(0, h, rows):
        band = torch.nan_to_num(x[:, :, top:top + rows].detach().to(torch.float32), nan=0.0)
        scaled = band.clamp_(0, 1).mul_(255).to(torch.uint8)
        out[:, top:top + rows] = scaled.permute(0, 2, 3, 1).cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class ResizePlan:
    """Every size one image goes through, as (height, width) in pixels.

    input_hw:  the image as received.
    output_hw: what the user gets back: ceil(input * upscale).
    work_hw:   output_hw enlarged (aspect kept) so its short side is >= min_side; the networks
               see this content.
    padded_hw: work_hw zero-padded at the bottom/right to a multiple of ``multiple``; the
               tensor shape the networks run on (and the key the worker batches by).
    """

    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    work_hw: tuple[int, int]
    padded_hw: tuple[int, int]

    @property
    def pad_hw(self) -> tuple[int, int]:
        """Rows added at the bottom and columns added at the right."""
        return self.padded_hw[0] - self.work_hw[0], self.padded_hw[1] - self.work_hw[1]


def _ceil_scaled(n: int, factor: float) -> int:
    # The official code is math.ceil(n * factor) on floats, so 100 * 1.1 = 110.00000000000001
    # becomes 111. Rounding away float noise below 1e-6 px first gives 110, what the user asked for.
    return math.ceil(round(n * factor, 6))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_resize(h: int, w: int, upscale: float, min_side: int, multiple: int = SPATIAL_MULTIPLE) -> ResizePlan:
    """Plan the resizes and padding for an h x w image (pixels).

    1. output = (ceil(h * upscale), ceil(w * upscale)), bicubic in ``prepare``.
    2. If the short side of output < min_side: short side -> exactly min_side, long side ->
       ceil(long * min_side / short) in exact integer arithmetic (bicubic). min_side 0 disables.
    3. Zero-pad bottom/right to a multiple of ``multiple``.
    """
    for name, value in (("h", h), ("w", w), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(min_side, bool) or not isinstance(min_side, (int, np.integer)) or min_side < 0:
        raise ValueError(f"min_side must be an integer >= 0 (0 disables it), got {min_side!r}")
    upscale = float(upscale)
    if not math.isfinite(upscale) or upscale < 1.0:
        raise ValueError(f"upscale must be a finite number >= 1, got {upscale!r}")
    h, w, min_side, multiple = int(h), int(w), int(min_side), int(multiple)

    out_h, out_w = _ceil_scaled(h, upscale), _ceil_scaled(w, upscale)

    work_h, work_w = out_h, out_w
    short = min(out_h, out_w)
    if min_side > 0 and short < min_side:
        # Integer ceil(long * min_side / short): the official float version is one pixel too
        # large for some sizes (e.g. 91 x 273 -> 1537 instead of 1536).
        if out_h <= out_w:
            work_h, work_w = min_side, -(-out_w * min_side // out_h)
        else:
            work_h, work_w = -(-out_h * min_side // out_w), min_side

    padded = (_round_up(work_h, multiple), _round_up(work_w, multiple))
    return ResizePlan(input_hw=(h, w), output_hw=(out_h, out_w), work_hw=(work_h, work_w), padded_hw=padded)


def _resize(img: np.ndarray, hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    if img.shape[:2] == tuple(hw):
        return img
    # PIL takes (width, height).
    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), resample))


def prepare(image: np.ndarray, plan: ResizePlan) -> np.ndarray:
    """uint8 HWC image of plan.input_hw -> uint8 [padded_h, padded_w, 3], ready for the networks.

    Two bicubic resizes, as the official scripts do them (upscale to output_hw, then the
    min-side enlargement to work_hw), each skipped when the size does not change; then zeros
    at the bottom/right.
    """
    rgb = ensure_rgb(image)
    if rgb.shape[:2] != plan.input_hw:
        raise ValueError(f"image is {rgb.shape[:2]} but the plan was made for {plan.input_hw}")
    work = _resize(_resize(rgb, plan.output_hw, _BICUBIC), plan.work_hw, _BICUBIC)
    pad_h, pad_w = plan.pad_hw
    if pad_h == 0 and pad_w == 0:
        return np.ascontiguousarray(work)
    return np.pad(work, ((0, pad_h), (0, pad_w), (0, 0)), mode="constant", constant_values=0)


def finish(image: np.ndarray, plan: ResizePlan, resample: Image.Resampling = _LANCZOS) -> np.ndarray:
    """uint8 [padded_h, padded_w, 3] network output -> uint8 HWC of plan.output_hw.

    Crops the padding, then resizes work_hw -> output_hw when the min-side step enlarged the
    image. The official BSR script uses LANCZOS for this resize (``.resize(lq.size,
    Image.LANCZOS)``), so that is the default; pass ``Image.Resampling.BICUBIC`` to change it.
    """
    if image.ndim != 3 or image.shape[:2] != plan.padded_hw:
        raise ValueError(f"expected an image of {plan.padded_hw} (H, W, C), got shape {image.shape}")
    work_h, work_w = plan.work_hw
    cropped = np.ascontiguousarray(image[:work_h, :work_w])
    return _resize(cropped, plan.output_hw, resample)


# --------------------------------------------------------------------------------------------
# tensors


def pad_tensor(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad [..., H, W] at the bottom/right to multiples of ``multiple``; returns x if aligned."""
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if x.ndim < 2:
        raise ValueError(f"expected at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    pad_h, pad_w = _round_up(h, multiple) - h, _round_up(w, multiple) - w
    if pad_h == 0 and pad_w == 0:
        return x
    # F.pad's tuple runs from the last dimension: (left, right, top, bottom).
    return F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=0.0)


def crop_tensor(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Top-left [..., h, w] of ``x`` (undoes ``pad_tensor``); a view, no copy."""
    if x.ndim < 2:
        raise ValueError(f"expected at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")
    if not (0 < h <= x.shape[-2] and 0 < w <= x.shape[-1]):
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} to ({h}, {w})")
    return x[..., :h, :w]
