"""Build the four stage networks from model.json and load their safetensors weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from flowie.modeldir import ModelInfo
from flowie.nets.flow_unet import FlowUNet, UNetConfig
from flowie.nets.swinir import SwinIR, SwinIRConfig
from flowie.nets.vae import CondEncoder, VaeConfig, VaeDecoder
from flowie.stages import STAGE_NAMES

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def build_stage(name: str, stage_cfg: dict) -> nn.Module:
    """An untrained network of one stage from its model.json block."""
    if name == "swinir":
        return SwinIR(SwinIRConfig.from_dict(stage_cfg))
    if name == "cond_encoder":
        return CondEncoder(VaeConfig.from_dict(stage_cfg["vae"]), latent_scale=stage_cfg["latent_scale"])
    if name == "flow_unet":
        return FlowUNet(UNetConfig.from_dict(stage_cfg["unet"]), control_scales=stage_cfg.get("control_scales"))
    if name == "vae_decoder":
        return VaeDecoder(VaeConfig.from_dict(stage_cfg["vae"]), scale_factor=stage_cfg["scale_factor"])
    raise ValueError(f"unknown stage {name!r}")


def build_stages(stages_cfg: dict, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """All four networks; ``device='meta'`` builds them without allocating memory."""
    with torch.device(device):
        return {name: build_stage(name, stages_cfg[name]) for name in STAGE_NAMES}


def load_stage(info: ModelInfo, name: str, device="cpu", dtype: str | torch.dtype = "float32") -> nn.Module:
    """Build one stage and load its weights strictly; eval mode, no grad."""
    with torch.device("meta"):
        module = build_stage(name, info.stages[name])
    state = load_file(str(info.weight_path(name)), device="cpu")
    module.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(module, info.stages[name], name)
    module = module.to(device=device, dtype=parse_dtype(dtype)).eval()
    module.requires_grad_(False)
    return module


def _materialise_buffers(module: nn.Module, stage_cfg: dict, name: str) -> None:
    """Non-persistent buffers (SwinIR masks, RGB mean) are rebuilt on the CPU after a meta build."""
    if not any(b.is_meta for b in module.buffers()):
        return
    fresh = build_stage(name, stage_cfg) if name == "swinir" else None
    if fresh is None:
        return
    fresh_buffers = dict(fresh.named_buffers())
    for full_name, buf in list(module.named_buffers()):
        if buf.is_meta:
            owner_name, _, leaf = full_name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._buffers[leaf] = fresh_buffers[full_name]


def load_null_context(info: ModelInfo) -> torch.Tensor:
    return load_file(str(info.weight_path("null_context")))["null_context"]


def model_dir_path(path: str | Path) -> Path:
    return Path(path)
