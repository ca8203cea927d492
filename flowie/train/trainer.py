"""`flowie train`: small-scale training of the whole FlowIE stack, phase by phase, resumable.

Phases, in order (each trains one part with the official objective; the others are frozen):

1. ``swinir``: stage 1, L1 (+ optional SSIM) between SwinIR(degraded) and the clean crop.
2. ``vae``: the autoencoder (encoder + quant_conv, post_quant_conv + decoder), L1 reconstruction
   of clean crops from a posterior sample + ``kl_weight`` x KL. Afterwards the latent scale
   factor is measured as 1 / std of the posterior means on clean crops (how SD's 0.18215 was
   chosen), so scaled latents have unit variance like the noise x_T.
3. ``cond_encoder``: a copy of the VAE encoder, fine-tuned so that its posterior mean of the
   *SwinIR output* matches the VAE's posterior mean of the *clean* image (MSE on scaled
   latents): the hint then points at the latent the flow must produce. 0 steps = a plain copy.
4. ``flow``: UNet + ControlNet, rectified flow: x_t = t x_T + (1 - t) x_0, t ~ U(0,1] (the
   network sees t * 999 in [1, 999], unnormalised), target v = x_0 - x_T (MSE), x_0 = scaled
   posterior sample of the clean crop, hint c_latent = scaled cond-encoder mode of the SwinIR
   output, context = the constant null context. With ``lora_rank`` > 0 the UNet base is frozen
   (loaded from ``init_unet``) and only LoRA factors + the ControlNet train, as officially.

Determinism: batch k of a phase depends only on (seed, phase, k), noise and t come from a
generator seeded the same way, and initial weights from ``seed``; so a run resumed from a
checkpoint continues exactly as the uninterrupted run would (same thread count).

Checkpoints (one file a phase in ``checkpoint_dir``, written atomically every ``checkpoint_every``
steps and at a phase's end) hold its networks, optimiser and history; read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from flowie.convert import ModelSpec, model_meta
from flowie.modeldir import write_model_json
from flowie.nets.flow_unet import FlowUNet, UNetConfig
from flowie.nets.swinir import SwinIR, SwinIRConfig
from flowie.nets.vae import CondEncoder, VaeConfig, VaeDecoder
from flowie.train import card, losses
from flowie.train.budget import StepBudget
from flowie.train.data import CropSampler, load_images
from flowie.train.degrade import DegradationRanges
from flowie.train.lora import inject_lora, merged_state_dict
from flowie.train.prefetch import Prefetcher

log = logging.getLogger(__name__)

PHASES = ("swinir", "vae", "cond_encoder", "flow")
# The networks each phase trains (and checkpoints).
PHASE_MODULES = {"swinir": ("swinir",), "vae": ("vae_encoder", "vae_decoder"), "cond_encoder": ("cond_encoder",),
                 "flow": ("flow",)}
STATE_FORMAT = 1
BANK_STREAM = 9
TASK = "restore"  # general restoration x1-x4: BFR-style sampling (mean-value, x_T + v, wavelet fix)


@dataclass
class PhaseConfig:
    steps: int
    batch: int = 8
    crop: int = 64
    lr: float = 2e-4
    warmup: int = 50
    # > 0: at most this many minutes (set-up included): the step count is cut to what the measured
    # speed fits, and the learning-rate schedule follows the cut count (for a fixed-length GPU run).
    minutes: float = 0.0


def _default_phases() -> dict[str, PhaseConfig]:
    return {
        # The demo model's recipe (docs/DEMO_MODEL.md).
        "swinir": PhaseConfig(steps=4400, batch=4, crop=128, lr=6e-4),
        "vae": PhaseConfig(steps=2400, batch=8, crop=64, lr=1e-3),
        "cond_encoder": PhaseConfig(steps=200, batch=8, crop=64, lr=2e-4),
        "flow": PhaseConfig(steps=5000, batch=8, crop=128, lr=4e-4),
    }


# The demo model's networks (models/demo): small enough for <= 25 MB and CPU training.
# Two departures from the official configurations, both for narrow networks (docs/DEMO_MODEL.md):
# SwinIR adds its input to its output (input_skip), and GroupNorms use 8 groups, not 32, so that no
# norm is a one-channel instance norm.
DEMO_SWINIR = SwinIRConfig(img_size=16, embed_dim=96, depths=(2, 2, 2, 2), num_heads=(6, 6, 6, 6), window_size=8,
                           mlp_ratio=2.0, num_feat=32, input_skip=True)
DEMO_VAE = VaeConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8)
DEMO_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2, 4),
                       num_head_channels=32, context_dim=64, transformer_depth=1, use_linear_in_transformer=True,
                       norm_groups=8)

# name -> (SwinIR, VAE, UNet). "tiny" is for tests: every stage as small as its GroupNorms allow.
ARCHS: dict[str, tuple[SwinIRConfig, VaeConfig, UNetConfig]] = {
    "demo": (DEMO_SWINIR, DEMO_VAE, DEMO_UNET),
    "tiny": (SwinIRConfig(img_size=8, embed_dim=16, depths=(1,), num_heads=(2,), window_size=8, num_feat=16),
             VaeConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
             UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(2,),
                        num_head_channels=32, context_dim=32)),
}


@dataclass
class TrainConfig:
    out: str
    images: str = "skimage"
    checkpoint_dir: str | None = None  # default: <out>/checkpoints
    seed: int = 0
    phases: dict[str, PhaseConfig] = field(default_factory=_default_phases)
    swinir: SwinIRConfig = DEMO_SWINIR
    vae: VaeConfig = DEMO_VAE
    unet: UNetConfig = DEMO_UNET
    kl_weight: float = 1e-6
    ssim_weight: float = 0.0
    lora_rank: int = 0
    init_unet: str | None = None  # flow_unet.safetensors to start the flow phase from (needed for LoRA)
    # A model directory (same networks) whose weights start every stage: fine-tuning a trained model
    # on new data costs a fraction of training it again. Its cond_encoder also starts the VAE encoder
    # (a model directory ships no VAE encoder; the cond encoder is a fine-tuned copy of it).
    init_from: str | None = None
    flow_bank: int = 0  # >0: precompute the frozen stages for this many crops, then train on them
    # Range of the extra upscale f the service applies before the networks (min_side): crops are
    # degraded at native scale and shown to the networks f times larger, as served.
    work_scale: tuple[float, float] = (1.0, 3.0)
    # Content scale r of the crops: a source region 1/r times the crop, shrunk (large photos, denser detail).
    rescale: tuple[float, float] = (0.5, 1.0)
    checkpoint_every: int = 200
    threads: int = 2
    workers: int = 1  # 2: train stage 1 and the VAE in parallel processes
    data_workers: int = 0  # >0: processes that make the degraded crops ahead of the training loop
    device: str = "cpu"
    name: str = "flowie-demo"
    # dtype of the written weights: float16 halves the model directory (the demo's 25 MB budget);
    # the loader casts to the serving dtype, and training itself always runs in float32.
    weights_dtype: str = "float32"
    bf16: bool = False  # bfloat16 autocast of the forward passes (GPU runs); weights and optimiser stay float32
    defaults: dict = field(default_factory=lambda: {"min_side": 1024})  # overrides of model.json defaults
    ranges: DegradationRanges = field(default_factory=DegradationRanges)

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.out) / "checkpoints"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["swinir"] = self.swinir.to_dict()
        data["ranges"] = self.ranges.to_dict()
        return data

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed (not paths, thread counts or the device)."""
        data = self.to_dict()
        for key in ("out", "checkpoint_dir", "threads", "workers", "data_workers", "device", "checkpoint_every", "name", "defaults",
                    "bf16"):
            data.pop(key)
        for phase in data["phases"].values():
            phase.pop("steps")  # more steps may be asked for on resume
            phase.pop("minutes")
        return json.loads(json.dumps(data))


class Trainer:
    """Runs the four phases; ``progress(phase, step, total, losses)`` is called after each step."""

    def __init__(self, cfg: TrainConfig, progress: Callable[[str, int, int, dict], None] | None = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.progress = progress
        unknown = set(cfg.phases) - set(PHASES)
        if unknown:
            raise ValueError(f"unknown phases {sorted(unknown)}; phases are {', '.join(PHASES)}")
        if cfg.lora_rank and not cfg.init_unet:
            raise ValueError("LoRA trains on top of a base UNet: pass init_unet (a flow_unet.safetensors)")
        torch.manual_seed(cfg.seed)
        self.swinir = SwinIR(cfg.swinir)
        self.vae_encoder = CondEncoder(cfg.vae, latent_scale=1.0)
        self.vae_decoder = VaeDecoder(cfg.vae, scale_factor=1.0)
        self.cond_encoder = CondEncoder(cfg.vae, latent_scale=1.0)
        self.flow = FlowUNet(cfg.unet)
        self._zero_init_controls()
        if cfg.swinir.input_skip:
            # With the input skip, a zero last conv makes the untrained SwinIR the identity
            # (the bicubic-upscaled input), and training learns only the correction.
            nn.init.zeros_(self.swinir.conv_last.weight)
            nn.init.zeros_(self.swinir.conv_last.bias)
        if cfg.init_from:
            self._load_init_model(cfg.init_from)
        if cfg.init_unet:
            self._load_init_unet(cfg.init_unet)
        if cfg.lora_rank:
            inject_lora(self.flow.unet, cfg.lora_rank, seed=cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed + 77)
        # No text encoder in the demo: the "null prompt" is a fixed seeded tensor (data, not a network).
        self.null_context = torch.randn(1, 77, cfg.unet.context_dim, generator=gen)
        self.scale_factor = 1.0
        self.done: list[str] = []
        self.history: dict[str, dict] = {}
        for module in self.modules().values():
            module.to(self.device)
        self.sampler: CropSampler | None = None
        self._bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._prefetch: dict[str, Prefetcher] = {}

    # ------------------------------------------------------------------ set-up

    def modules(self) -> dict[str, nn.Module]:
        return {"swinir": self.swinir, "vae_encoder": self.vae_encoder, "vae_decoder": self.vae_decoder,
                "cond_encoder": self.cond_encoder, "flow": self.flow}

    def _zero_init_controls(self) -> None:
        # Official ControlNet: the 13 output convs start at zero, so training starts from the plain UNet.
        for conv in [*self.flow.controlnet.controlnet_down_blocks, self.flow.controlnet.controlnet_mid_block]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def _load_init_model(self, model_dir: str) -> None:
        from safetensors.torch import load_file

        files = {"swinir": "swinir", "vae_encoder": "cond_encoder", "vae_decoder": "vae_decoder",
                 "cond_encoder": "cond_encoder", "flow": "flow_unet"}
        for module, stage in files.items():
            path = Path(model_dir) / f"{stage}.safetensors"
            if not path.is_file():
                raise ValueError(f"--init-from {model_dir}: no {path.name}")
            target = self.modules()[module]
            state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
            try:
                target.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"--init-from {model_dir}: {path.name} does not fit the networks of this run "
                                 "(pick the same --arch)") from exc

    def _load_init_unet(self, path: str) -> None:
        from safetensors.torch import load_file

        state = load_file(path)
        unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        if not unet_state:
            raise ValueError(f"{path} holds no 'unet.*' tensors (expected a flow_unet.safetensors)")
        self.flow.unet.load_state_dict(unet_state, strict=True)

    def _sampler(self) -> CropSampler:
        if self.sampler is None:
            crop, rescale, work_scale = min(p.crop for p in self.cfg.phases.values()), self.cfg.rescale, self.cfg.work_scale
            self.sampler = CropSampler(load_images(self.cfg.images), crop=crop, seed=self.cfg.seed, ranges=self.cfg.ranges,
                                       rescale=tuple(rescale), work_scale=tuple(work_scale))  # type: ignore[arg-type]
        return self.sampler

    def phase_config(self, phase: str) -> PhaseConfig:
        """The phase's settings; a phase left out (not trained) still has crops for measuring."""
        return self.cfg.phases.get(phase) or _default_phases()[phase]

    def _phase_sampler(self, phase: str) -> CropSampler:
        sampler = copy.copy(self._sampler())
        sampler.crop = self.phase_config(phase).crop
        return sampler

    def _batch(self, phase: str, index: int, degrade: bool = True, stream: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of a phase: from the prefetching workers when they run, else made here."""
        stream = PHASES.index(phase) + 1 if stream is None else stream
        prefetch = self._prefetch.get(phase)
        if prefetch is not None and prefetch.serves(stream, index, degrade):
            clean, lq = prefetch.take(index)
        else:
            with torch.autocast("cpu", enabled=False):  # the degradation is float32 data work, never autocast
                clean, lq = self._phase_sampler(phase).batch(stream, index, self.phase_config(phase).batch, degrade=degrade)
        return clean.to(self.device), lq.to(self.device)

    def _start_prefetch(self, phase: str, stream: int, start: int, stop: int, degrade: bool = True) -> None:
        if self.cfg.data_workers > 0 and stop > start:
            self._prefetch[phase] = Prefetcher(self._phase_sampler(phase), stream, start, stop,
                                                self.cfg.phases[phase].batch, degrade, self.cfg.data_workers)

    def _generator(self, phase: str, step: int) -> torch.Generator:
        # Noise for the flow / posterior samples: a pure function of (seed, phase, step).
        key = f"{self.cfg.seed}:{phase}:{step}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)

    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def trainable(self, phase: str) -> list[nn.Parameter]:
        if phase == "swinir":
            return list(self.swinir.parameters())
        if phase == "vae":
            return [*self.vae_encoder.parameters(), *self.vae_decoder.parameters()]
        if phase == "cond_encoder":
            return list(self.cond_encoder.parameters())
        if self.cfg.lora_rank:
            lora = [p for n, p in self.flow.unet.named_parameters() if "parametrizations" in n and n.endswith(("down", "up"))]
            return [*lora, *self.flow.controlnet.parameters()]
        return list(self.flow.parameters())

    # ------------------------------------------------------------------ steps (one loss each)

    def swinir_loss(self, step: int) -> dict[str, torch.Tensor]:
        clean, lq = self._batch("swinir", step)
        restored = self.swinir(lq)
        out = {"l1": losses.l1(restored, clean)}
        if self.cfg.ssim_weight:
            out["ssim"] = losses.ssim_loss(restored, clean)
        out["loss"] = out["l1"] + self.cfg.ssim_weight * out.get("ssim", 0.0)
        return out

    def vae_loss(self, step: int) -> dict[str, torch.Tensor]:
        clean, _ = self._batch("vae", step, degrade=False)
        mean, logvar = losses.split_moments(self.vae_encoder.moments(clean), self.cfg.vae.embed_dim)
        z = losses.sample_posterior(mean, logvar, self._generator("vae", step))
        recon = (self.vae_decoder.decode_raw(z) + 1) / 2
        rec, kl = losses.l1(recon, clean), losses.kl_divergence(mean, logvar)
        return {"loss": rec + self.cfg.kl_weight * kl, "rec": rec, "kl": kl}

    def cond_loss(self, step: int) -> dict[str, torch.Tensor]:
        clean, lq = self._batch("cond_encoder", step)
        with torch.no_grad():
            restored = self.swinir(lq)
            target = self.vae_encoder.moments(clean)[:, : self.cfg.vae.embed_dim]
        pred = self.cond_encoder.moments(restored)[:, : self.cfg.vae.embed_dim]
        mse = torch.nn.functional.mse_loss(pred * self.scale_factor, target * self.scale_factor)
        return {"loss": mse, "latent_mse": mse}

    @torch.no_grad()
    def frozen_latents(self, clean: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(posterior mean, logvar of the clean crop, scaled hint c_latent of the SwinIR output)."""
        mean, logvar = losses.split_moments(self.vae_encoder.moments(clean), self.cfg.vae.embed_dim)
        c_latent = self.cond_encoder.moments(self.swinir(lq))[:, : self.cfg.vae.embed_dim] * self.scale_factor
        return mean.float(), logvar.float(), c_latent.float()

    def flow_loss(self, step: int) -> dict[str, torch.Tensor]:
        gen = self._generator("flow", step)
        if self._bank is not None:
            mean, logvar, c_latent = self._bank_batch(step)
        else:
            clean, lq = self._batch("flow", step)
            mean, logvar, c_latent = self.frozen_latents(clean, lq)
        # Official: x_0 is a posterior *sample* of the first stage, times the scale factor.
        x_0 = losses.sample_posterior(mean, logvar, gen) * self.scale_factor
        x_T = torch.randn(x_0.shape, generator=gen).to(self.device)
        t = losses.sample_time(x_0.shape[0], gen).to(self.device)
        context = self.null_context.to(self.device).expand(x_0.shape[0], -1, -1)
        loss = losses.flow_loss(lambda x, tt: self.flow(x, tt, c_latent, context), x_0, x_T, t)
        return {"loss": loss, "v_mse": loss}

    # ------------------------------------------------------------------ flow latent bank

    def _build_bank(self) -> None:
        n, pc = self.cfg.flow_bank, self.cfg.phases["flow"]
        batches = math.ceil(n / pc.batch)
        # Stream 9: bank crops are their own stream, independent of the per-step one.
        self._start_prefetch("flow", BANK_STREAM, 0, batches)
        parts: list[tuple[torch.Tensor, ...]] = []
        for index in range(batches):
            clean, lq = self._batch("flow", index, stream=BANK_STREAM)
            with self._autocast():
                parts.append(self.frozen_latents(clean, lq))
            if self.progress:
                self.progress("flow bank", index + 1, batches, {})
        self._prefetch.pop("flow", None)
        self._bank = tuple(torch.cat([p[i] for p in parts])[:n] for i in range(3))  # type: ignore[assignment]

    def _bank_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self._bank is not None
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, self._bank[0].shape[0], (self.cfg.phases["flow"].batch,), generator=gen)
        flips = (torch.rand(len(idx), generator=gen) < 0.5).to(self._bank[0].device)
        idx = idx.to(self._bank[0].device)
        # Mirror whole latent triples (clean posterior and hint together): the same geometric
        # augmentation applied to both, like flipping the crop before encoding.
        out = []
        for tensor in self._bank:
            sel = tensor[idx].clone()
            sel[flips] = sel[flips].flip(-1)
            out.append(sel)
        return out[0], out[1], out[2]

    # ------------------------------------------------------------------ the loop

    def _lr(self, pc: PhaseConfig, step: int, total: int) -> float:
        warm = min(1.0, (step + 1) / max(1, pc.warmup))
        progress = min(1.0, step / max(1, total))
        return pc.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def run(self, resume: bool = False) -> None:
        """Train every phase not yet complete (``resume``: continue from the checkpoints in ckpt_dir)."""
        torch.set_num_threads(self.cfg.threads)
        partial: dict[str, tuple[int, dict | None]] = {}
        if resume:
            partial = self.load_checkpoints()
        todo = [p for p in PHASES if p in self.cfg.phases and p not in self.done]
        # Stage 1 and the VAE do not depend on each other: with workers > 1 they train at the same
        # time in two processes (two single-thread processes beat one two-thread process on a busy CPU).
        independent = [p for p in ("swinir", "vae") if p in todo]
        if self.cfg.workers > 1 and len(independent) == 2:
            self._train_in_subprocesses(independent, resume)
            todo = [p for p in todo if p not in independent]
        for phase in todo:
            step, optim_state = partial.get(phase, (0, None))
            self.train_phase(phase, step, optim_state)
        # When the VAE or cond-encoder phase was skipped: still a measured scale and a copied encoder.
        self._after_vae()
        self._init_cond_encoder()

    def _train_in_subprocesses(self, phases: list[str], resume: bool) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        threads = max(1, self.cfg.threads // len(phases))
        procs = [ctx.Process(target=_phase_worker, args=(self.cfg, phase, resume, threads, i), name=f"flowie-train-{phase}")
                 for i, phase in enumerate(phases)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        failed = [proc.name for proc in procs if proc.exitcode != 0]
        if failed:
            raise RuntimeError(f"training subprocesses failed: {failed} (see their messages above); "
                               "re-run with --resume to continue from their last checkpoints")
        for phase in phases:
            self._load_phase(phase, require_complete=True)

    def train_phase(self, phase: str, start: int, optim_state: dict | None) -> None:
        pc = self.cfg.phases[phase]
        hist = self.history.setdefault(phase, {"steps": 0, "seconds": 0.0, "first": None, "last": None})
        started = time.perf_counter()  # the phase's time includes its set-up (the flow bank)
        if phase in ("cond_encoder", "flow"):
            self._after_vae()
        if phase == "cond_encoder" and start == 0:
            self._init_cond_encoder()
        if phase == "flow" and self.cfg.flow_bank and pc.steps > start:
            self._build_bank()
        if not (phase == "flow" and self.cfg.flow_bank):
            self._start_prefetch(phase, PHASES.index(phase) + 1, start, pc.steps, degrade=phase != "vae")
        params = self.trainable(phase)
        for module in self.modules().values():
            module.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=pc.lr, betas=(0.9, 0.99), weight_decay=0.0)
        if optim_state:
            opt.load_state_dict(optim_state)
        loss_fn = {"swinir": self.swinir_loss, "vae": self.vae_loss, "cond_encoder": self.cond_loss,
                   "flow": self.flow_loss}[phase]
        ema: dict[str, float] = dict(hist.get("ema") or {})
        budget = StepBudget(pc.minutes * 60.0, started, pc.steps) if pc.minutes > 0 else None
        total, step = pc.steps, start
        while step < total:
            for group in opt.param_groups:
                group["lr"] = self._lr(pc, step, total)
            with self._autocast():
                out = loss_fn(step)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            values = {k: float(v.detach()) for k, v in out.items()}
            if hist["first"] is None:
                hist["first"] = values
            for k, v in values.items():
                ema[k] = v if k not in ema else 0.98 * ema[k] + 0.02 * v
            hist.update(steps=step + 1, last=values, ema=dict(ema))
            step += 1
            if budget is not None:
                total = budget.fit(step, time.perf_counter())
            if self.progress:
                self.progress(phase, step, total, ema)
            if step % self.cfg.checkpoint_every == 0 and step < total:
                hist["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                self.save_phase(phase, step, opt.state_dict(), complete=False)
        hist["seconds"] += time.perf_counter() - started
        if total < pc.steps:
            hist["cut_by_minutes"] = pc.minutes
        self._prefetch.pop(phase, None)
        for p in params:
            p.requires_grad_(False)
        self.done.append(phase)
        self.save_phase(phase, step, None, complete=True)

    @torch.no_grad()
    def measure_scale_factor(self, batches: int = 8) -> float:
        """1 / std of the VAE posterior means over clean training crops (SD's recipe)."""
        means = [self.vae_encoder.moments(self._batch("vae", 10_000 + i, degrade=False)[0])[:, : self.cfg.vae.embed_dim]
                 for i in range(batches)]
        return float(1.0 / torch.cat(means).std().clamp_min(1e-6))

    def _after_vae(self) -> None:
        """Measure the latent scale factor once, after the VAE is final (or untrained, if it has no phase)."""
        if "scale_factor" not in self.history:
            self.scale_factor = self.measure_scale_factor()
            self.history["scale_factor"] = {"value": self.scale_factor}

    def _init_cond_encoder(self) -> None:
        """The cond encoder starts as a copy of the (trained) VAE encoder, once."""
        if "cond_init" not in self.history:
            self.cond_encoder.load_state_dict(self.vae_encoder.state_dict())
            self.history["cond_init"] = {"from": "vae_encoder"}

    # ------------------------------------------------------------------ checkpoints

    def phase_fingerprint(self, phase: str) -> str:
        """The options a phase's result depends on (its own and its upstream phases'), not its step count."""
        cfg = self.cfg.fingerprint()
        common = {k: cfg[k] for k in ("images", "seed", "work_scale", "init_from")}
        if tuple(cfg["rescale"]) != (0.5, 1.0):  # left out at its default, so older checkpoints resume
            common["rescale"] = cfg["rescale"]
        own = {
            "swinir": {"swinir": cfg["swinir"], "ranges": cfg["ranges"], "ssim_weight": cfg["ssim_weight"]},
            "vae": {"vae": cfg["vae"], "kl_weight": cfg["kl_weight"]},
            "cond_encoder": {"ranges": cfg["ranges"]},
            "flow": {k: cfg[k] for k in ("unet", "ranges", "lora_rank", "init_unet", "flow_bank")},
        }
        upstream = PHASES[: PHASES.index(phase) + 1] if phase in ("cond_encoder", "flow") else (phase,)
        data = {"common": common, **{p: {**own[p], "phase": cfg["phases"].get(p)} for p in upstream}}
        return json.dumps(data, sort_keys=True)

    def phase_path(self, phase: str) -> Path:
        return self.cfg.ckpt_dir / f"{phase}.pt"

    def save_phase(self, phase: str, step: int, optim_state: dict | None, complete: bool) -> Path:
        """Write ``<ckpt_dir>/<phase>.pt`` atomically: this phase's networks, optimiser, step, history."""
        self.cfg.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "format": STATE_FORMAT,
            "fingerprint": self.phase_fingerprint(phase),
            "phase": phase,
            "step": step,
            "complete": complete,
            "modules": {name: self.modules()[name].state_dict() for name in PHASE_MODULES[phase]},
            "optimizer": optim_state or {},
            "history": json.dumps(self.history.get(phase, {})),
        }
        path = self.phase_path(phase)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def _load_phase(self, phase: str, require_complete: bool = False) -> tuple[int, dict | None] | None:
        path = self.phase_path(phase)
        if not path.is_file():
            if require_complete:
                raise RuntimeError(f"{path} is missing")
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} has checkpoint format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state["fingerprint"] != self.phase_fingerprint(phase):
            raise ValueError(f"{path} was written with different options for the {phase} phase (or an upstream "
                             "one); resume with the same options, or pass another --checkpoint-dir")
        for name in PHASE_MODULES[phase]:
            self.modules()[name].load_state_dict(state["modules"][name])
        self.history[phase] = json.loads(state["history"])
        history = self.history[phase]
        complete = bool(state["complete"]) and (int(state["step"]) >= self.cfg.phases[phase].steps
                                                or "cut_by_minutes" in history)
        if require_complete and not complete:
            raise RuntimeError(f"{path} is not a finished {phase} phase")
        if complete:
            if phase not in self.done:
                self.done.append(phase)
            return None
        # A finished phase asked for more steps goes on with a fresh optimiser from its last weights.
        return int(state["step"]), (state["optimizer"] or None)

    def load_checkpoints(self) -> dict[str, tuple[int, dict | None]]:
        """Load every phase checkpoint found; {phase: (step, optimiser state)} for the unfinished ones."""
        partial = {}
        for phase in PHASES:
            if phase not in self.cfg.phases:
                continue
            found = self._load_phase(phase)
            if found is not None:
                partial[phase] = found
        if self.done or partial:
            log.info("resuming from %s: finished %s, unfinished %s", self.cfg.ckpt_dir, self.done,
                     {p: s for p, (s, _) in partial.items()})
        else:
            log.info("no checkpoints in %s: starting from scratch", self.cfg.ckpt_dir)
        return partial

    # ------------------------------------------------------------------ the model directory

    def spec(self) -> ModelSpec:
        return ModelSpec(task=TASK, swinir=self.cfg.swinir, vae=self.cfg.vae, unet=self.cfg.unet,
                         scale_factor=self.scale_factor, lora_rank=self.cfg.lora_rank, hint_source="cond_encoder",
                         hint_scale=self.scale_factor, control_scales=[1.0] * self.cfg.unet.num_controls)

    def stage_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """The served stages' weights, LoRA merged (on a copy; training can go on)."""
        dtype = {"float32": torch.float32, "float16": torch.float16}[self.cfg.weights_dtype]
        cpu = lambda state: {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}  # noqa: E731
        return {"swinir": cpu(self.swinir.state_dict()), "cond_encoder": cpu(self.cond_encoder.state_dict()),
                "flow_unet": cpu(merged_state_dict(self.flow)), "vae_decoder": cpu(self.vae_decoder.state_dict())}

    def write_model(self, out: str | Path | None = None, card_extra: dict | None = None) -> Path:
        """Write the model directory Pipeline / `flowie serve` load, with a model card in model.json."""
        out = Path(out or self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        for stage, tensors in self.stage_state_dicts().items():
            path = out / f"{stage}.safetensors"
            save_file(tensors, str(path), metadata={"format": "pt", "stage": stage})
            digest.update(path.read_bytes())
        save_file({"null_context": self.null_context.contiguous()}, str(out / "null_context.safetensors"),
                  metadata={"format": "pt"})
        source = {"name": self.cfg.name, "trained_by": "flowie train", "checkpoint": "",
                  # No source checkpoint: the hash of the written weights keys caches (ONNX, engines).
                  "sha256": digest.hexdigest()}
        meta = model_meta(self.spec(), tuple(self.null_context.shape), source)
        meta["defaults"].update(self.cfg.defaults)
        meta["tiling"] = self.tiling()
        meta["card"] = self.model_card(card_extra)
        write_model_json(out, meta)
        return out

    def tiling(self) -> dict:
        """Latent tiles the size of the flow's training crops, as the official model tiles at its 512 px.

        The UNet's self-attention and its GroupNorms see whole tiles; on maps much larger than the training crops their statistics differ
        and the velocity degrades, so larger images run in overlapping tiles of that size.
        """
        crop = self.phase_config("flow").crop
        tile = max(8, crop // 8)
        # The decoder needs no such limit: small tiles give each tile its own GroupNorm statistics,
        # which shows as a tile pattern. It and the pixel stages use tiles of 576 px with the
        # official 64 px overlap: two of them cover the 1024 px short side the demo works at
        # (defaults min_side), where the official 512 px tiles need three and compute 2.25x the
        # pixels (docs/DEMO_MODEL.md, speed).
        return {"latent_tile": tile, "latent_stride": max(1, tile * 3 // 4), "max_untiled_pixels": crop * crop,
                "decoder_latent_tile": 72, "decoder_latent_stride": 64, "pixel_tile": 576, "pixel_stride": 512}

    def model_card(self, extra: dict | None = None) -> dict:
        return card.model_card(self, PHASES, extra)


def _phase_worker(cfg: TrainConfig, phase: str, resume: bool, threads: int, position: int) -> None:
    """Entry point of a subprocess that trains one phase and leaves its checkpoint behind."""
    import sys

    from tqdm import tqdm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bar = tqdm(total=cfg.phases[phase].steps, desc=phase, unit="step", position=position, file=sys.stderr,
               mininterval=5.0, dynamic_ncols=True)

    def progress(name: str, step: int, total: int, values: dict) -> None:
        if name != phase:
            return
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k != "loss"}, refresh=False)

    worker_cfg = copy.copy(cfg)
    worker_cfg.threads, worker_cfg.workers = threads, 1
    trainer = Trainer(worker_cfg, progress=progress)
    torch.set_num_threads(threads)
    partial = trainer.load_checkpoints() if resume else {}
    if phase not in trainer.done:
        step, optim_state = partial.get(phase, (0, None))
        bar.update(step - bar.n)
        trainer.train_phase(phase, step, optim_state)
    bar.close()
