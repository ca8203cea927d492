"""Training and evaluation images, and seeded random crops with on-the-fly degradation.

Image sources (``load_images``), joined with ``+`` to train on several at once:

- a folder of image files;
- ``skimage``: the colour images bundled with scikit-image (training split, below);
  ``skimage-holdout``: its held-out split; ``skimage-photos``: only the photographs of the
  training split;
- ``plasma-photos=ROOT``: the photographs among the wallpapers of Debian's
  ``plasma-workspace-wallpapers`` package (training), and ``mate-photos=ROOT``: those of
  ``mate-backgrounds`` (held out: no FlowIE model trains on them), installed under ROOT
  (``/`` when installed with apt, or a folder the .deb was unpacked into with ``dpkg -x``).
  The largest rendering of each is read and shrunk to the source's short side (antialiased),
  which also smooths away the wallpapers' own JPEG artefacts in the clean targets;
- ``matplotlib-photos``: the photograph matplotlib ships (``grace_hopper``; held out).

The skimage split is by whole image, never by region, so no held-out pixel or scene is seen
in training:

- held out: ``coffee`` and ``rocket``: natural photographs, the kind of picture the demo is
  for, so the held-out numbers measure what a user sees;
- training: ``astronaut``, ``chelsea`` (= ``cat``, the same picture, taken once),
  ``colorwheel``, ``hubble_deep_field``, ``immunohistochemistry``, ``logo`` (alpha dropped),
  ``retina``. ``astronaut`` and ``chelsea`` keep natural photographs in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from flowie.train.degrade import DegradationRanges, apply_uint8, sample_params

SKIMAGE_TRAIN = ("astronaut", "chelsea", "colorwheel", "hubble_deep_field", "immunohistochemistry", "logo", "retina")
SKIMAGE_HOLDOUT = ("coffee", "rocket")
SKIMAGE_PHOTOS = ("astronaut", "chelsea")


@dataclass(frozen=True)
class PackagePhotos:
    """Photographs among a Debian wallpaper package's images: ROOT/folder/pattern, ``{name}`` filled in."""

    package: str
    folder: str
    pattern: str
    names: tuple[str, ...]
    short_side: int  # px after shrinking


PACKAGE_SOURCES = {
    # plasma-workspace-wallpapers 5.27: landscapes, water, leaves, cups, a forest path; the other
    # wallpapers are rendered abstract art, which teaches flat colour and hard vector edges.
    # 800 px: shown 0.5-1x by the crop sampler, about the detail density of a 400-600 px upload.
    "plasma-photos": PackagePhotos(
        "plasma-workspace-wallpapers", "usr/share/wallpapers", "{name}/contents/images/*",
        ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
         "OneStandsOut", "Path", "summer_1am"), 800),
    # mate-backgrounds 1.26, its nature photographs with the most detail; 400 px like coffee/rocket.
    "mate-photos": PackagePhotos(
        "mate-backgrounds", "usr/share/backgrounds/mate/nature", "{name}.jpg",
        ("Dune", "FreshFlower", "Garden", "LadyBird", "RainDrops", "TwoWings"), 400),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class NamedImage:
    name: str
    pixels: np.ndarray  # uint8 HWC RGB


def _skimage(names: Sequence[str]) -> list[NamedImage]:
    try:
        import skimage.data
    except ImportError as exc:  # a dev dependency, not a serving one
        raise RuntimeError("the skimage image sources need scikit-image: pip install scikit-image") from exc
    out = []
    for name in names:
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        out.append(NamedImage(name, np.ascontiguousarray(pixels[..., :3], dtype=np.uint8)))
    return out


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 HWC RGB (EXIF orientation applied, alpha dropped)."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _shrink(pixels: np.ndarray, short_side: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    if min(h, w) <= short_side:
        return pixels
    size = (round(w * short_side / min(h, w)), round(h * short_side / min(h, w)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def _pixel_count(path: Path) -> int:
    """Wallpaper files are named WIDTHxHEIGHT.ext."""
    w, _, h = path.stem.partition("x")
    return int(w) * int(h) if w.isdigit() and h.isdigit() else 0


def _package_photos(source: str, root: str | Path) -> list[NamedImage]:
    """The largest file of each named image of a package source under ROOT, shrunk to its short side."""
    spec = PACKAGE_SOURCES[source]
    base = Path(root) / spec.folder
    out = []
    for name in spec.names:
        files = [p for p in base.glob(spec.pattern.format(name=name)) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise ValueError(f"no {name} under {base}: install {spec.package}, or unpack its .deb with "
                             f"dpkg -x and pass {source}=THAT_FOLDER")
        largest = max(files, key=_pixel_count)
        label = f"{spec.package}:{largest.relative_to(base)}"
        out.append(NamedImage(label, _shrink(read_image(largest), spec.short_side)))
    return out


def _matplotlib_photos() -> list[NamedImage]:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return [NamedImage("grace_hopper", read_image(f))]


def load_images(source: str | Path) -> list[NamedImage]:
    """Images of one source or of several joined with ``+`` (module docstring); a folder's sorted by name."""
    text = str(source)
    if "+" in text and not Path(text).is_dir():
        return [im for part in text.split("+") for im in load_images(part)]
    if text == "skimage":
        return _skimage(SKIMAGE_TRAIN)
    if text in ("skimage-holdout", "skimage_holdout"):
        return _skimage(SKIMAGE_HOLDOUT)
    if text == "skimage-photos":
        return _skimage(SKIMAGE_PHOTOS)
    name, _, root = text.partition("=")
    if name in PACKAGE_SOURCES:
        return _package_photos(name, root or "/")
    if text == "matplotlib-photos":
        return _matplotlib_photos()
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"{source} is none of skimage, skimage-holdout, skimage-photos, matplotlib-photos, "
                         f"{', '.join(n + '[=ROOT]' for n in PACKAGE_SOURCES)} nor a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return [NamedImage(p.stem, read_image(p)) for p in files]


class CropSampler:
    """Seeded batches of (clean, degraded) crops; batch ``k`` of stream ``stream`` is a pure function of the seed.

    Each crop reproduces the serving path at a random *work scale* f (``work_scale``): the
    service bicubic-upscales a request to its output size and then, when ``min_side`` asks for
    it, by f more before the networks run. So a native-resolution region is degraded at native
    scale (``DegradationRanges``; what a user uploads), the degraded image is bicubic-upscaled
    by s*f, the clean region by f, and the centre ``crop`` x ``crop`` of both is kept (a margin
    keeps blur and resize borders out of the crop). Before that the source image is rescaled
    by r in ``rescale`` (more scales of content from few images), and crops are flipped and
    rotated. Clean and degraded are float32 [B,3,crop,crop] in [0,1].
    """

    MARGIN = 12  # native pixels around the region; degraded too, then cut away

    def __init__(self, images: Sequence[NamedImage], crop: int, seed: int,
                 ranges: DegradationRanges = DegradationRanges(), rescale: tuple[float, float] = (0.5, 1.0),
                 work_scale: tuple[float, float] = (1.0, 1.0)):
        if not images:
            raise ValueError("CropSampler needs at least one image")
        if work_scale[0] < 1.0 or work_scale[1] < work_scale[0]:
            raise ValueError(f"work_scale must be a range within [1, inf), got {work_scale}")
        self.images = [im.pixels.astype(np.float32) / 255.0 for im in images]
        self.names = [im.name for im in images]
        self.crop, self.seed, self.ranges = crop, seed, ranges
        self.rescale, self.work_scale = rescale, work_scale
        too_small = [n for n, im in zip(self.names, self.images, strict=True) if min(im.shape[:2]) < self._region(1.0) + 1]
        if too_small:
            raise ValueError(f"images too small for {crop}px crops: {too_small}")

    def _region(self, f: float) -> int:
        return int(math.ceil(self.crop / f)) + 2 * self.MARGIN

    def rng(self, stream: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, index])

    def _native_region(self, rng: np.random.Generator, f: float) -> np.ndarray:
        """A (region x region) native-resolution patch of a random image at a random content scale."""
        img = self.images[int(rng.integers(len(self.images)))]
        h, w = img.shape[:2]
        need = self._region(f)
        lo = max(self.rescale[0], need / min(h, w))
        r = float(rng.uniform(lo, max(lo, self.rescale[1])))
        # Cut need/r source pixels and resize them to need (cheaper than resizing the whole image).
        size = min(min(h, w), max(need, int(round(need / r))))
        y, x = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        region = img[y : y + size, x : x + size]
        if rng.random() < 0.5:
            region = region[:, ::-1]
        region = np.rot90(region, int(rng.integers(4)))
        if size != need:
            region = _resize_float(np.ascontiguousarray(region), need)
        # Quantise like a stored photo: the clean image is a uint8 picture.
        return np.round(np.ascontiguousarray(region) * 255.0) / 255.0

    def pair(self, rng: np.random.Generator, degrade: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One (clean, degraded) crop pair, float32 HWC."""
        f = float(rng.uniform(*self.work_scale))
        native = self._native_region(rng, f).astype(np.float32)
        n = native.shape[0]
        big = int(round(n * f))
        off = (big - self.crop) // 2
        clean_big = _resize_float(native, big) if big != n else native
        clean = np.ascontiguousarray(clean_big[off : off + self.crop, off : off + self.crop])
        if not degrade:
            return clean, clean
        params = sample_params(rng, self.ranges)
        lq_big = apply_uint8(native, params, rng, out_size=(big, big)).astype(np.float32) / 255.0
        return clean, np.ascontiguousarray(lq_big[off : off + self.crop, off : off + self.crop])

    def batch(self, stream: int, index: int, batch_size: int, degrade: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, degraded) for batch ``index`` of ``stream``; degraded is clean when ``degrade=False``."""
        rng = self.rng(stream, index)
        pairs = [self.pair(rng, degrade) for _ in range(batch_size)]
        to_t = lambda arrs: torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        clean = to_t([c for c, _ in pairs])
        return clean, (to_t([d for _, d in pairs]) if degrade else clean)


def _resize_float(region: np.ndarray, size: int) -> np.ndarray:
    """Square float HWC -> size x size, bicubic (antialiased when shrinking), clamped to [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1).unsqueeze(0)
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", antialias=size < region.shape[0],
                                        align_corners=False)
    return t.clamp(0, 1)[0].permute(1, 2, 0).numpy()
