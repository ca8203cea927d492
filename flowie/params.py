"""Request parameters of one enhancement (torch-free: the HTTP process validates with these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Sampler = Literal["mean_value", "euler", "one_step", "ddpm", "ddim", "dpm_solver", "restore_only"]
ColorFix = Literal["wavelet", "adain", "none"]
TileMode = Literal["auto", "on", "off"]

SAMPLERS: tuple[str, ...] = ("mean_value", "euler", "one_step", "ddpm", "ddim", "dpm_solver", "restore_only")
# Which samplers fit which kind of model (model.json "family"): flow samplers read the network's
# output as a velocity, diffusion samplers as eps or v of a DDPM; restore_only runs SwinIR alone.
FAMILY_SAMPLERS: dict[str, tuple[str, ...]] = {
    "flowie": ("mean_value", "euler", "one_step", "restore_only"),
    "diffbir": ("ddpm", "ddim", "dpm_solver", "restore_only"),
}
COLOR_FIXES: tuple[str, ...] = ("wavelet", "adain", "none")
TILE_MODES: tuple[str, ...] = ("auto", "on", "off")
# Whole photos (flowie.faces.restore): ``detect`` finds and aligns the faces first; ``aligned``
# takes the upload as one aligned face. Backgrounds: another served model, the face model's
# stage 1, or a plain resize.
FACE_MODES: tuple[str, ...] = ("detect", "aligned")
BACKGROUNDS: tuple[str, ...] = ("model", "swinir", "resize")
FACE_TASKS: tuple[str, ...] = ("bfr",)  # tasks whose models restore aligned faces
FACE_CROP_SIDE = 512  # side of an aligned face crop (the FFHQ template), pixels


def default_face_mode(task: str) -> str:
    """``detect`` for a face model (whole photos, as the official BFR script), else ``aligned``."""
    return "detect" if task in FACE_TASKS else "aligned"

MAX_STEPS = 50
MAX_UPSCALE = 8.0


class ParamError(ValueError):
    """A request parameter is out of range; the message says which and what is allowed."""


@dataclass(frozen=True)
class EnhanceParams:
    """What to do with one image. ``None`` fields take the model's defaults (model.json)."""

    sampler: str | None = None
    steps: int | None = None
    color_fix: str | None = None
    upscale: float | None = None
    min_side: int | None = None
    tile: str | None = None
    seed: int | None = None
    faces: str | None = None
    background: str | None = None

    def validate(self) -> EnhanceParams:
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ParamError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.color_fix is not None and self.color_fix not in COLOR_FIXES:
            raise ParamError(f"color_fix must be one of {', '.join(COLOR_FIXES)}, got {self.color_fix!r}")
        if self.tile is not None and self.tile not in TILE_MODES:
            raise ParamError(f"tile must be one of {', '.join(TILE_MODES)}, got {self.tile!r}")
        if self.faces is not None and self.faces not in FACE_MODES:
            raise ParamError(f"faces must be one of {', '.join(FACE_MODES)}, got {self.faces!r}")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ParamError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if self.steps is not None and not (1 <= int(self.steps) <= MAX_STEPS):
            raise ParamError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if self.upscale is not None and not (1.0 <= float(self.upscale) <= MAX_UPSCALE):
            raise ParamError(f"upscale must be between 1 and {MAX_UPSCALE:g}, got {self.upscale}")
        if self.min_side is not None and not (0 <= int(self.min_side) <= 4096):
            raise ParamError(f"min_side must be between 0 and 4096, got {self.min_side}")
        if self.seed is not None and not (0 <= int(self.seed) < 2**63):
            raise ParamError(f"seed must be between 0 and 2**63-1, got {self.seed}")
        return self

    def check_family(self, family: str) -> EnhanceParams:
        """Refuse a sampler the model's family cannot run, naming the ones it can."""
        allowed = FAMILY_SAMPLERS.get(family)
        if allowed is None:
            raise ParamError(f"unknown model family {family!r}; expected one of {', '.join(FAMILY_SAMPLERS)}")
        if self.sampler is not None and self.sampler not in allowed:
            raise ParamError(f"sampler {self.sampler!r} does not fit this {family} model; it supports "
                             f"{', '.join(allowed)}")
        return self

    def with_defaults(self, defaults: dict) -> EnhanceParams:
        """Fill every ``None`` field from a model's ``defaults`` block."""
        filled = {k: (v if v is not None else defaults.get(k)) for k, v in asdict(self).items()}
        return EnhanceParams(**filled)
