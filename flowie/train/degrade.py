"""Synthetic degradation on the fly, Real-ESRGAN / CodeFormer style (one order, seeded).

One clean image ``hr`` (float32 HWC RGB in [0, 1]) becomes a degraded ``lq`` through

    blur (Gaussian kernel: isotropic or anisotropic, or generalised Gaussian)
      -> downsample by s in [1, 4] (bicubic, bilinear or area)
      -> noise (Gaussian, colour or grey; or Poisson)
      -> JPEG
      -> bicubic upsample back to the size of ``hr``

The last step is what the service does before SwinIR (``imageops.prepare`` bicubic-upscales the
request by ``upscale``), so the networks train on inputs shaped like the ones they serve.
Every random choice comes from one ``numpy.random.Generator``, so a seed fixes the result
bit for bit (PIL's JPEG codec is deterministic for a given quality).

The ranges are documented on :class:`DegradationRanges` and in docs/DEMO_MODEL.md; the
``PRESETS`` are fixed degradations for evaluation (``x4_bar`` is the demo model's quality bar, docs/DEMO_MODEL.md).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = ("bicubic", "bilinear", "area")


@dataclass(frozen=True)
class DegradationRanges:
    """Where each random degradation parameter is drawn from (uniform unless said otherwise).

    Blur sigmas are in pixels of the clean image; noise sigma is on the 0..255 scale; the
    Poisson ``scale`` multiplies the unit-photon noise (larger = noisier), as in Real-ESRGAN.
    """

    blur_prob: float = 0.9
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    # kernel kind -> probability: iso / aniso Gaussian, generalised Gaussian (shape beta)
    kernel_probs: dict[str, float] = field(default_factory=lambda: {"iso": 0.45, "aniso": 0.35, "generalized": 0.2})
    generalized_beta: tuple[float, float] = (0.5, 4.0)
    scale: tuple[float, float] = (1.0, 4.0)
    resize_probs: dict[str, float] = field(default_factory=lambda: {"bicubic": 0.5, "bilinear": 0.25, "area": 0.25})
    gaussian_noise_prob: float = 0.6  # otherwise Poisson
    noise_sigma: tuple[float, float] = (1.0, 15.0)
    gray_noise_prob: float = 0.4
    poisson_scale: tuple[float, float] = (0.05, 2.0)
    jpeg_prob: float = 0.9
    jpeg_quality: tuple[int, int] = (30, 95)

    def to_dict(self) -> dict:
        return asdict(self)


RANGE_FIELDS = ("blur_sigma", "generalized_beta", "scale", "noise_sigma", "poisson_scale", "jpeg_quality")
PROBABILITY_FIELDS = ("blur_prob", "gaussian_noise_prob", "gray_noise_prob", "jpeg_prob")


def parse_ranges(text: str | None, base: DegradationRanges | None = None) -> DegradationRanges:
    """'scale=2:4,noise_sigma=1:10,jpeg_prob=0.8' -> ``base`` with those fields replaced.

    Range fields take LO:HI (LO <= HI), probabilities one number in [0, 1]; ValueError names
    the offending item.
    """
    ranges = base or DegradationRanges()
    if not text or not text.strip():
        return ranges
    changes: dict = {}
    for item in text.split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        try:
            if name in RANGE_FIELDS:
                lo, sep, hi = value.partition(":")
                cast = int if name == "jpeg_quality" else float
                pair = (cast(lo), cast(hi)) if sep else (cast(lo), cast(lo))
                if pair[0] > pair[1] or pair[0] < 0:
                    raise ValueError
                changes[name] = pair
            elif name in PROBABILITY_FIELDS:
                changes[name] = float(value)
                if not 0.0 <= changes[name] <= 1.0:
                    raise ValueError
            else:
                fields = ", ".join(RANGE_FIELDS + PROBABILITY_FIELDS)
                raise KeyError(f"unknown degradation field {name!r}; fields are {fields}")
        except ValueError:
            kind = "LO:HI with 0 <= LO <= HI" if name in RANGE_FIELDS else "a probability in [0, 1]"
            raise ValueError(f"degradation {item.strip()!r}: expected {name}={kind}") from None
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    if changes.get("jpeg_quality", (1, 100))[1] > 100 or changes.get("scale", (1.0, 1.0))[0] < 1.0:
        raise ValueError("degradation: jpeg_quality must lie within 0..100 and scale start at 1 or more")
    return replace(ranges, **changes)


@dataclass(frozen=True)
class DegradationParams:
    """One concrete degradation (what was drawn, or a fixed preset)."""

    kernel: str = "iso"  # iso | aniso | generalized | none
    kernel_size: int = 13
    sigma_x: float = 1.5
    sigma_y: float = 1.5
    theta: float = 0.0  # rotation of an anisotropic kernel, radians
    beta: float = 2.0  # generalised-Gaussian shape (2 = Gaussian)
    scale: float = 4.0  # downsampling factor
    resize: str = "bicubic"
    noise: str = "gaussian"  # gaussian | poisson | none
    noise_sigma: float = 5.0  # on 0..255
    gray_noise: bool = False
    poisson_scale: float = 0.0
    jpeg_quality: int | None = 60  # None: no JPEG

    def to_dict(self) -> dict:
        return asdict(self)


# Fixed evaluation degradations. ``x4_bar``: the demo model's quality bar (x4 bicubic down, blur
# sigma 1.5, Gaussian noise 5/255, JPEG q60, served back at the original size).
PRESETS: dict[str, DegradationParams] = {
    "x4_bar": DegradationParams(),
    "x2_mild": DegradationParams(sigma_x=1.0, sigma_y=1.0, kernel_size=9, scale=2.0, noise_sigma=3.0, jpeg_quality=80),
    "x1_noise_jpeg": DegradationParams(kernel="none", scale=1.0, noise_sigma=10.0, jpeg_quality=50),
    "x4_clean": DegradationParams(kernel="none", scale=4.0, noise="none", jpeg_quality=None),
}


def _pick(rng: np.random.Generator, probs: dict[str, float]) -> str:
    names = list(probs)
    weights = np.array([probs[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def sample_params(rng: np.random.Generator, ranges: DegradationRanges = DegradationRanges()) -> DegradationParams:
    """Draw one degradation from ``ranges``. The number of draws is fixed, so streams stay aligned."""
    u = rng.random(8)
    kernel = _pick(rng, ranges.kernel_probs) if u[0] < ranges.blur_prob else "none"
    size = int(rng.choice(ranges.kernel_sizes))
    lo, hi = ranges.blur_sigma
    sx, sy = rng.uniform(lo, hi, size=2)
    if kernel != "aniso":
        sy = sx
    theta = float(rng.uniform(-math.pi, math.pi)) if kernel == "aniso" else 0.0
    beta = float(rng.uniform(*ranges.generalized_beta)) if kernel == "generalized" else 2.0
    scale = float(rng.uniform(*ranges.scale))
    resize = _pick(rng, ranges.resize_probs)
    noise = "gaussian" if u[1] < ranges.gaussian_noise_prob else "poisson"
    sigma = float(rng.uniform(*ranges.noise_sigma))
    pscale = float(rng.uniform(*ranges.poisson_scale))
    gray = bool(u[2] < ranges.gray_noise_prob)
    quality = int(rng.integers(ranges.jpeg_quality[0], ranges.jpeg_quality[1] + 1))
    return DegradationParams(
        kernel=kernel, kernel_size=size, sigma_x=float(sx), sigma_y=float(sy), theta=theta, beta=beta,
        scale=scale, resize=resize, noise=noise, noise_sigma=sigma if noise == "gaussian" else 0.0,
        gray_noise=gray, poisson_scale=pscale if noise == "poisson" else 0.0,
        jpeg_quality=quality if u[3] < ranges.jpeg_prob else None,
    )


# ------------------------------------------------------------------------------ kernels


def blur_kernel(p: DegradationParams) -> np.ndarray | None:
    """The normalised 2-D blur kernel [k, k] float64 of ``p`` (None when ``p.kernel == 'none'``)."""
    if p.kernel == "none":
        return None
    if p.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {p.kernel_size}")
    half = p.kernel_size // 2
    ax = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax, indexing="xy")
    # Rotate the grid by -theta, then an axis-aligned (generalised) Gaussian.
    c, s = math.cos(p.theta), math.sin(p.theta)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    r2 = (u / p.sigma_x) ** 2 + (v / p.sigma_y) ** 2
    beta = p.beta if p.kernel == "generalized" else 2.0
    kernel = np.exp(-0.5 * np.power(r2, beta / 2.0))
    return kernel / kernel.sum()


def _conv_same(img: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """img [1,3,H,W] convolved with a [k,k] kernel per channel, reflect padding."""
    k = torch.from_numpy(kernel.astype(np.float32)).expand(3, 1, *kernel.shape)
    pad = kernel.shape[0] // 2
    mode = "reflect" if min(img.shape[-2:]) > pad else "replicate"
    return F.conv2d(F.pad(img, (pad, pad, pad, pad), mode=mode), k, groups=3)


def _downsample(img: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Shrink [1,3,H,W] to ``hw``; bilinear/bicubic antialiased like PIL and MATLAB's imresize."""
    if tuple(img.shape[-2:]) == tuple(hw):
        return img
    if mode == "area":
        return F.interpolate(img, size=hw, mode="area")
    return F.interpolate(img, size=hw, mode=mode, align_corners=False, antialias=True)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """[1,3,H,W] float -> uint8 HWC, rounded (what a user would upload)."""
    return (img[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)


def _jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("RGB"))


def apply_uint8(hr: np.ndarray, p: DegradationParams, rng: np.random.Generator,
                out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Degrade ``hr`` (float32 HWC RGB in [0,1]) with ``p``; returns the degraded uint8 HWC image.

    ``out_size``: (H, W) of the result; default the size of ``hr``: the small degraded image is
    bicubic-upscaled with PIL exactly as ``imageops.prepare`` does at serving time. ``(0, 0)``
    keeps the small image (what a user uploads).
    """
    h, w = hr.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(hr, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    kernel = blur_kernel(p)
    if kernel is not None:
        x = _conv_same(x, kernel)
    small = (max(1, round(h / p.scale)), max(1, round(w / p.scale)))
    x = _downsample(x, small, p.resize)
    if p.noise == "gaussian" and p.noise_sigma > 0:
        shape = (1, 1, *x.shape[-2:]) if p.gray_noise else tuple(x.shape)
        noise = rng.standard_normal(shape).astype(np.float32) * np.float32(p.noise_sigma / 255.0)
        x = x + torch.from_numpy(noise)
    elif p.noise == "poisson" and p.poisson_scale > 0:
        x = x + _poisson_noise(x, p, rng)
    lq = _to_uint8(x)
    if p.jpeg_quality is not None:
        lq = _jpeg(lq, p.jpeg_quality)
    target = (h, w) if out_size is None else tuple(out_size)
    if target != (0, 0) and lq.shape[:2] != target:
        lq = np.asarray(Image.fromarray(lq).resize((target[1], target[0]), Image.Resampling.BICUBIC))
    return lq


def apply(hr: np.ndarray, p: DegradationParams, rng: np.random.Generator, out_size: tuple[int, int] | None = None
          ) -> np.ndarray:
    """:func:`apply_uint8` as float32 HWC in [0, 1]."""
    return apply_uint8(hr, p, rng, out_size).astype(np.float32) / 255.0


def _poisson_noise(x: torch.Tensor, p: DegradationParams, rng: np.random.Generator) -> torch.Tensor:
    """Real-ESRGAN's Poisson noise: photon counts at 255 levels per unit (times 2^k), scaled."""
    arr = x.clamp(0, 1).numpy().astype(np.float64)
    if p.gray_noise:
        arr = arr.mean(axis=1, keepdims=True)
    levels = 255.0
    noisy = rng.poisson(arr * levels) / levels
    return torch.from_numpy(((noisy - arr) * p.poisson_scale).astype(np.float32))


def degrade(hr: np.ndarray, rng: np.random.Generator, ranges: DegradationRanges = DegradationRanges()
            ) -> tuple[np.ndarray, DegradationParams]:
    """Draw a degradation from ``ranges`` and apply it; (lq at the size of hr, params)."""
    params = sample_params(rng, ranges)
    return apply(hr, params, rng), params


def degrade_uint8(hr: np.ndarray, preset: str | DegradationParams, seed: int,
                  out_size: tuple[int, int] | None = (0, 0)) -> np.ndarray:
    """A fixed preset applied to a uint8 HWC image; uint8 result (small by default: what a user uploads)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown degradation preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    return apply_uint8(hr.astype(np.float32) / 255.0, preset, np.random.default_rng(seed), out_size=out_size)
