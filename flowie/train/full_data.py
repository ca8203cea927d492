"""Training data of the full-size recipe: image lists, a shuffled global order, the official degradations.

Sources: a folder (searched recursively, as the official ``scripts/make_file_list.py`` does), a
file list in that script's format (one image path per line), or ``skimage`` / ``skimage-holdout`` (scikit-image's split) for tests.

Sharding: sample ``g`` of the run (a global index, counted over steps, accumulation micro-batches,
ranks and batch positions) is image ``perm_e[g mod N]`` of epoch ``e = g // N``, where ``perm_e``
is a permutation seeded by (seed, e): the order ``DistributedSampler`` gives, here a pure function
of ``g``. Its crop, flip and degradation come from a generator seeded by (seed, g). So the data
of a run does not depend on how many processes share it, and the sampler position of a run is
its step count.

Degradations (the official dataset configs; float HWC in [0, 1] in, uint8 out):

- ``face`` (CodeFormer-style, DiffBIR ``configs/dataset/face_train.yaml``): aligned faces used
  whole (resized to the crop if needed), flipped with p = 0.5; an isotropic or anisotropic
  Gaussian blur (41 px kernel, sigma 0.1-12), downsampling by 1-12, Gaussian noise sigma 0-15,
  JPEG quality 30-100, back to the crop size.
- ``general`` (Real-ESRGAN second order): random crops; blur, resize (up 1-1.5 / down 0.15-1 /
  keep), Gaussian (1-30) or Poisson (0.05-3) noise, JPEG 30-95; then a second blur (p 0.8,
  sigma 0.2-1.5), resize to 1/4 of the crop, noise (1-25 / 0.05-2.5), JPEG 30-95; back to the
  crop size. Real-ESRGAN's sinc filter is left out.

Both reuse :mod:`flowie.train.degrade`'s operators, whose resizes are antialiased and whose last
upscale is bicubic (the official face set uses OpenCV's linear resize both ways).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowie.train.data import IMAGE_SUFFIXES, SKIMAGE_HOLDOUT, SKIMAGE_TRAIN, _skimage, read_image
from flowie.train.degrade import DegradationParams, DegradationRanges, apply_uint8, sample_params

DEGRADATIONS = ("face", "general")
MAX_LIST_LINES = 50_000_000  # a file list longer than this is refused, not read into memory

FACE_RANGES = DegradationRanges(blur_prob=1.0, kernel_sizes=(41,), blur_sigma=(0.1, 12.0),
                                kernel_probs={"iso": 0.5, "aniso": 0.5}, scale=(1.0, 12.0),
                                resize_probs={"bilinear": 1.0}, gaussian_noise_prob=1.0, noise_sigma=(0.0, 15.0),
                                gray_noise_prob=0.0, jpeg_prob=1.0, jpeg_quality=(30, 100))
GENERAL_FIRST = DegradationRanges(blur_prob=1.0, kernel_sizes=(7, 9, 11, 13, 15, 17, 19, 21), blur_sigma=(0.2, 3.0),
                                  kernel_probs={"iso": 0.45, "aniso": 0.25, "generalized": 0.3},
                                  gaussian_noise_prob=0.5, noise_sigma=(1.0, 30.0), gray_noise_prob=0.4,
                                  poisson_scale=(0.05, 3.0), jpeg_prob=1.0, jpeg_quality=(30, 95))
GENERAL_SECOND = replace(GENERAL_FIRST, blur_prob=0.8, blur_sigma=(0.2, 1.5), noise_sigma=(1.0, 25.0),
                         poisson_scale=(0.05, 2.5))
# Real-ESRGAN's first resize: up (x1-1.5), down (x0.15-1) or keep, with these probabilities.
FIRST_RESIZE = (("up", 0.2, (1.0, 1.5)), ("down", 0.7, (0.15, 1.0)), ("keep", 0.1, (1.0, 1.0)))
GENERAL_SCALE = 4  # the second order ends at 1/4 of the crop


def list_images(source: str | Path) -> list[str]:
    """Image paths of a folder (recursive, sorted) or of a file list (one path per line); ``skimage``."""
    if str(source) in ("skimage", "skimage-holdout"):
        return [f"skimage:{name}" for name in (SKIMAGE_TRAIN if str(source) == "skimage" else SKIMAGE_HOLDOUT)]
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                if n >= MAX_LIST_LINES:
                    raise ValueError(f"{path} lists more than {MAX_LIST_LINES} images")
                if line.strip():
                    files.append(line.strip())
    else:
        raise ValueError(f"--images {source}: neither a folder, a file list nor 'skimage'")
    if not files:
        raise ValueError(f"no images in {source}")
    return files


def _load(entry: str) -> np.ndarray:
    if entry.startswith("skimage:"):
        return _skimage([entry.split(":", 1)[1]])[0].pixels
    return read_image(entry)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))


class FullDataset:
    """(clean, degraded) crop pairs, float32 [3, crop, crop] in [0, 1], by global sample index."""

    def __init__(self, source: str | Path, crop: int, degradation: str, seed: int):
        if degradation not in DEGRADATIONS:
            raise ValueError(f"degradation must be one of {', '.join(DEGRADATIONS)}, got {degradation!r}")
        self.files = list_images(source)
        self.crop, self.degradation, self.seed = crop, degradation, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def image_index(self, g: int) -> int:
        epoch, pos = divmod(g, len(self.files))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.files)))
        return int(self._perm[1][pos])

    def item(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 2, g])
        img = _load(self.files[self.image_index(g)])
        clean = self._face_crop(img, rng) if self.degradation == "face" else self._random_crop(img, rng)
        hr = clean.astype(np.float32) / 255.0
        lq = face_degrade(hr, rng) if self.degradation == "face" else general_degrade(hr, rng)
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1)  # noqa: E731
        return to_t(hr), to_t(lq.astype(np.float32) / 255.0)

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first .. first+size-1 stacked: clean, degraded [size, 3, crop, crop]."""
        pairs = [self.item(first + i) for i in range(size)]
        return torch.stack([c for c, _ in pairs]), torch.stack([d for _, d in pairs])

    def _face_crop(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if img.shape[0] != self.crop or img.shape[1] != self.crop:
            img = _resize(img, self.crop)  # aligned faces are used whole
        return img[:, ::-1] if rng.random() < 0.5 else img

    def _random_crop(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        if min(h, w) < self.crop:
            scale = self.crop / min(h, w)
            img = np.asarray(Image.fromarray(img).resize((math.ceil(w * scale), math.ceil(h * scale)),
                                                         Image.Resampling.BICUBIC))
            h, w = img.shape[:2]
        y, x = int(rng.integers(h - self.crop + 1)), int(rng.integers(w - self.crop + 1))
        out = img[y : y + self.crop, x : x + self.crop]
        return out[:, ::-1] if rng.random() < 0.5 else out


def face_degrade(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CodeFormer-style degradation of an aligned face (float HWC [0,1]) -> uint8 at the same size."""
    return apply_uint8(hr, sample_params(rng, FACE_RANGES), rng)


def general_degrade(hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Real-ESRGAN's second-order degradation -> uint8 at the size of ``hr`` (bicubic back up from 1/4)."""
    h, w = hr.shape[:2]
    first = sample_params(rng, GENERAL_FIRST)
    kinds = [k for k, _, _ in FIRST_RESIZE]
    probs = np.array([p for _, p, _ in FIRST_RESIZE])
    kind = int(rng.choice(len(kinds), p=probs / probs.sum()))
    factor = float(rng.uniform(*FIRST_RESIZE[kind][2]))
    mid = apply_uint8(hr, replace(first, scale=1.0 / factor), rng, out_size=(0, 0)).astype(np.float32) / 255.0
    second: DegradationParams = sample_params(rng, GENERAL_SECOND)
    target = max(1, round(h / GENERAL_SCALE))
    second = replace(second, scale=mid.shape[0] / target)
    return apply_uint8(mid, second, rng, out_size=(h, w))
