"""A `flowie train --arch full` result -> a model directory `flowie serve` runs, and the official .ckpt.

Both start from the official checkpoint layout (:mod:`official`): the init directory's frozen
weights plus the trained LoRA factors and ControlNet. The model directory is then made by
`flowie convert`'s own mapping (:func:`flowie.convert.map_checkpoint`), so its LoRA is merged
exactly as the converter merges an official checkpoint (W + up @ down in float64).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowie.convert import ConversionReport, ModelSpec, load_checkpoint, map_checkpoint, model_meta
from flowie.modeldir import ModelInfo, read_model_dir, write_model_json
from flowie.nets.flow_unet import UNetConfig
from flowie.nets.swinir import SwinIRConfig
from flowie.nets.vae import VaeConfig
from flowie.train.init import VAE_ENCODER, read_init
from flowie.train.official import official_state_dict


def spec_of(info: ModelInfo, lora_rank: int) -> ModelSpec:
    """The ModelSpec an init directory's model.json describes."""
    st = info.stages
    return ModelSpec(task=info.task, swinir=SwinIRConfig.from_dict(st["swinir"]),
                     vae=VaeConfig.from_dict(st["cond_encoder"]["vae"]), unet=UNetConfig.from_dict(st["flow_unet"]["unet"]),
                     scale_factor=info.scale_factor, lora_rank=lora_rank,
                     hint_source=st["cond_encoder"].get("source", "cond_encoder"),
                     hint_scale=float(st["cond_encoder"]["latent_scale"]),
                     control_scales=list(st["flow_unet"]["control_scales"]))


def official_checkpoint(init_dir: str | Path, lora: dict[str, torch.Tensor], controlnet: dict[str, torch.Tensor],
                        text_encoder: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The official-layout state dict: the init directory's frozen weights + trained LoRA and ControlNet."""
    info = read_model_dir(init_dir)
    stages = {name: load_file(str(Path(init_dir) / f"{name}.safetensors"))
              for name in ("swinir", "cond_encoder", VAE_ENCODER, "vae_decoder", "flow_unet")}
    stages["flow_unet"] = {**{k: v for k, v in stages["flow_unet"].items() if k.startswith("unet.")},
                           **{f"controlnet.{k}": v for k, v in controlnet.items()}}
    rank = int(read_init(init_dir).get("lora_rank", 0))
    return official_state_dict(stages, lora, spec_of(info, rank), text_encoder)


def export_model(init_dir: str | Path, lora: dict[str, torch.Tensor], controlnet: dict[str, torch.Tensor],
                 out: str | Path, steps: int | None = None, name: str | None = None) -> Path:
    """Write the model directory ``out`` from trained LoRA factors + ControlNet on ``init_dir``."""
    info = read_model_dir(init_dir)
    spec = spec_of(info, int(read_init(init_dir).get("lora_rank", 0)))
    report = ConversionReport()
    stages = map_checkpoint(official_checkpoint(init_dir, lora, controlnet), spec, report)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for stage, tensors in stages.items():
        path = out / f"{stage}.safetensors"
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt", "stage": stage})
        digest.update(path.read_bytes())
    context = load_file(str(info.weight_path("null_context")))["null_context"]
    save_file({"null_context": context.contiguous()}, str(out / "null_context.safetensors"), metadata={"format": "pt"})
    source = {"name": name or f"flowie-{spec.task}", "trained_by": "flowie train --arch full", "checkpoint": "",
              "init_sha256": info.source_sha256, "steps": steps, "lora_merged": report.lora_merged,
              # No source checkpoint file: the hash of the written weights keys the caches (ONNX, engines).
              "sha256": digest.hexdigest()}
    write_model_json(out, model_meta(spec, tuple(context.shape), source))
    return out


def read_state(path: str | Path) -> dict:
    """A `flowie train --arch full` state.pt (weights_only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "lora" not in state or "controlnet" not in state:
        raise ValueError(f"{path} is not a `flowie train --arch full` checkpoint (state.pt)")
    return state


def export_checkpoint(state_path: str | Path, out: str | Path | None = None, init_dir: str | Path | None = None,
                      official_ckpt: str | Path | None = None, text_encoder_from: str | Path | None = None) -> dict:
    """`flowie export-model`: a state.pt -> a model directory and/or an official-layout .ckpt."""
    state = read_state(state_path)
    init_dir = init_dir or state["init"]
    written = {}
    if out:
        written["model_dir"] = str(export_model(init_dir, state["lora"], state["controlnet"], out, steps=int(state["step"])))
    if official_ckpt:
        text = None
        if text_encoder_from:
            text = {k: v for k, v in load_checkpoint(text_encoder_from).items() if k.startswith("cond_stage_model.")}
        sd = official_checkpoint(init_dir, state["lora"], state["controlnet"], text)
        path = Path(official_ckpt)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": sd}, tmp)
        tmp.replace(path)
        written["official_ckpt"] = str(path)
        written["official_tensors"] = len(sd)
        written["text_encoder"] = bool(text)
    return written
