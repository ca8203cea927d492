"""Our stage weights + LoRA factors -> the official FlowIE checkpoint layout (``Reflow_ControlLDM``).

The inverse of :mod:`flowie.keymap`'s maps: the UNet goes back to ``model.diffusion_model.*`` with
the LoRA layers in lora_diffusion's layout (``<p>.linear.weight``/``.bias``, ``<p>.lora_down.weight``
[r, in], ``<p>.lora_up.weight`` [out, r]), the ControlNet to ``control_model.*``, the VAE to ldm
names under ``first_stage_model.*`` (mid-block attention projections as 1x1 convs), the cond
encoder to ``cond_encoder.*``, SwinIR to ``preprocess_model.*`` with its index and mask buffers,
and the 13 DDPM schedule buffers of the official config (linear_start 0.00085, linear_end 0.012).

The text encoder (``cond_stage_model.*``) is not ours to write: it is copied from a Stable
Diffusion checkpoint when one is given, otherwise the official code must load with strict=False.
The model directory export goes through this layout and `flowie convert`'s own mapping, so an
exported model merges its LoRA exactly as `flowie convert` merges the official checkpoint.
"""

from __future__ import annotations

import torch

from flowie import keymap
from flowie.convert import ModelSpec
from flowie.nets.swinir import SwinIR


def _invert(prefix_map: dict[str, str]) -> dict[str, str]:
    return {ours: official for official, ours in prefix_map.items()}


def _to_official(state: dict[str, torch.Tensor], prefix_map: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    inverse = _invert(prefix_map)
    out = {}
    for key, value in state.items():
        official = keymap.map_key(key, inverse)
        if official is None:
            raise KeyError(f"no official name for {key}")
        out[prefix + official] = value
    return out


def unet_official(unet: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Our UNet base (diffusers names) + LoRA factors keyed ``<module>.lora_down.weight`` -> ``model.diffusion_model.*``."""
    out: dict[str, torch.Tensor] = {}
    modules = {k[: -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
    for key, value in unet.items():
        module, _, leaf = key.rpartition(".")
        if module in modules:
            key = f"{module}.linear.{leaf}"
        out[key] = value
    for key, value in lora.items():
        if key.rsplit(".", 2)[0] not in modules:
            raise KeyError(f"LoRA factor {key} without its layer")
        out[key] = value
    inverse = _invert(keymap.unet_map(spec.unet))
    result = {}
    for key, value in out.items():
        official = keymap.map_key(key, inverse)
        if official is None:
            raise KeyError(f"no official name for UNet tensor {key}")
        result["model.diffusion_model." + official] = value
    return result


def _vae_official(state: dict[str, torch.Tensor], spec: ModelSpec, half: str, prefix: str) -> dict[str, torch.Tensor]:
    fn = keymap.vae_encoder_map if half == "encoder" else keymap.vae_decoder_map
    out = _to_official(state, fn(spec.vae), prefix)
    for key, value in out.items():  # ldm's mid attention projections are 1x1 convs
        if ".mid.attn_1." in key and key.endswith(".weight") and value.dim() == 2:
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def schedule_buffers(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> dict[str, torch.Tensor]:
    """ldm DDPM.register_schedule for the linear schedule (v_posterior 0, logvar_init 0), as float32."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    tables = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev, "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(), "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        "logvar": torch.zeros(timesteps, dtype=torch.float64),
    }
    return {k: v.to(torch.float32) for k, v in tables.items()}


def official_state_dict(stages: dict[str, dict[str, torch.Tensor]], lora: dict[str, torch.Tensor], spec: ModelSpec,
                        text_encoder: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The official checkpoint's state dict from our stages (``swinir``, ``cond_encoder``, ``vae_encoder``,
    ``vae_decoder``, ``flow_unet`` with its ``unet.``/``controlnet.`` halves) and the UNet's LoRA factors."""
    flow = stages["flow_unet"]
    unet = {k[len("unet."):]: v for k, v in flow.items() if k.startswith("unet.")}
    control = {k[len("controlnet."):]: v for k, v in flow.items() if k.startswith("controlnet.")}
    out = unet_official(unet, lora, spec)
    out.update(_to_official(control, keymap.controlnet_map(spec.unet), "control_model."))
    out.update(_vae_official(stages["vae_encoder"], spec, "encoder", "first_stage_model."))
    out.update(_vae_official(stages["vae_decoder"], spec, "decoder", "first_stage_model."))
    if spec.hint_source == "cond_encoder":
        out.update(_vae_official(stages["cond_encoder"], spec, "encoder", "cond_encoder."))
    out.update({"preprocess_model." + k: v for k, v in stages["swinir"].items()})
    swinir = SwinIR(spec.swinir)  # the index and mask buffers the official module registers
    for name, buf in swinir.named_buffers():
        if name.endswith((".attn_mask", ".relative_position_index")):
            out["preprocess_model." + name] = buf.clone()
    out.update(schedule_buffers())
    if text_encoder:
        out.update({k: v for k, v in text_encoder.items() if k.startswith("cond_stage_model.")})
    return out

