"""The model card (``model.json`` ``card``) of a model written by `flowie train`: data, objectives, training record."""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flowie.train.trainer import Trainer


def model_card(trainer: Trainer, phases_order: tuple[str, ...], extra: dict | None = None) -> dict:
    cfg = trainer.cfg
    phases = {}
    for phase in phases_order:
        if phase not in cfg.phases:
            continue
        hist = trainer.history.get(phase, {})
        pc = cfg.phases[phase]
        phases[phase] = {**asdict(pc), "steps_done": hist.get("steps", 0), "seconds": round(hist.get("seconds", 0.0), 1),
                         "loss_first": hist.get("first"), "loss_last_ema": hist.get("ema")}
    card = {
        "description": "Small FlowIE-architecture model trained from scratch on CPU by `flowie train`: "
                       "general restoration x1-x4 (blur, downsampling, noise, JPEG). A demo, not the official weights.",
        "data": {"images": cfg.images, "split": split_note(cfg.images),
                 "files": list(trainer._sampler().names), "crop_work_scale": list(cfg.work_scale),
                 "degradation": {"order": "blur -> downsample -> noise -> JPEG -> bicubic up", **cfg.ranges.to_dict()}},
        "objectives": {
            "swinir": "L1" + (f" + {cfg.ssim_weight} x (1 - SSIM)" if cfg.ssim_weight else "") + " to the clean crop",
            "vae": f"L1 reconstruction + {cfg.kl_weight:g} x KL; scale_factor = 1/std(latent mean)",
            "cond_encoder": "init from the VAE encoder; MSE of its latent of the SwinIR output to the VAE latent "
                            "of the clean crop",
            "flow": "rectified flow: x_t = t x_T + (1-t) x_0, t ~ U(0,1] seen as t*999, MSE to v = x_0 - x_T, "
                    "hint = cond latent of the SwinIR output"
                    + (f"; LoRA rank {cfg.lora_rank} on a frozen base UNet" if cfg.lora_rank else ""),
        },
        "null_context": {"shape": list(trainer.null_context.shape), "how": f"torch.randn with seed {cfg.seed + 77}",
                         "why": "the demo has no text encoder; the constant context stands in for the null prompt"},
        "training": {"seed": cfg.seed, "threads": cfg.threads, "workers": cfg.workers, "device": cfg.device,
                     "bf16": cfg.bf16, "torch": torch.__version__, "machine": platform.machine(),
                     "init_from": cfg.init_from, "phases": phases,
                     "wall_seconds": round(wall_seconds(phases, parallel=cfg.workers > 1), 1)},
        "scale_factor": trainer.scale_factor,
    }
    if extra:
        card.update(extra)
    return card


def wall_seconds(phases: dict[str, dict], parallel: bool) -> float:
    """Training wall-clock: with workers > 1 stage 1 and the VAE overlap, so only the longer counts."""
    seconds = {p: float(v["seconds"]) for p, v in phases.items()}
    if parallel and "swinir" in seconds and "vae" in seconds:
        return sum(seconds.values()) - min(seconds["swinir"], seconds["vae"])
    return sum(seconds.values())


def split_note(images: str) -> str:
    if images == "skimage":
        from flowie.train.data import SKIMAGE_HOLDOUT, SKIMAGE_TRAIN

        return f"scikit-image colour images {', '.join(SKIMAGE_TRAIN)}; held out: {', '.join(SKIMAGE_HOLDOUT)}"
    if not Path(images).is_dir():
        return f"the images listed in files ({images}); scikit-image's coffee and rocket are never trained on"
    return f"all images in {images}"
