"""`flowie eval`: full-reference quality of a model on held-out images, every method side by side.

For each clean image: make the degraded input (a fixed, seeded degradation preset, or the
user's own LQ file with ``paired``), then measure PSNR/SSIM (RGB and Y, border crop = the
scale factor) against the clean image for

- ``input``: the degraded image bicubic-upscaled to the clean size (what you start from),
- ``swinir``: stage 1 only (sampler ``restore_only``),
- ``mean_value``: the full pipeline, FlowIE's mean-value sampler (5-step schedule, k = 3: 4 evaluations),
- ``euler``: plain Euler with the same number of network evaluations (4),
- ``one_step``: one evaluation (x_T + v at t = 999).

All methods of one image share the same initial noise (seed), so they differ only by the sampler.
LPIPS, FID and MANIQA need network weights that FlowIE Serve never downloads; they are
reported only when the user passes weight files (and has ``pyiqa`` installed).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flowie import metrics
from flowie.params import EnhanceParams

log = logging.getLogger(__name__)

METRIC_KEYS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")
EXTRA_METRICS = ("lpips", "fid", "maniqa")
NO_EXTRA_NOTE = ("LPIPS / FID / MANIQA: not computed - they need network weights, which FlowIE Serve never "
                 "downloads. Pass --lpips-weights / --fid-weights / --maniqa-weights (with pyiqa installed) to add them.")


# The demo model's quality bar (docs/DEMO_MODEL.md): PSNR RGB gains over the bicubic input, in dB.
BAR_FULL_GAIN_DB = 0.3  # the default pipeline, on average
BAR_WORST_IMAGE_DB = 0.3  # the most the default pipeline may lose on one image
BAR_SWINIR_GAIN_DB = 0.8  # SwinIR alone, on average


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    params: dict  # EnhanceParams fields; empty for the bicubic input

    @property
    def evaluations(self) -> int:
        sampler = self.params.get("sampler")
        if sampler == "mean_value":
            from flowie.samplers import default_midpoint_index

            steps = int(self.params.get("steps", 5))
            # The official 5-step schedule stops at index 3; other step counts use the default mid-point.
            return 4 if steps == 5 else default_midpoint_index(steps) + 1
        if sampler == "euler":
            return int(self.params["steps"])
        return {"one_step": 1}.get(str(sampler), 0)


def default_methods(evaluations: int = 4) -> list[Method]:
    """input, SwinIR, mean-value (official 5-step schedule, k=3), Euler-N with the same evaluations, one-step."""
    return [
        Method("input", "degraded input (bicubic)", {}),
        Method("swinir", "SwinIR only", {"sampler": "restore_only"}),
        Method("mean_value", "full: mean-value (4 NFE)", {"sampler": "mean_value", "steps": 5}),
        Method("euler", f"full: Euler-{evaluations} ({evaluations} NFE)", {"sampler": "euler", "steps": evaluations}),
        Method("one_step", "full: one-step (1 NFE)", {"sampler": "one_step"}),
    ]


@dataclass
class EvalItem:
    name: str
    clean: np.ndarray  # uint8 HWC
    lq: np.ndarray  # uint8 HWC, small
    scale: float


@dataclass
class EvalReport:
    model: str
    degradation: dict
    methods: list[Method]
    per_image: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    extra_note: str = NO_EXTRA_NOTE
    settings: dict = field(default_factory=dict)

    def mean(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for method in self.methods:
            rows = [self.per_image[img][method.name] for img in self.per_image]
            keys = [k for k in rows[0] if all(k in r for r in rows)] if rows else []
            out[method.name] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        return out

    def bar(self) -> dict:
        """The demo's quality bar (docs/DEMO_MODEL.md), PSNR RGB over the bicubic input.

        The model's default sampler (``settings.defaults.sampler``; mean-value when unknown) gains
        >= BAR_FULL_GAIN_DB on average and loses no more than -BAR_WORST_IMAGE_DB on any image;
        SwinIR alone gains >= BAR_SWINIR_GAIN_DB.
        """
        m = self.mean()
        default = str(self.settings.get("defaults", {}).get("sampler") or "mean_value")
        if not all(k in m for k in ("input", "swinir", default)):
            return {}
        gains = [self.per_image[img][default]["psnr_rgb"] - self.per_image[img]["input"]["psnr_rgb"] for img in self.per_image]
        full = m[default]["psnr_rgb"] - m["input"]["psnr_rgb"]
        swinir = m["swinir"]["psnr_rgb"] - m["input"]["psnr_rgb"]
        return {"default_sampler": default, "gain_over_input_db": round(full, 3), "required_gain_db": BAR_FULL_GAIN_DB,
                "worst_image_gain_db": round(min(gains), 3), "required_worst_image_db": -BAR_WORST_IMAGE_DB,
                "swinir_gain_db": round(swinir, 3), "required_swinir_gain_db": BAR_SWINIR_GAIN_DB,
                "passed": bool(full >= BAR_FULL_GAIN_DB and min(gains) >= -BAR_WORST_IMAGE_DB
                               and swinir >= BAR_SWINIR_GAIN_DB)}

    def to_json(self) -> dict:
        return {"model": self.model, "degradation": self.degradation, "settings": self.settings,
                "methods": [{"name": m.name, "label": m.label, "params": m.params, "evaluations": m.evaluations}
                            for m in self.methods],
                "mean": _rounded(self.mean()), "per_image": _rounded(self.per_image), "bar": self.bar(),
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "extra_metrics": self.extra_note}

    def markdown(self) -> str:
        mean = self.mean()
        extra = [k for k in EXTRA_METRICS if any(k in v for v in mean.values())]
        head = ["method", "NFE", "PSNR RGB", "SSIM RGB", "PSNR Y", "SSIM Y", *[k.upper() for k in extra], "Δ PSNR RGB"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = mean.get("input", {}).get("psnr_rgb")
        for method in self.methods:
            row = mean[method.name]
            delta = "" if base is None or method.name == "input" else f"{row['psnr_rgb'] - base:+.2f}"
            cells = [method.label, str(method.evaluations) if method.params.get("sampler") not in (None, "restore_only") else "-",
                     f"{row['psnr_rgb']:.2f}", f"{row['ssim_rgb']:.4f}", f"{row['psnr_y']:.2f}", f"{row['ssim_y']:.4f}",
                     *[f"{row[k]:.4f}" if k in row else "n/a" for k in extra], delta]
            lines.append("| " + " | ".join(cells) + " |")
        names = ", ".join(self.per_image)
        lines += ["", f"Mean over {len(self.per_image)} images ({names}); degradation: {_describe(self.degradation)}; "
                      f"border crop {self.settings.get('crop_border')} px.", "", self.extra_note]
        bar = self.bar()
        if bar:
            lines += ["", f"Bar: default pipeline ({bar['default_sampler']}) - input = {bar['gain_over_input_db']:+.2f} dB "
                          f"(need >= +{bar['required_gain_db']:.1f}), worst image {bar['worst_image_gain_db']:+.2f} dB "
                          f"(need >= {bar['required_worst_image_db']:.1f}); SwinIR only - input = "
                          f"{bar['swinir_gain_db']:+.2f} dB (need >= +{bar['required_swinir_gain_db']:.1f}): "
                          f"{'PASSED' if bar['passed'] else 'MISSED'}."]
        return "\n".join(lines) + "\n"


def _rounded(obj):
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, float):
        return round(obj, 4) if math.isfinite(obj) else str(obj)
    return obj


def _describe(deg: dict) -> str:
    if deg.get("paired"):
        return f"user-supplied LQ images from {deg['paired']}"
    parts = []
    if deg.get("kernel", "none") != "none":
        parts.append(f"{deg['kernel']} blur sigma {deg['sigma_x']:g}")
    parts.append(f"x{deg['scale']:g} {deg['resize']} down")
    if deg.get("noise") == "gaussian":
        parts.append(f"Gaussian noise {deg['noise_sigma']:g}/255")
    elif deg.get("noise") == "poisson":
        parts.append(f"Poisson noise x{deg['poisson_scale']:g}")
    if deg.get("jpeg_quality"):
        parts.append(f"JPEG q{deg['jpeg_quality']}")
    return f"preset {deg.get('preset', '?')} (" + ", ".join(parts) + "), served back at the original size"


def make_items(images, preset: str | None = "x4_bar", paired: str | Path | None = None, seed: int = 0) -> tuple[list[EvalItem], dict]:
    """Pair each clean image with its degraded input: a seeded preset, or LQ files with the same stem."""
    from flowie.train.data import IMAGE_SUFFIXES, read_image
    from flowie.train.degrade import PRESETS, degrade_uint8

    items: list[EvalItem] = []
    if paired is not None:
        folder = Path(paired)
        files = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        for im in images:
            if im.name not in files:
                raise ValueError(f"no LQ image named {im.name}.* in {folder}")
            lq = read_image(files[im.name])
            scale = im.pixels.shape[0] / lq.shape[0]
            if abs(scale - im.pixels.shape[1] / lq.shape[1]) > 0.05 or scale < 1:
                raise ValueError(f"{im.name}: LQ {lq.shape[:2]} is not a uniform downscale of {im.pixels.shape[:2]}")
            out_hw = (math.ceil(round(lq.shape[0] * scale, 6)), math.ceil(round(lq.shape[1] * scale, 6)))
            items.append(EvalItem(im.name, im.pixels[: out_hw[0], : out_hw[1]], lq, scale))
        return items, {"paired": str(folder)}
    if preset not in PRESETS:
        raise ValueError(f"unknown degradation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    params = PRESETS[preset]
    s = int(params.scale) if float(params.scale).is_integer() else 1
    for i, im in enumerate(images):
        h, w = im.pixels.shape[0] // s * s, im.pixels.shape[1] // s * s  # mod-crop so x s is exact
        clean = np.ascontiguousarray(im.pixels[:h, :w])
        items.append(EvalItem(im.name, clean, degrade_uint8(clean, params, seed=seed + i), float(params.scale)))
    return items, {"preset": preset, "seed": seed, **params.to_dict()}


def bicubic_up(lq: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(lq).resize((hw[1], hw[0]), Image.Resampling.BICUBIC))


def evaluate(pipe, items: list[EvalItem], degradation: dict, methods: list[Method] | None = None, seed: int = 0,
             overrides: dict | None = None, crop_border: int | None = None, extra: dict | None = None,
             progress: Callable[[str], None] | None = None) -> tuple[EvalReport, dict[str, dict[str, np.ndarray]]]:
    """Run every method on every item; returns the report and the output images {image: {method: uint8}}."""
    methods = methods or default_methods()
    report = EvalReport(model=str(pipe.info.path), degradation=degradation, methods=methods)
    outputs: dict[str, dict[str, np.ndarray]] = {}
    border = crop_border
    for item in items:
        hw = item.clean.shape[:2]
        b = border if border is not None else int(round(item.scale))
        report.settings["crop_border"] = b
        outputs[item.name] = {"clean": item.clean}
        report.per_image[item.name] = {}
        for method in methods:
            start = time.perf_counter()
            if not method.params:
                result = bicubic_up(item.lq, hw)
            else:
                params = EnhanceParams(**{"upscale": item.scale, **(overrides or {}), **method.params})
                result = pipe.enhance([item.lq], params, seeds=[seed])[0].image
            report.seconds[method.name] = report.seconds.get(method.name, 0.0) + time.perf_counter() - start
            if result.shape != item.clean.shape:
                raise ValueError(f"{item.name}/{method.name}: output {result.shape} != clean {item.clean.shape}")
            outputs[item.name][method.name] = result
            report.per_image[item.name][method.name] = metrics.all_metrics(result, item.clean, crop_border=b)
            if progress:
                progress(f"{item.name} {method.name}: PSNR {report.per_image[item.name][method.name]['psnr_rgb']:.2f} dB")
    report.settings.update({"seed": seed, "overrides": overrides or {}, "defaults": pipe.info.defaults})
    if extra:
        add_extra_metrics(report, outputs, extra)
    return report, outputs


def add_extra_metrics(report: EvalReport, outputs: dict, weights: dict[str, str]) -> None:
    """LPIPS / FID / MANIQA from user-supplied weight files through pyiqa (never downloads)."""
    try:
        import pyiqa  # optional; not a dependency of FlowIE Serve
        import torch
    except ImportError as exc:
        raise RuntimeError("LPIPS/FID/MANIQA need the optional package pyiqa (pip install pyiqa) "
                           "besides the weight files") from exc
    notes = []
    for name, path in weights.items():
        if not Path(path).is_file():
            raise ValueError(f"--{name}-weights {path}: no such file")
        if name == "fid":
            notes.append("FID needs hundreds of images to mean anything; with this set it is not reported.")
            continue
        metric = pyiqa.create_metric(name, device="cpu", pretrained_model_path=str(path))
        for image, per_method in outputs.items():
            clean = torch.from_numpy(per_method["clean"]).permute(2, 0, 1)[None].float() / 255
            for method in report.methods:
                out = torch.from_numpy(per_method[method.name]).permute(2, 0, 1)[None].float() / 255
                value = metric(out, clean) if name == "lpips" else metric(out)
                report.per_image[image][method.name][name] = float(value)
    computed = [n for n in weights if n != "fid"]
    absent = [n for n in EXTRA_METRICS if n not in computed]
    report.extra_note = (f"{', '.join(n.upper() for n in computed)} from user-supplied weights. "
                         + " ".join(notes)
                         + (f" {', '.join(n.upper() for n in absent)}: not computed (no weights supplied)." if absent else ""))


def make_grid(outputs: dict[str, dict[str, np.ndarray]], report: EvalReport, cell: int = 256, crop: int = 0) -> Image.Image:
    """One row per image: clean, then every method, each labelled with its PSNR (RGB).

    ``crop`` > 0: show a ``crop`` x ``crop`` native-resolution window at the image centre
    (upsampled to the cell with nearest neighbour so pixels stay visible), else the whole image.
    """
    cols = ["clean", *[m.name for m in report.methods]]
    labels = {"clean": "clean (reference)", **{m.name: m.label for m in report.methods}}
    pad, text_h = 4, 28
    rows = []
    for image, per_method in outputs.items():
        tiles = []
        for col in cols:
            arr = per_method[col]
            if crop:
                h, w = arr.shape[:2]
                size = min(crop, h, w)
                y, x = (h - size) // 2, (w - size) // 2
                tile = Image.fromarray(arr[y : y + size, x : x + size]).resize((cell, cell), Image.Resampling.NEAREST)
            else:
                img = Image.fromarray(arr)
                ratio = cell / max(img.size)
                tile = img.resize((max(1, round(img.width * ratio)), max(1, round(img.height * ratio))), Image.Resampling.LANCZOS)
            canvas = Image.new("RGB", (cell, cell + text_h), "white")
            canvas.paste(tile, ((cell - tile.width) // 2, text_h + (cell - tile.height) // 2))
            draw = ImageDraw.Draw(canvas)
            draw.text((3, 1), labels[col][:40], fill="black")
            if col != "clean":
                m = report.per_image[image][col]
                draw.text((3, 14), f"{image}: {m['psnr_rgb']:.2f} dB / {m['ssim_rgb']:.3f}", fill="black")
            else:
                draw.text((3, 14), image, fill="black")
            tiles.append(canvas)
        rows.append(tiles)
    width = len(cols) * (cell + pad) + pad
    height = len(rows) * (cell + text_h + pad) + pad
    grid = Image.new("RGB", (width, height), (230, 230, 230))
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            grid.paste(tile, (pad + c * (cell + pad), pad + r * (cell + text_h + pad)))
    return grid


def write_outputs(report: EvalReport, outputs: dict, out_dir: str | Path, grid_crop: int = 0,
                  figure: str | Path | None = None) -> dict[str, Path]:
    """results.json, results.md, grid.png (+ a copy of the grid at ``figure``) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "grid": out / "grid.png"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    paths["markdown"].write_text(report.markdown())
    grid = make_grid(outputs, report, crop=grid_crop)
    grid.save(paths["grid"], optimize=True)
    if figure:
        Path(figure).parent.mkdir(parents=True, exist_ok=True)
        grid.save(figure, optimize=True)
        paths["figure"] = Path(figure)
    return paths


def record_in_card(model_dir: str | Path, report: EvalReport) -> None:
    """Put the mean table and the bar into model.json's card (``card.metrics``)."""
    from flowie.modeldir import read_model_dir, write_model_json

    info = read_model_dir(model_dir)
    meta = {k: v for k, v in info.meta.items() if k != "format_version"}
    card = dict(meta.get("card", {}))
    card["metrics"] = {"images": list(report.per_image), "degradation": report.degradation,
                       "settings": report.settings, "mean": _rounded(report.mean()), "bar": report.bar(),
                       "extra_metrics": report.extra_note}
    meta["card"] = card
    write_model_json(model_dir, meta)
