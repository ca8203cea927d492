"""`flowie init`: a full-size FlowIE starting point from public files.

Sources (each read with ``weights_only=True`` or safetensors, each hashed):

- Stable Diffusion 2.1-base, the ldm ``.ckpt`` (``model.diffusion_model.*``,
  ``first_stage_model.*``) or the diffusers folder (``unet/``, ``vae/``): the UNet base, the VAE
  (encoder for training targets, decoder for serving) and the cond encoder, a copy of the VAE
  encoder + quant_conv (as the official ``make_stage2_init_weight``).
- The ControlNet: from a DiffBIR v1 full checkpoint's ``control_model.*``, or by the official
  stage-2 rule: every ControlNet tensor whose name and shape the UNet has is copied from it; the
  first conv, which takes concat(x_t, hint), gets the UNet's input weights for the x_t channels and
  zeros for the extra hint channels; the 13 zero convs are zero.
- SwinIR: a stand-alone SwinIR checkpoint, a DiffBIR full checkpoint's ``preprocess_model.*``, a
  ``flowie train`` stage-1 checkpoint (``swinir.pt``) or a model directory's ``swinir.safetensors``.
- The null context: the official ``null_token_1024.pth``.

The result is a model directory (model.json + the served stages, so `flowie serve` can already
run the untrained start) plus ``vae_encoder.safetensors`` (the first-stage encoder, which makes
the training targets x_0) and ``init.json`` (sources, sha256, what was mapped and ignored).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowie import keymap
from flowie.convert import (
    SCHEDULE_BUFFERS,
    ConversionError,
    ModelSpec,
    _remap,
    _vae_part,
    check_against_modules,
    load_checkpoint,
    load_config,
    load_null_context_file,
    model_meta,
    parse_config,
)
from flowie.modeldir import file_sha256, write_model_json
from flowie.nets.flow_unet import FlowUNet
from flowie.nets.swinir import SwinIR
from flowie.nets.vae import CondEncoder, VaeDecoder

log = logging.getLogger(__name__)

INIT_FILE = "init.json"
VAE_ENCODER = "vae_encoder"  # extra weight file of an init directory: the first-stage encoder
VAE_HALVES = ("encoder.", "quant_conv.", "decoder.", "post_quant_conv.")


@dataclass
class InitReport:
    """What each source gave: mapped tensor counts, ignored counts by reason, notes."""

    sources: dict[str, dict] = field(default_factory=dict)
    mapped: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    controlnet: dict = field(default_factory=dict)

    def ignore(self, reason: str, count: int = 1) -> None:
        if count:
            self.ignored[reason] = self.ignored.get(reason, 0) + count

    def source(self, role: str, path: str | Path) -> None:
        p = Path(path)
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".safetensors", ".bin")) if p.is_dir() else [p]
        self.sources[role] = {"path": str(p), "sha256": {str(q.relative_to(p) if p.is_dir() else q.name): file_sha256(q)
                                                          for q in files}}


# ---------------------------------------------------------------- Stable Diffusion


def _diffusers_file(folder: Path) -> Path:
    """The weights file of a diffusers sub-folder: safetensors preferred, fp32 before fp16 variants."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ConversionError(f"{folder} holds no diffusion_pytorch_model.safetensors")


def read_sd(path: str | Path, spec: ModelSpec, report: InitReport) -> tuple[dict, dict, dict]:
    """SD 2.1-base -> (UNet state dict in our names, VAE encoder half, VAE decoder half)."""
    path = Path(path)
    report.source("sd", path)
    if path.is_dir():
        unet_file, vae_file = _diffusers_file(path / "unet"), _diffusers_file(path / "vae")
        unet = dict(load_checkpoint(unet_file))  # diffusers UNet2DConditionModel names are ours
        vae = {"first_stage_model." + k: v for k, v in load_checkpoint(vae_file).items()}
        for other in sorted(q.name for q in path.iterdir() if q.is_dir() and q.name not in ("unet", "vae")):
            report.notes.append(f"{path / other} not read (text encoder, tokenizer, scheduler: the null context "
                                "replaces the text encoder)")
        report.mapped["sd.unet"] = len(unet)
        return unet, *_vae_halves(vae, spec, report, path)
    unet, vae = ldm_sd_parts(load_checkpoint(path), spec, report, str(path))
    return unet, *_vae_halves(vae, spec, report, path)


def ldm_sd_parts(sd: dict[str, torch.Tensor], spec: ModelSpec, report: InitReport, where: str = "--sd"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An ldm SD state dict -> (UNet in our names, ``first_stage_model.*``); every other key ignored with its reason."""
    unet_sub, vae = {}, {}
    for key, value in sd.items():
        if key.startswith("model.diffusion_model."):
            unet_sub[key[len("model.diffusion_model."):]] = value
        elif key.startswith("first_stage_model."):
            vae[key] = value
        elif key in SCHEDULE_BUFFERS:
            report.ignore("diffusion schedule buffers (rectified flow recomputes nothing from them)")
        elif key.startswith("cond_stage_model."):
            report.ignore("cond_stage_model.* (text encoder; the null context comes from --null-context)")
        elif key.startswith("model_ema."):
            report.ignore("model_ema.* (EMA bookkeeping of the SD training)")
        elif key.startswith(("control_model.", "cond_encoder.", "preprocess_model.")):
            report.ignore(f"{key.split('.')[0]}.* in --sd (taken only from --controlnet-from / --swinir)")
        else:
            raise ConversionError(f"unexpected key {key!r} in {where}: not a Stable Diffusion checkpoint?")
    if not unet_sub:
        raise ConversionError(f"{where} has no model.diffusion_model.* keys (not an ldm SD checkpoint)")
    if any(".lora_down." in k for k in unet_sub):
        raise ConversionError(f"{where} holds LoRA factors: pass the plain SD 2.1-base UNet as --sd")
    unet = _remap(unet_sub, keymap.unet_map(spec.unet), "model.diffusion_model")
    report.mapped["sd.model.diffusion_model"] = len(unet)
    return unet, vae


def _vae_halves(vae: dict[str, torch.Tensor], spec: ModelSpec, report: InitReport, path: Path
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    other_vae = [k for k in vae if not k[len("first_stage_model."):].startswith(VAE_HALVES)]
    report.ignore("first_stage_model.loss.* and other VAE-training parts", len(other_vae))
    encoder = _vae_part(vae, "first_stage_model.", spec.vae, "encoder")
    decoder = _vae_part(vae, "first_stage_model.", spec.vae, "decoder")
    if not encoder or not decoder:
        raise ConversionError(f"{path} lacks the VAE (first_stage_model.* or vae/)")
    report.mapped["sd.vae"] = len(encoder) + len(decoder)
    return encoder, decoder


# ---------------------------------------------------------------- ControlNet


def controlnet_from_unet(unet: dict[str, torch.Tensor], control_shapes: dict[str, tuple[int, ...]],
                         report: InitReport) -> dict[str, torch.Tensor]:
    """The official stage-2 initialisation, in our names (the ControlNet's encoder half has the UNet's).

    Same name and shape: a copy. Same name, more input channels (the first conv): the UNet's weight for
    the first channels, zeros for the extra hint channels. No such UNet tensor (the zero convs): zeros.
    """
    out: dict[str, torch.Tensor] = {}
    copied, widened, zeroed = [], [], []
    for key, shape in control_shapes.items():
        source = unet.get(key)
        if source is not None and tuple(source.shape) == shape:
            out[key] = source.clone()
            copied.append(key)
        elif source is not None and source.dim() == 4 and shape[0] == source.shape[0] and shape[2:] == source.shape[2:] \
                and shape[1] > source.shape[1]:
            extra = torch.zeros(shape[0], shape[1] - source.shape[1], *shape[2:], dtype=source.dtype, device=source.device)
            out[key] = torch.cat([source, extra], dim=1)
            widened.append(key)
        elif source is None and key.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
            out[key] = torch.zeros(shape)
            zeroed.append(key)
        else:
            raise ConversionError(f"ControlNet tensor {key} {shape} has no UNet counterpart "
                                  f"({None if source is None else tuple(source.shape)})")
    report.controlnet = {"from": "unet (make_stage2_init_weight rule)", "copied": len(copied),
                         "widened_zero_hint_channels": widened, "zero_convs": len(zeroed)}
    report.mapped["controlnet.from_unet"] = len(out)
    return out


def controlnet_from_diffbir(path: str | Path, spec: ModelSpec, report: InitReport) -> dict[str, torch.Tensor]:
    """A DiffBIR v1 full checkpoint's ``control_model.*`` in our names."""
    report.source("controlnet", path)
    sd = load_checkpoint(path)
    sub = {k[len("control_model."):]: v for k, v in sd.items() if k.startswith("control_model.")}
    if not sub:
        raise ConversionError(f"{path} has no control_model.* keys (expected a DiffBIR v1 full checkpoint)")
    report.ignore("--controlnet-from tensors outside control_model.* (only the ControlNet is taken from it)",
                  len(sd) - len(sub))
    out = _remap(sub, keymap.controlnet_map(spec.unet), "control_model")
    report.controlnet = {"from": str(path), "copied": len(out)}
    report.mapped["controlnet.control_model"] = len(out)
    return out


# ---------------------------------------------------------------- SwinIR


def read_swinir(path: str | Path, report: InitReport) -> dict[str, torch.Tensor]:
    """SwinIR weights from a SwinIR ckpt, a DiffBIR full ckpt, a `flowie train` swinir.pt or a model directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "swinir.safetensors"
    report.source("swinir", path)
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and isinstance(obj.get("modules"), dict) and "swinir" in obj["modules"]:
            sd = obj["modules"]["swinir"]  # a `flowie train` stage-1 checkpoint
            report.notes.append(f"SwinIR from the flowie train stage-1 checkpoint {path.name}")
        else:
            sd = load_checkpoint(path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("preprocess_model.") for k in sd):
        inner = {k[len("preprocess_model."):]: v for k, v in sd.items() if k.startswith("preprocess_model.")}
        report.ignore("--swinir tensors outside preprocess_model.* (only SwinIR is taken from it)", len(sd) - len(inner))
        sd = inner
    out = {}
    for key, value in sd.items():
        if key.endswith((".attn_mask", ".relative_position_index")):
            report.ignore("SwinIR attn_mask / relative_position_index buffers (recomputed)")
        else:
            out[key] = value
    report.mapped["swinir"] = len(out)
    return out


# ---------------------------------------------------------------- the whole


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def init_model(config: str | Path | dict, sd: str | Path, null_context: str | Path, out_dir: str | Path,
               controlnet_from: str | Path | None = None, swinir: str | Path | None = None,
               progress: Callable[[str], None] | None = None) -> InitReport:
    """Write the init directory ``out_dir``; returns the report (also written as init.json)."""
    say = progress or (lambda msg: log.info(msg))
    spec = parse_config(load_config(config))
    report = InitReport()
    context = load_null_context_file(null_context)
    if context.shape[-1] != spec.unet.context_dim:
        raise ConversionError(f"null context width {context.shape[-1]} != the UNet's context_dim {spec.unet.context_dim}")
    report.source("null_context", null_context)
    say(f"reading Stable Diffusion from {sd}")
    unet, vae_encoder, vae_decoder = read_sd(sd, spec, report)
    with torch.device("meta"):
        flow = FlowUNet(spec.unet)
        modules = {"swinir": SwinIR(spec.swinir), "cond_encoder": CondEncoder(spec.vae, 1.0),
                   VAE_ENCODER: CondEncoder(spec.vae, 1.0), "vae_decoder": VaeDecoder(spec.vae, 1.0), "flow_unet": flow}
    if controlnet_from:
        say(f"reading the ControlNet from {controlnet_from}")
        control = controlnet_from_diffbir(controlnet_from, spec, report)
    else:
        say("initialising the ControlNet from the UNet (official stage-2 rule)")
        control = controlnet_from_unet(unet, _meta_shapes(flow.controlnet), report)
    if swinir:
        say(f"reading SwinIR from {swinir}")
        swinir_sd = read_swinir(swinir, report)
    else:
        report.notes.append("no --swinir: SwinIR starts from random weights (train it first: the full recipe keeps it frozen)")
        torch.manual_seed(0)
        swinir_sd = dict(SwinIR(spec.swinir).state_dict())
    if spec.hint_source == "first_stage":
        report.notes.append("this config takes the hint from the first-stage encoder (BSR): cond_encoder = VAE encoder")
    stages = {
        "swinir": swinir_sd,
        "cond_encoder": {k: v.clone() for k, v in vae_encoder.items()},
        VAE_ENCODER: vae_encoder,
        "vae_decoder": vae_decoder,
        "flow_unet": {**{f"unet.{k}": v for k, v in unet.items()}, **{f"controlnet.{k}": v for k, v in control.items()}},
    }
    say("checking every tensor against the networks' shapes")
    check_against_modules(stages, modules)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stage, tensors in stages.items():
        say(f"writing {stage}.safetensors ({len(tensors)} tensors)")
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(out / f"{stage}.safetensors"),
                  metadata={"format": "pt", "stage": stage})
    save_file({"null_context": context}, str(out / "null_context.safetensors"), metadata={"format": "pt"})
    source = {"name": f"flowie-{spec.task}-init", "checkpoint": "", "init": report.sources,
              "sha256": _combined_sha(report.sources)}
    write_model_json(out, model_meta(spec, tuple(context.shape), source))
    (out / INIT_FILE).write_text(json.dumps({"config": str(config) if not isinstance(config, dict) else "dict",
                                             "lora_rank": spec.lora_rank, **asdict(report)}, indent=2) + "\n")
    for name, count in report.mapped.items():
        say(f"mapped {count} tensors: {name}")
    for reason, count in report.ignored.items():
        say(f"ignored {count} tensors: {reason}")
    for note in report.notes:
        say(f"note: {note}")
    say(f"done -> {out}")
    return report


def _combined_sha(sources: dict[str, dict]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()


def read_init(path: str | Path) -> dict:
    """init.json of an init directory (raises ValueError if ``path`` is not one)."""
    meta = Path(path) / INIT_FILE
    if not meta.is_file():
        raise ValueError(f"{path} is not an init directory (no {INIT_FILE}); make one with `flowie init`")
    return json.loads(meta.read_text())
