"""Official FlowIE checkpoint (+ its model config) -> a model directory of safetensors files.

Strict about the official layout (every inference key present, right shapes, nothing
unexplained left over), tolerant of its relatives: no LoRA, no ``cond_encoder`` (the
first-stage encoder stands in), a diffusers-named VAE (the official BSR model), or a VAE
supplied separately with ``vae_path``. DiffBIR v1 (``model.cldm.ControlLDM``) checkpoints
are the same networks without LoRA, served as a diffusion model (family ``diffbir``); its
stage 1 can be replaced by a separate SwinIR file (``swinir``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from flowie import keymap
from flowie.modeldir import file_sha256, write_model_json
from flowie.nets.flow_unet import UNetConfig
from flowie.nets.swinir import SwinIRConfig
from flowie.nets.vae import VaeConfig
from flowie.presets import PRESETS

log = logging.getLogger(__name__)

SCHEDULE_BUFFERS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 logvar lvlb_weights".split()
)
# Official BFR sampler: Euler over these, returning x_T + v at index 3 (mean-value sampling).
OFFICIAL_BFR_TIMESTEPS = [999, 799, 599, 399, 199]
OFFICIAL_BSR_T = 400.0
# Official DiffBIR v1: 50 respaced DDPM steps (the README's commands), wavelet colour fix.
DIFFBIR_DEFAULT_STEPS = 50
DIFFBIR_TARGET = "model.cldm.ControlLDM"


class ConversionError(ValueError):
    """The checkpoint or config cannot be converted; the message lists the offending keys."""


@dataclass
class ModelSpec:
    """Everything model.json needs, parsed from an official config."""

    task: str
    swinir: SwinIRConfig
    vae: VaeConfig
    unet: UNetConfig
    scale_factor: float
    lora_rank: int
    # "cond_encoder" (official BFR) or "first_stage" (official BSR: first-stage encoder)
    hint_source: str
    hint_scale: float
    control_scales: list[float] = field(default_factory=list)
    family: str = "flowie"  # "flowie" (rectified flow) or "diffbir" (DDPM, DiffBIR v1)
    prediction: str = "v"  # what the UNet outputs: "v" (flow velocity / DDPM v) or "eps"
    schedule: dict = field(default_factory=dict)  # DDPM training schedule (diffusion.Schedule)


@dataclass
class ConversionReport:
    used: int = 0
    lora_merged: int = 0
    ignored: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ignore(self, reason: str) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1


# ---------------------------------------------------------------- config


def load_config(config: str | Path | dict) -> dict:
    """A preset name (bfr_v1, bsr_v1, diffbir_*_v1), a YAML path in the official format, or a dict."""
    if isinstance(config, dict):
        return config
    if str(config) in PRESETS:
        return PRESETS[str(config)]
    path = Path(config)
    if not path.is_file():
        raise ConversionError(f"config {config!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and "model" in data and "target" not in data:
        data = data["model"]  # a full training config that nests the model
    if not isinstance(data, dict) or "params" not in data:
        raise ConversionError(f"{path} is not an official FlowIE model config (no target/params)")
    return data


def _swinir_from(params: dict) -> SwinIRConfig:
    if params.get("patch_size", 1) != 1 or not params.get("unshuffle", True):
        raise ConversionError("only the DiffBIR SwinIR (patch_size 1, unshuffle true) is supported")
    return SwinIRConfig.from_dict(params)


def _unet_from(params: dict) -> UNetConfig:
    if not params.get("use_spatial_transformer", True):
        raise ConversionError("only UNets with spatial transformers (SD2.x) are supported")
    if params.get("legacy", False) and params.get("num_head_channels", -1) != -1:
        log.warning("legacy=True with num_head_channels: heads follow num_head_channels")
    depth = params.get("transformer_depth", 1)
    if isinstance(depth, (list, tuple)):
        raise ConversionError("per-level transformer_depth lists are not supported")
    return UNetConfig.from_dict(
        {
            **params,
            "hint_channels": params.get("hint_channels", 4),
            "num_heads": params.get("num_heads", -1),
            "use_linear_in_transformer": params.get("use_linear_in_transformer", False),
        }
    )


def parse_config(config: dict, task: str | None = None) -> ModelSpec:
    params = config["params"]
    target = str(config.get("target", ""))
    family = "diffbir" if target == DIFFBIR_TARGET else "flowie"
    if task is None:
        task = "diffbir" if family == "diffbir" else "bsr" if "cldm_bsr" in target else "bfr"
    ctrl = _unet_from(params["control_stage_config"]["params"])
    unet = _unet_from(params["unet_config"]["params"])
    if {**ctrl.to_dict(), "hint_channels": 0} != {**unet.to_dict(), "hint_channels": 0}:
        raise ConversionError("control_stage_config and unet_config describe different networks")
    dd = params["first_stage_config"]["params"]["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ConversionError("VAEs with attention inside the resolution levels are not supported")
    vae = VaeConfig.from_dict({**dd, "embed_dim": params["first_stage_config"]["params"].get("embed_dim", 4)})
    scale = float(params.get("scale_factor", 0.18215))
    official_bsr = task == "bsr" and family == "flowie"
    prediction = "v"
    if family == "diffbir":
        prediction = str(params.get("parameterization", "eps"))
        if prediction not in ("eps", "v"):
            raise ConversionError(f"parameterization {prediction!r} is not supported (eps or v)")
        if params.get("beta_schedule", "linear") != "linear":
            raise ConversionError(f"beta_schedule {params['beta_schedule']!r} is not supported (linear)")
    schedule = {"num_timesteps": int(params.get("timesteps", 1000)),
                "linear_start": float(params.get("linear_start", 0.00085)),
                "linear_end": float(params.get("linear_end", 0.012)), "beta_schedule": "linear"}
    return ModelSpec(
        task=task,
        swinir=_swinir_from(params["preprocess_config"]["params"]),
        vae=vae,
        unet=unet,
        scale_factor=scale,
        lora_rank=int(params.get("lora_rank", 0) or 0),
        hint_source="first_stage" if official_bsr else "cond_encoder",
        hint_scale=1.0 if official_bsr else scale,
        control_scales=[1.0] * unet.num_controls,
        family=family,
        prediction=prediction,
        schedule=schedule,
    )


# ---------------------------------------------------------------- checkpoint


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A Lightning ``.ckpt``/``.pth`` (read with weights_only=True) or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # unpickling refused or a corrupt file: say which and why
        raise ConversionError(
            f"cannot read {path} as a weights-only torch checkpoint ({type(exc).__name__}: {exc}). "
            "Only tensors/dicts are accepted; convert foreign pickles to safetensors first."
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return obj


def load_null_context_file(path: str | Path) -> torch.Tensor:
    """The null-prompt embedding [1,77,C]: official .pth (key null_prompt_embeds), .safetensors or .npy."""
    path = Path(path)
    if path.suffix == ".npy":
        tensor = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".safetensors":
        data = load_file(str(path))
        tensor = data.get("null_context", data.get("null_prompt_embeds", next(iter(data.values()))))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        tensor = obj["null_prompt_embeds"] if isinstance(obj, dict) else obj
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3 or tensor.shape[0] != 1:
        raise ConversionError(f"null context in {path} has shape {tuple(tensor.shape)}; expected [1, 77, C]")
    return tensor.to(torch.float32).contiguous()


def _take(sd: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _merge_lora(sub: dict[str, torch.Tensor], report: ConversionReport) -> dict[str, torch.Tensor]:
    """W_eff = W + up @ down (the official LoRA has scale 1.0 and no alpha/r); `.linear.` renamed away."""
    out: dict[str, torch.Tensor] = {}
    downs = {k[: -len(".lora_down.weight")]: v for k, v in sub.items() if k.endswith(".lora_down.weight")}
    ups = {k[: -len(".lora_up.weight")]: v for k, v in sub.items() if k.endswith(".lora_up.weight")}
    if set(downs) != set(ups):
        raise ConversionError(f"LoRA factors without partner: {sorted(set(downs) ^ set(ups))[:10]}")
    for key, value in sub.items():
        if ".lora_down." in key or ".lora_up." in key:
            continue
        base = key
        for leaf in (".linear.weight", ".linear.bias"):
            if key.endswith(leaf):
                base = key[: -len(leaf)] + leaf.replace(".linear", "")
                module = key[: -len(leaf)]
                if leaf == ".linear.weight":
                    if module not in downs:
                        raise ConversionError(f"{key} is a LoRA-wrapped linear without lora factors")
                    if value.is_meta:
                        value = value + ups[module] @ downs[module]
                    else:
                        delta = ups[module].to(torch.float64) @ downs[module].to(torch.float64)
                        value = (value.to(torch.float64) + delta).to(value.dtype)
                    report.lora_merged += 1
        out[base] = value
    orphan = set(downs) - {k[: -len(".linear.weight")] for k in sub if k.endswith(".linear.weight")}
    if orphan:
        raise ConversionError(f"LoRA factors for layers that are not wrapped: {sorted(orphan)[:10]}")
    return out


def _remap(sub: dict[str, torch.Tensor], prefix_map: dict[str, str], where: str) -> dict[str, torch.Tensor]:
    out, unmapped = {}, []
    for key, value in sub.items():
        new = keymap.map_key(key, prefix_map)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise ConversionError(f"unexpected keys under {where}: {sorted(unmapped)[:20]} ({len(unmapped)} in all)")
    return out


def _vae_part(sd: dict, prefix: str, cfg: VaeConfig, half: str) -> dict[str, torch.Tensor]:
    """Encoder (+quant_conv) or decoder (+post_quant_conv) of a VAE under ``prefix``, ldm or diffusers names."""
    sub = _take(sd, prefix)
    names = ("encoder.", "quant_conv.") if half == "encoder" else ("decoder.", "post_quant_conv.")
    sub = {k: v for k, v in sub.items() if k.startswith(names)}
    diffusers_named = any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sub)
    if diffusers_named:
        out = {keymap.diffusers_vae_key(k): v for k, v in sub.items()}
    else:
        fn = keymap.vae_encoder_map if half == "encoder" else keymap.vae_decoder_map
        out = _remap(sub, fn(cfg), prefix + half)
    # ldm stores the mid attention projections as 1x1 convs; diffusers uses Linear layers.
    for key, value in out.items():
        if ".attentions." in key and key.endswith(".weight") and value.dim() == 4:
            out[key] = value.reshape(value.shape[0], value.shape[1])
    return out


def map_checkpoint(sd: dict[str, torch.Tensor], spec: ModelSpec, report: ConversionReport | None = None,
                   vae_sd: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Official state dict -> {stage: our state dict}. Raises ConversionError on anything unexplained."""
    report = report if report is not None else ConversionReport()
    if vae_sd is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
        sd.update({"first_stage_model." + k.removeprefix("first_stage_model."): v for k, v in vae_sd.items()})
    known_prefixes = ("model.diffusion_model.", "control_model.", "first_stage_model.", "cond_encoder.",
                      "preprocess_model.", "cond_stage_model.", "model_ema.")
    leftovers = []
    for key in sd:
        if key in SCHEDULE_BUFFERS:
            report.ignore("diffusion schedule buffers (unused by rectified flow)" if spec.family == "flowie" else
                          "diffusion schedule buffers (the sampler recomputes them in float64 from model.json)")
        elif key.startswith("cond_stage_model."):
            report.ignore("cond_stage_model.* (text encoder; the null context comes from --null-context)")
        elif key.startswith("model_ema."):
            report.ignore("model_ema.* (EMA copy; not used at inference)")
        elif not key.startswith(known_prefixes):
            leftovers.append(key)
    if leftovers:
        raise ConversionError(f"unexpected top-level keys: {sorted(leftovers)[:20]} ({len(leftovers)} in all)")

    stages: dict[str, dict[str, torch.Tensor]] = {}

    # SwinIR: official names are ours; its deterministic buffers are recomputed, not loaded.
    swin = _take(sd, "preprocess_model.")
    if not swin:
        raise ConversionError("no preprocess_model.* (SwinIR) keys in the checkpoint")
    stages["swinir"] = {}
    for key, value in swin.items():
        if key.endswith((".attn_mask", ".relative_position_index")):
            report.ignore("SwinIR attn_mask / relative_position_index buffers (recomputed)")
        else:
            stages["swinir"][key] = value

    # Condition encoder.
    has_cond = any(k.startswith("cond_encoder.") for k in sd)
    if spec.hint_source == "cond_encoder" and not has_cond:
        report.notes.append("no cond_encoder.* in the checkpoint: using the first-stage VAE encoder for the hint")
        spec.hint_source = "first_stage"
    if spec.hint_source == "cond_encoder":
        stages["cond_encoder"] = _vae_part(sd, "cond_encoder.", spec.vae, "encoder")
        if any(k.startswith("first_stage_model.encoder.") for k in sd):
            report.ignored["first_stage_model encoder + quant_conv (BFR uses cond_encoder)"] = sum(
                1 for k in sd if k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv.")))
    else:
        if has_cond:
            report.ignored["cond_encoder.* (this task takes its hint from the first-stage encoder)"] = sum(
                1 for k in sd if k.startswith("cond_encoder."))
        stages["cond_encoder"] = _vae_part(sd, "first_stage_model.", spec.vae, "encoder")
    stages["vae_decoder"] = _vae_part(sd, "first_stage_model.", spec.vae, "decoder")
    for stage in ("cond_encoder", "vae_decoder"):
        if not stages[stage]:
            raise ConversionError(
                f"no weights for {stage} (first_stage_model.* missing?). The official BSR code would fall back to "
                "sd-vae-ft-ema; pass that VAE's weights with --vae FILE."
            )

    # Flow UNet: base UNet with LoRA merged + ControlNet.
    unet_sub = _take(sd, "model.diffusion_model.")
    if not unet_sub:
        raise ConversionError("no model.diffusion_model.* (UNet) keys in the checkpoint")
    has_lora = any(".lora_down." in k for k in unet_sub)
    if has_lora:
        unet_sub = _merge_lora(unet_sub, report)
    elif spec.lora_rank and spec.task == "bfr" and spec.family == "flowie":
        report.notes.append("config names a LoRA rank but the checkpoint has no LoRA factors: using the base UNet")
    unet = _remap(unet_sub, keymap.unet_map(spec.unet), "model.diffusion_model")
    control_sub = _take(sd, "control_model.")
    if not control_sub:
        raise ConversionError("no control_model.* (ControlNet) keys in the checkpoint")
    control = _remap(control_sub, keymap.controlnet_map(spec.unet), "control_model")
    stages["flow_unet"] = {**{f"unet.{k}": v for k, v in unet.items()},
                           **{f"controlnet.{k}": v for k, v in control.items()}}
    report.used = sum(len(v) for v in stages.values())
    return stages


def check_against_modules(stages: dict[str, dict[str, torch.Tensor]], modules: dict[str, torch.nn.Module]) -> None:
    """Every parameter of our networks gets a tensor of the same shape; nothing is left over."""
    problems = []
    for name, module in modules.items():
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in stages[name].items()}
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        if missing:
            problems.append(f"{name}: missing {len(missing)} keys, e.g. {missing[:8]}")
        if extra:
            problems.append(f"{name}: unexpected {len(extra)} keys, e.g. {extra[:8]}")
        if wrong:
            problems.append(f"{name}: shape mismatch, e.g. " + ", ".join(f"{k} {got[k]} vs {expected[k]}" for k in wrong[:5]))
    if problems:
        raise ConversionError("checkpoint does not fit the configured networks:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------- model.json


def model_meta(spec: ModelSpec, null_context_shape: tuple[int, ...], source: dict) -> dict:
    official_bsr = spec.task == "bsr" and spec.family == "flowie"
    meta = {
        "task": spec.task,
        "name": source.get("name", spec.task if spec.task == spec.family else f"{spec.family}-{spec.task}"),
        "family": spec.family,
        "prediction": spec.prediction,
        "schedule": spec.schedule,
        "scale_factor": spec.scale_factor,
        "stages": {
            "swinir": spec.swinir.to_dict(),
            "cond_encoder": {"vae": spec.vae.to_dict(), "latent_scale": spec.hint_scale, "source": spec.hint_source},
            "flow_unet": {"unet": spec.unet.to_dict(), "control_scales": spec.control_scales},
            "vae_decoder": {"vae": spec.vae.to_dict(), "scale_factor": spec.scale_factor},
            "null_context": {"shape": list(null_context_shape)},
        },
        "defaults": {
            "sampler": "one_step" if official_bsr else "mean_value",
            "steps": 5,
            # Official BSR applies no colour fix in untiled mode; BFR's CLI default is wavelet.
            "color_fix": "none" if official_bsr else "wavelet",
            "upscale": 4.0 if official_bsr else 1.0,
            "min_side": 512,
            "tile": "auto",
        },
        "sampler_config": {
            "mean_value": {"timesteps": OFFICIAL_BFR_TIMESTEPS, "midpoint_index": 3},
            "euler": {"t_start": 999.0},
            # BSR official: one evaluation at t=400 on x_T, decode the network output itself.
            # For BFR-style models one Euler step from t=999: x_T + v.
            "one_step": {"t": OFFICIAL_BSR_T, "output": "v"} if official_bsr else {"t": 999.0, "output": "x_plus_v"},
        },
        "tiling": {"latent_tile": 64, "latent_stride": 56, "max_untiled_pixels": 1024 * 1024},
        "source": source,
    }
    if spec.family == "diffbir":
        # Official inference.py: --steps 50 (README), wavelet, sr_scale 1, auto_resize to 512.
        meta["defaults"].update({"sampler": "ddpm", "steps": DIFFBIR_DEFAULT_STEPS})
        meta["sampler_config"] = {}
    return meta


def replace_swinir(sd: dict[str, torch.Tensor], swinir_sd: dict[str, torch.Tensor], report: ConversionReport
                   ) -> dict[str, torch.Tensor]:
    """``preprocess_model.*`` replaced by a separate SwinIR file (DiffBIR's ``--reload_swinir``).

    The file holds bare SwinIR keys (``module.`` or ``preprocess_model.`` prefixes are removed).
    """
    bare = {}
    for key, value in swinir_sd.items():
        for prefix in ("module.", "preprocess_model."):
            key = key.removeprefix(prefix)
        bare[key] = value
    if not any(k.startswith(("conv_first.", "layers.")) for k in bare):
        raise ConversionError("the --swinir file holds no SwinIR keys (conv_first.*, layers.*)")
    replaced = [k for k in sd if k.startswith("preprocess_model.")]
    if replaced:
        report.ignored["preprocess_model.* (replaced by the --swinir file)"] = len(replaced)
    out = {k: v for k, v in sd.items() if not k.startswith("preprocess_model.")}
    out.update({"preprocess_model." + k: v for k, v in bare.items()})
    return out


def convert(checkpoint: str | Path, config: str | Path | dict, out_dir: str | Path, null_context: str | Path,
            task: str | None = None, vae: str | Path | None = None, name: str | None = None,
            progress: Callable[[str], None] | None = None, swinir: str | Path | None = None) -> ConversionReport:
    """Convert an official checkpoint into ``out_dir``; returns what was used and ignored."""
    from flowie.model import build_stages  # imported here: builds networks, heavy

    say = progress or (lambda msg: log.info(msg))
    spec = parse_config(load_config(config), task=task)
    say(f"reading {checkpoint}")
    sd = load_checkpoint(checkpoint)
    vae_sd = load_checkpoint(vae) if vae else None
    context = load_null_context_file(null_context)
    if context.shape[-1] != spec.unet.context_dim:
        raise ConversionError(
            f"null context width {context.shape[-1]} != the UNet's context_dim {spec.unet.context_dim}"
        )
    report = ConversionReport()
    if swinir:
        say(f"reading stage 1 from {swinir}")
        sd = replace_swinir(sd, load_checkpoint(swinir), report)
    say("mapping keys and merging LoRA")
    stages = map_checkpoint(sd, spec, report, vae_sd=vae_sd)
    say("checking shapes against the networks")
    check_against_modules(stages, build_stages(_stage_configs(spec), device="meta"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say("hashing the source checkpoint")
    source = {
        "checkpoint": Path(checkpoint).name,
        "sha256": file_sha256(checkpoint),
        "config": str(config) if not isinstance(config, dict) else "dict",
        "null_context_sha256": file_sha256(null_context),
        "name": name or (spec.task if spec.task == spec.family else f"{spec.family}-{spec.task}"),
    }
    if swinir:
        source.update({"swinir": Path(swinir).name, "swinir_sha256": file_sha256(swinir)})
    for stage, tensors in stages.items():
        say(f"writing {stage}.safetensors ({len(tensors)} tensors)")
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(out / f"{stage}.safetensors"),
                  metadata={"format": "pt", "stage": stage})
    save_file({"null_context": context}, str(out / "null_context.safetensors"), metadata={"format": "pt"})
    write_model_json(out, model_meta(spec, tuple(context.shape), source))
    for reason, count in report.ignored.items():
        say(f"ignored {count} tensors: {reason}")
    for note in report.notes:
        say(f"note: {note}")
    say(f"done: {report.used} tensors in {len(stages)} stages, {report.lora_merged} LoRA layers merged -> {out}")
    return report


def _stage_configs(spec: ModelSpec) -> dict:
    return model_meta(spec, (1, 77, spec.unet.context_dim), {})["stages"]
