"""A model directory of seeded random weights: speed does not depend on the weights' values."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from flowie.convert import _stage_configs, load_config, model_meta, parse_config
from flowie.model import build_stage
from flowie.modeldir import ModelDirError, read_model_dir, write_model_json
from flowie.stages import STAGE_NAMES

# The tiny test model of the reference fixtures (tiny_bfr/model_config.yaml), embedded so that
# a tiny run needs nothing but the repository.
_TINY_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 1, 1, 2],
    "num_head_channels": 16, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 64, "legacy": False,
}
TINY_CONFIG = {
    "target": "model.cldm.Reflow_ControlLDM",
    "params": {
        "scale_factor": 0.18215,
        "timesteps": 1000,
        "lora_rank": 4,
        "control_stage_config": {"target": "model.cldm.ControlNet", "params": {**_TINY_UNET, "hint_channels": 4}},
        "unet_config": {"target": "model.cldm.ControlledUnetModel", "params": dict(_TINY_UNET)},
        "first_stage_config": {
            "use_fp16": False,
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 4,
                "ddconfig": {
                    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 32, "ch_mult": [1, 2, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                },
            },
        },
        "cond_stage_config": {"target": "torch.nn.Identity"},
        "preprocess_config": {
            "target": "model.swinir.SwinIR",
            "params": {
                "img_size": 16, "patch_size": 1, "in_chans": 3, "embed_dim": 24, "depths": [2, 2],
                "num_heads": [2, 2], "window_size": 8, "mlp_ratio": 2, "sf": 8, "img_range": 1.0,
                "upsampler": "nearest+conv", "resi_connection": "1conv", "unshuffle": True, "unshuffle_scale": 8,
            },
        },
    },
}


def stage_modules(config: str | dict, seed: int = 0) -> dict[str, torch.nn.Module]:
    """``{stage: module}`` of a preset (``bfr_v1``) or config dict, float32 on the CPU, seeded weights."""
    configs = _stage_configs(parse_config(load_config(config)))
    modules = {}
    for i, stage in enumerate(STAGE_NAMES):
        torch.manual_seed(seed + i)
        modules[stage] = build_stage(stage, configs[stage]).eval().requires_grad_(False)
    return modules


def random_model_dir(path: Path, config: str | dict, seed: int = 0) -> Path:
    """Write (once) a model directory at ``path`` as `flowie convert` lays it out, random weights."""
    try:
        read_model_dir(path)
        return path
    except ModelDirError:
        pass
    spec = parse_config(load_config(config))
    path.mkdir(parents=True, exist_ok=True)
    for stage, module in stage_modules(config, seed).items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path / f"{stage}.safetensors"))
    context = torch.randn(1, 77, spec.unet.context_dim, generator=torch.Generator().manual_seed(seed))
    save_file({"null_context": context}, str(path / "null_context.safetensors"))
    write_model_json(path, model_meta(spec, tuple(context.shape), {"name": "gpu-bench random weights"}))
    return path
