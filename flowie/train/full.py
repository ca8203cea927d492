"""`flowie train --arch full`: the official FlowIE recipe on a `flowie init` directory, data-parallel.

Trained: rank-r LoRA factors on the frozen SD UNet (the lora_diffusion targets, :mod:`lora`) and
the whole ControlNet. Frozen: SwinIR, the cond encoder, the VAE. Per sample (official
``Reflow_ControlLDM``): x_0 = scale_factor x a posterior sample of the VAE encoder on the clean
crop; c_latent = cond_encoder(SwinIR(lq)); t an integer drawn from {1, ..., 999};
x_t = t/999 x_T + (1 - t/999) x_0 with x_T ~ N(0, I); the network, given t as a float, is fitted
to v = x_0 - x_T by MSE; context = the null context. AdamW, lr 1e-4.

Determinism: sample g of the run (see :mod:`full_data`) has its image, crop, degradation, t, x_T
and posterior noise drawn from seeds (seed, g), so N processes with batch B compute the same
gradient (up to float rounding) as one process with batch N x B, and the sampler position is the
step count. Checkpoints (``state.pt``, rank 0, written atomically) hold the LoRA factors, the
ControlNet, the optimiser, the step and the RNG states; the frozen weights stay in the init
directory, whose sha256 the checkpoint records.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from flowie.model import load_stage
from flowie.modeldir import read_model_dir
from flowie.nets.flow_unet import FlowUNet, UNetConfig
from flowie.nets.vae import CondEncoder, VaeConfig
from flowie.train import distributed
from flowie.train.full_data import FullDataset
from flowie.train.init import VAE_ENCODER, read_init
from flowie.train.lora import inject_lora
from flowie.train.prefetch import single_thread_worker

log = logging.getLogger(__name__)

STATE_FORMAT = 1
T_MAX = 999  # t is drawn from {1, ..., 999} and seen by the network as that float


@dataclass
class FullConfig:
    init: str
    images: str
    out: str
    steps: int = 1000
    batch: int = 1  # per process and micro-batch
    accum: int = 1  # micro-batches per optimiser step
    crop: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.01  # torch AdamW's default, which the official configure_optimizers keeps
    lora_rank: int = 0  # 0: the rank of the init's config (4 for the official BFR model)
    degradation: str = "face"
    seed: int = 0
    bf16: bool = False
    grad_checkpointing: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    export_every: int = 0
    log_every: int = 10
    val_images: str | None = None  # held-out images for the validation loss and previews
    val_every: int = 0
    val_samples: int = 4
    data_workers: int = 0  # >0: processes that load and degrade the next micro-batches ahead of the step
    device: str = "cpu"

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.out) / "checkpoints"

    def fingerprint(self, global_batch: int, init_sha: str) -> str:
        """What a resumed run must share (not the step count, paths, device or split over processes)."""
        data = asdict(self)
        for key in ("steps", "out", "checkpoint_dir", "checkpoint_every", "export_every", "log_every", "device",
                    "val_images", "val_every", "val_samples", "data_workers",
                    "batch", "accum", "init", "bf16", "grad_checkpointing"):
            data.pop(key)
        return json.dumps({**data, "global_batch": global_batch, "init_sha256": init_sha}, sort_keys=True)


def sample_seed(seed: int, stream: int, g: int) -> int:
    return int(np.random.SeedSequence([seed, stream, g]).generate_state(1)[0])


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Turn on diffusers' per-block activation checkpointing in every block of ``module``; returns the count."""
    count = 0
    ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for sub in module.modules():
        if hasattr(sub, "gradient_checkpointing"):
            sub.gradient_checkpointing = True
            sub._gradient_checkpointing_func = ckpt
            count += 1
    return count


class FullTrainer:
    """Builds the networks from the init directory and trains; ``progress(step, total, loss, images_per_s)``."""

    def __init__(self, cfg: FullConfig, world: distributed.World = distributed.World(),
                 progress: Callable[[int, int, float, float], None] | None = None):
        self.cfg, self.world, self.progress = cfg, world, progress
        self.device = distributed.device_for(cfg.device, world)
        self.info = read_model_dir(cfg.init)
        init = read_init(cfg.init)
        self.init_sha = self.info.source_sha256
        self.rank = cfg.lora_rank or int(init.get("lora_rank", 0))
        stages = self.info.stages
        self.swinir = load_stage(self.info, "swinir", self.device)
        self.cond_encoder = load_stage(self.info, "cond_encoder", self.device)
        self.vae_encoder = CondEncoder(VaeConfig.from_dict(stages["cond_encoder"]["vae"]), latent_scale=1.0)
        self.vae_encoder.load_state_dict(load_file(str(Path(cfg.init) / f"{VAE_ENCODER}.safetensors")), strict=True)
        self.vae_encoder.to(self.device).eval().requires_grad_(False)
        self.scale_factor = self.info.scale_factor
        self.flow = FlowUNet(UNetConfig.from_dict(stages["flow_unet"]["unet"]),
                             control_scales=stages["flow_unet"].get("control_scales"))
        self.flow.load_state_dict(load_file(str(self.info.weight_path("flow_unet"))), strict=True)
        self.flow.unet.requires_grad_(False)
        lora = inject_lora(self.flow.unet, self.rank, seed=cfg.seed) if self.rank else []
        self.flow.controlnet.requires_grad_(True)
        if cfg.grad_checkpointing:
            enable_gradient_checkpointing(self.flow)
        self.flow.to(self.device).train()
        self.params = [*lora, *self.flow.controlnet.parameters()]
        self.model = distributed.wrap(self.flow, world, self.device)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.null_context = load_file(str(self.info.weight_path("null_context")))["null_context"].to(self.device)
        self.data = FullDataset(cfg.images, cfg.crop, cfg.degradation, cfg.seed)
        self.global_batch = cfg.batch * cfg.accum * world.size
        self.step = 0
        self._val_data: FullDataset | None = None
        self._prefetch: tuple[int, object] | None = None  # (next micro-batch index, its iterator)
        self._val_decoder: nn.Module | None = None

    # ------------------------------------------------------------------ one step

    def _noise(self, first: int, size: int, latent_hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """t (int), x_T and the posterior noise of samples first..first+size-1, each from its own seed."""
        ts, x_T, post = [], [], []
        for g in range(first, first + size):
            gen = torch.Generator().manual_seed(sample_seed(self.cfg.seed, 3, g))
            ts.append(torch.randint(1, T_MAX + 1, (1,), generator=gen))
            x_T.append(torch.randn(4, *latent_hw, generator=gen))
            post.append(torch.randn(4, *latent_hw, generator=gen))
        return torch.cat(ts), torch.stack(x_T), torch.stack(post)

    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _first_sample(self, k: int) -> int:
        """Global index of this process's first sample in micro-batch ``k`` of the run."""
        return (k * self.world.size + self.world.rank) * self.cfg.batch

    def _micro_batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.data_workers <= 0:
            return self.data.batch(self._first_sample(k), self.cfg.batch)
        if self._prefetch is None or self._prefetch[0] != k:
            total = self.cfg.steps * self.cfg.accum
            loader = torch.utils.data.DataLoader(_MicroBatches(self, k, total), batch_size=None, shuffle=False,
                                                 num_workers=self.cfg.data_workers, prefetch_factor=4,
                                                 worker_init_fn=single_thread_worker)
            self._prefetch = (k, iter(loader))
        _, batches = self._prefetch
        self._prefetch = (k + 1, batches)
        return next(batches)

    def micro_loss(self, first: int, size: int, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The rectified-flow loss of samples first..first+size-1 (grad flows into LoRA + ControlNet)."""
        clean, lq = batch if batch is not None else self.data.batch(first, size)
        clean, lq = clean.to(self.device), lq.to(self.device)
        with torch.no_grad(), self._autocast():
            restored = self.swinir(lq)
            c_latent = self.cond_encoder(restored).float()
            moments = self.vae_encoder.moments(clean).float()
        mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30.0, 20.0)
        t, x_T, post = (x.to(self.device) for x in self._noise(first, size, tuple(mean.shape[-2:])))
        x_0 = (mean + torch.exp(0.5 * logvar) * post) * self.scale_factor
        tn = (t.float() / T_MAX).view(-1, 1, 1, 1)
        x_t = tn * x_T + (1.0 - tn) * x_0
        context = self.null_context.expand(size, -1, -1)
        with self._autocast():
            v = self.model(x_t, t.float(), c_latent, context)
        return F.mse_loss(v.float(), x_0 - x_T)

    def train_step(self) -> float:
        """One optimiser step over ``accum`` micro-batches; returns the loss averaged over all processes."""
        cfg, world = self.cfg, self.world
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for m in range(cfg.accum):
            k = self.step * cfg.accum + m
            last = m == cfg.accum - 1
            sync = self.model.no_sync() if (world.distributed and not last) else contextlib.nullcontext()
            with sync:
                loss = self.micro_loss(self._first_sample(k), cfg.batch, self._micro_batch(k)) / cfg.accum
                loss.backward()
            total += loss.detach()
        self.optimizer.step()
        self.step += 1
        return float(distributed.mean_over_ranks(total, world))

    # ------------------------------------------------------------------ the loop

    def run(self, resume: bool = False, stop_after: int | None = None) -> None:
        """Train to ``cfg.steps`` (from the checkpoint when ``resume``); rank 0 writes checkpoints and exports."""
        cfg = self.cfg
        if resume:
            self.load_checkpoint()
        logger = _Logger(cfg.ckpt_dir, self.world.is_main)
        started = time.perf_counter()
        seen = 0
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                seen += self.global_batch
                rate = seen / max(time.perf_counter() - started, 1e-9)
                if self.progress:
                    self.progress(self.step, cfg.steps, loss, rate)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logger.scalars(self.step, {"loss": loss, "images_per_s": rate})
                if self.world.is_main and cfg.val_images and cfg.val_every and self.step % cfg.val_every == 0:
                    val_loss, previews = self.validate()
                    logger.scalars(self.step, {"val_loss": val_loss}, prefix="val")
                    logger.images(self.step, previews)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if cfg.export_every and self.step % cfg.export_every == 0 and self.step < cfg.steps:
                    self.export(Path(cfg.out) / f"step-{self.step:07d}")
                if stop_after is not None and self.step >= stop_after:
                    break
            self.save_checkpoint()
            if self.step >= cfg.steps:
                self.export(cfg.out)
        finally:
            logger.close()

    @torch.no_grad()
    def validate(self) -> tuple[float, dict[str, torch.Tensor]]:
        """Loss on fixed held-out samples at fixed t (1/n .. 1 of 999), and one-step previews x_T + v at t = 999.

        Runs the unwrapped network on rank 0 only (no collective), in eval mode; training state is untouched.
        """
        if self._val_data is None:
            self._val_data = FullDataset(self.cfg.val_images, self.cfg.crop, self.cfg.degradation, self.cfg.seed + 1)
            self._val_decoder = load_stage(self.info, "vae_decoder", self.device)
        n = self.cfg.val_samples
        clean, lq = (x.to(self.device) for x in self._val_data.batch(0, n))
        restored = self.swinir(lq)
        c_latent = self.cond_encoder(restored)
        x_0 = self.vae_encoder(clean) * self.scale_factor  # posterior mode: no sampling noise in validation
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        x_T = torch.randn(x_0.shape, generator=gen).to(self.device)
        t = torch.linspace(T_MAX / n, T_MAX, n).round().to(self.device)
        tn = (t / T_MAX).view(-1, 1, 1, 1)
        context = self.null_context.expand(n, -1, -1)
        self.flow.eval()
        try:
            v = self.flow(tn * x_T + (1 - tn) * x_0, t, c_latent, context)
            v_999 = self.flow(x_T, torch.full_like(t, float(T_MAX)), c_latent, context)
        finally:
            self.flow.train()
        loss = float(F.mse_loss(v, x_0 - x_T))
        previews = {"lq": lq, "swinir": restored.clamp(0, 1), "one_step": self._val_decoder(x_T + v_999).clamp(0, 1),
                    "clean": clean}
        return loss, previews

    # ------------------------------------------------------------------ checkpoints

    def lora_state(self) -> dict[str, torch.Tensor]:
        """LoRA factors keyed like the official layout: ``<unet module>.lora_down.weight`` / ``.lora_up.weight``."""
        out = {}
        for name, param in self.flow.unet.named_parameters():
            if ".parametrizations.weight.0." in name:
                module, _, leaf = name.partition(".parametrizations.weight.0.")
                out[f"{module}.lora_{leaf}.weight"] = param.detach().cpu().clone()
        return out

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.flow.unet.named_parameters())
        expected = self.lora_state()
        if set(state) != set(expected):
            raise ValueError("the checkpoint's LoRA layers differ from this model's")
        for key, value in state.items():
            module, _, leaf = key.rpartition(".lora_")
            params[f"{module}.parametrizations.weight.0.{leaf.removesuffix('.weight')}"].data.copy_(value)

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes ``state.pt`` (tmp file + rename); every rank waits for it."""
        path = self.cfg.ckpt_dir / "state.pt"
        if self.world.is_main:
            self.cfg.ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "format": STATE_FORMAT,
                "fingerprint": self.cfg.fingerprint(self.global_batch, self.init_sha),
                "init": str(self.cfg.init),
                "step": self.step,
                "lora_rank": self.rank,
                "lora": self.lora_state(),
                "controlnet": {k: v.detach().cpu() for k, v in self.flow.controlnet.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            }
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(state, tmp)
            os.replace(tmp, path)
        distributed.barrier(self.world)
        return path

    def load_checkpoint(self) -> bool:
        """Continue from ``state.pt`` if there is one; False when starting fresh."""
        path = self.cfg.ckpt_dir / "state.pt"
        if not path.is_file():
            log.info("no checkpoint in %s: starting from step 0", self.cfg.ckpt_dir)
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} has checkpoint format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state["fingerprint"] != self.cfg.fingerprint(self.global_batch, self.init_sha):
            raise ValueError(f"{path} was written by a run with other options (init, data, seed, global batch, "
                             "LoRA rank or lr); resume with the same ones or pass another --checkpoint-dir")
        self.load_lora_state(state["lora"])
        self.flow.controlnet.load_state_dict(state["controlnet"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ export

    def export(self, out: str | Path) -> Path | None:
        """Rank 0 writes a model directory `flowie serve` runs, LoRA merged as `flowie convert` merges."""
        if not self.world.is_main:
            return None
        from flowie.train.export import export_model

        controlnet = {k: v.detach().cpu() for k, v in self.flow.controlnet.state_dict().items()}
        return export_model(self.cfg.init, self.lora_state(), controlnet, out, steps=self.step)


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batches start..stop-1 of one process; each a pure function of its index, so workers change nothing."""

    def __init__(self, trainer: FullTrainer, start: int, stop: int):
        self.data, self.start, self.stop = trainer.data, start, stop
        self.world, self.batch = trainer.world, trainer.cfg.batch

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.start + j
        return self.data.batch((k * self.world.size + self.world.rank) * self.batch, self.batch)


class _Logger:
    """Scalars to TensorBoard when the package is installed, and always to ``log.jsonl`` (rank 0 only)."""

    def __init__(self, folder: Path, active: bool):
        self.active = active
        self.writer = None
        self.file = None
        if not active:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))
        except ImportError:
            self.writer = None

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.active:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        """Image batches [N,3,H,W] in [0,1] (TensorBoard only: the JSONL log holds numbers)."""
        if self.active and self.writer is not None:
            for key, value in images.items():
                self.writer.add_images(f"val/{key}", value.float().cpu(), step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer is not None:
            self.writer.close()

