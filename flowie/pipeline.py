"""The FlowIE pipeline: SwinIR -> condition latent -> few-step flow -> VAE decode -> colour fix.

Stages are plain callables taking their StageSpec inputs positionally and returning one
tensor, so torch modules, ONNX Runtime sessions and TensorRT engines all plug in (the
``engines`` package adapts them). Batch-first: every stage runs once per batch.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowie import imageops, samplers, tiling
from flowie.colorfix import color_fix_
from flowie.modeldir import ModelInfo, read_model_dir
from flowie.params import EnhanceParams

StageFn = Callable[..., torch.Tensor]
STAGE_ORDER = ("swinir", "cond_encoder", "flow_unet", "vae_decoder")
PIXEL_TILE, PIXEL_STRIDE = 512, 448  # official tiled inference: 512 px tiles, stride 448
# Smallest padded side we run: at 64 px the UNet bottom is 1x1, where GroupNorm degenerates.
MIN_PADDED_SIDE = 128


@dataclass
class EnhanceResult:
    image: np.ndarray  # uint8 HWC RGB, the requested output size
    restored: np.ndarray  # uint8 HWC RGB stage-1 (SwinIR) output at the same size
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"


@dataclass
class BatchOutput:
    """Float outputs of one padded batch, NCHW, for checks and benchmarks."""

    image: torch.Tensor  # after colour fix, unclamped
    restored: torch.Tensor  # SwinIR output, unclamped
    latent: torch.Tensor | None
    timings: dict[str, float]


class TorchStage:
    """Wrap an eval-mode module: cast inputs to its dtype/device, return float32 outputs."""

    def __init__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.module, self.device, self.dtype = module, device, dtype

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = [x.to(self.device, torch.float32 if x.dim() == 1 else self.dtype) for x in inputs]
        return self.module(*cast).float()


class Pipeline:
    """Runs a model directory's stages; see :meth:`enhance`."""

    def __init__(self, info: ModelInfo, stages: dict[str, StageFn], null_context: torch.Tensor,
                 device: str | torch.device = "cpu", backend: str = "torch"):
        missing = [s for s in STAGE_ORDER if s not in stages]
        if missing:
            raise ValueError(f"pipeline needs the stages {missing}")
        self.info = info
        self.stages = stages
        self.device = torch.device(device)
        self.backend = backend
        self.null_context = null_context.to(self.device, torch.float32)
        self.sampler_config = dict(info.meta.get("sampler_config", {}))
        tiling_cfg = info.meta.get("tiling", {})
        self.latent_tile = int(tiling_cfg.get("latent_tile", 64))
        self.latent_stride = int(tiling_cfg.get("latent_stride", 56))
        self.max_untiled_pixels = int(tiling_cfg.get("max_untiled_pixels", 1024 * 1024))
        # The decoder tiles like the UNet unless the model says otherwise: a model whose UNet needs
        # small tiles (the demo) can still decode in large ones, where GroupNorm sees whole regions.
        self.decoder_tile = int(tiling_cfg.get("decoder_latent_tile", self.latent_tile))
        self.decoder_stride = int(tiling_cfg.get("decoder_latent_stride", self.latent_stride))

    @classmethod
    def from_model_dir(cls, path: str | Path, device: str = "cpu", dtype: str = "float32",
                       backend: str = "torch") -> Pipeline:
        """Eager PyTorch pipeline. Other back ends: ``engines.build_pipeline``."""
        if backend != "torch":
            raise ValueError(f"Pipeline.from_model_dir builds the torch back end; use engines.build_pipeline for {backend!r}")
        from flowie.model import load_null_context, load_stage, parse_dtype

        info = read_model_dir(path)
        dev = torch.device(device)
        torch_dtype = parse_dtype(dtype)
        stages = {name: TorchStage(load_stage(info, name, dev, torch_dtype), dev, torch_dtype) for name in STAGE_ORDER}
        return cls(info, stages, load_null_context(info), device=dev, backend="torch")

    # ------------------------------------------------------------------ public API

    def resolve(self, params: EnhanceParams) -> EnhanceParams:
        return params.with_defaults(self.info.defaults).validate()

    def plan(self, h: int, w: int, params: EnhanceParams) -> imageops.ResizePlan:
        """Resize plan of an h x w image; tiny images get extra zero padding (cropped afterwards)."""
        p = self.resolve(params)
        plan = imageops.plan_resize(h, w, float(p.upscale), int(p.min_side))
        padded = (max(plan.padded_hw[0], MIN_PADDED_SIDE), max(plan.padded_hw[1], MIN_PADDED_SIDE))
        return dataclasses.replace(plan, padded_hw=padded)

    def padded_shape(self, h: int, w: int, params: EnhanceParams) -> tuple[int, int]:
        return self.plan(h, w, params).padded_hw

    def enhance(self, images: Sequence[np.ndarray], params: EnhanceParams, seeds: Sequence[int] | None = None,
                noise: torch.Tensor | None = None, on_step: Callable[[int, int], None] | None = None
                ) -> list[EnhanceResult]:
        """Restore uint8 HWC RGB images. Images of different padded sizes run as separate batches.

        seeds: one per image (``params.seed`` or random when absent). noise: [N,4,h,w] initial
        latents, row i for image i (overrides seeds; for exact reproducibility).
        """
        p = self.resolve(params)
        images = [imageops.ensure_rgb(img) for img in images]
        if seeds is None:
            seeds = [p.seed if p.seed is not None else secrets.randbits(63) for _ in images]
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        plans = [self.plan(img.shape[0], img.shape[1], p) for img in images]
        results: list[EnhanceResult | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(plan.padded_hw, []).append(i)
        for idx in groups.values():
            start = time.perf_counter()
            lq = imageops.images_to_tensor([imageops.prepare(images[i], plans[i]) for i in idx])
            batch_noise = noise[idx] if noise is not None else None
            out = self.run_batch(lq, p, [int(seeds[i]) for i in idx], batch_noise, on_step=on_step)
            final = imageops.tensor_to_uint8(out.image)
            stage1 = imageops.tensor_to_uint8(out.restored)
            total = time.perf_counter() - start
            for row, i in enumerate(idx):
                timings = {**out.timings, "total": total}
                results[i] = EnhanceResult(
                    image=imageops.finish(final[row], plans[i]),
                    restored=imageops.finish(stage1[row], plans[i]),
                    seed=int(seeds[i]),
                    timings=timings,
                )
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ the algorithm

    def run_batch(self, lq: torch.Tensor, params: EnhanceParams, seeds: Sequence[int] | None = None,
                  noise: torch.Tensor | None = None, on_step: Callable[[int, int], None] | None = None
                  ) -> BatchOutput:
        """lq [B,3,H,W] in [0,1], H and W multiples of 64 -> float outputs. ``params`` resolved."""
        p = self.resolve(params)
        b, _, h, w = lq.shape
        if h % 64 or w % 64:
            raise ValueError(f"run_batch needs H, W multiples of 64, got {h}x{w}")
        timings: dict[str, float] = {}
        tiled = self._use_tiles(p.tile, h, w)
        lq = lq.to(self.device, torch.float32)

        restored = self._timed("swinir", timings, lambda: self._pixels_to_pixels(self.stages["swinir"], lq, tiled))
        if p.sampler == "restore_only":
            return BatchOutput(image=restored, restored=restored, latent=None, timings=timings)

        c_latent = self._timed("cond_encoder", timings,
                               lambda: self._pixels_to_latent(self.stages["cond_encoder"], restored, tiled))
        latent_shape = (b, 4, h // 8, w // 8)
        if noise is None:
            if seeds is None:
                raise ValueError("run_batch needs seeds or noise")
            x_T = samplers.initial_noise(latent_shape, seeds, device=self.device)
        else:
            x_T = noise.to(self.device, torch.float32)
            if tuple(x_T.shape) != latent_shape:
                raise ValueError(f"noise has shape {tuple(x_T.shape)}, expected {latent_shape}")
        context = self.null_context.expand(b, -1, -1)
        velocity = self._velocity(c_latent, context, tiled)
        latent = self._timed("flow_unet", timings, lambda: self._sample(velocity, x_T, p, on_step))
        decoded = self._timed("vae_decoder", timings,
                              lambda: self._latent_to_pixels(self.stages["vae_decoder"], latent, tiled))
        image = self._timed("colour_fix", timings, lambda: self._color_fix_in_place(p.color_fix, decoded, restored))
        return BatchOutput(image=image, restored=restored, latent=latent, timings=timings)

    @staticmethod
    @torch.inference_mode()  # a torch stage's output is an inference tensor: only written to in this mode
    def _color_fix_in_place(kind: str, decoded: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        # ``decoded`` is a fresh buffer of this batch (a stage's output or the tile accumulator)
        # and nothing reads it afterwards, so fixing it in place adds no image-sized buffer.
        return color_fix_(kind, decoded, restored)

    def _sample(self, velocity, x_T, p: EnhanceParams, on_step) -> torch.Tensor:
        cfg = self.sampler_config
        if p.sampler == "mean_value":
            mv = cfg.get("mean_value", {})
            official = mv.get("timesteps", [999, 799, 599, 399, 199])
            if int(p.steps) == len(official):
                ts, k = [float(t) for t in official], int(mv.get("midpoint_index", 3))
            else:
                ts, k = samplers.euler_timesteps(int(p.steps)), samplers.default_midpoint_index(int(p.steps))
            return samplers.mean_value(velocity, x_T, ts, k, on_step=on_step)
        if p.sampler == "euler":
            t_start = float(cfg.get("euler", {}).get("t_start", 999.0))
            return samplers.euler(velocity, x_T, samplers.euler_timesteps(int(p.steps), t_start), on_step=on_step)
        if p.sampler == "one_step":
            os_cfg = cfg.get("one_step", {"t": 999.0, "output": "x_plus_v"})
            return samplers.one_step(velocity, x_T, float(os_cfg["t"]), os_cfg.get("output", "x_plus_v"), on_step)
        raise ValueError(f"unknown sampler {p.sampler!r}")

    # ------------------------------------------------------------------ tiling helpers

    def _use_tiles(self, mode: str, h: int, w: int) -> bool:
        if mode == "off":
            return False
        if mode == "on":
            return h > PIXEL_TILE or w > PIXEL_TILE
        return tiling.needs_tiling(h, w, self.max_untiled_pixels)

    def _velocity(self, c_latent, context, tiled: bool):
        unet = self.stages["flow_unet"]
        if not tiled:
            return lambda x, t: unet(x, t, c_latent, context)

        def tiled_velocity(x, t):
            def per_tile(x_tile, c_tile):
                n = x_tile.shape[0]
                return unet(x_tile, t[:n], c_tile, context[:n])

            return tiling.tiled_apply(per_tile, [x, c_latent], self.latent_tile, self.latent_stride)

        return tiled_velocity

    def _pixels_to_pixels(self, fn, x, tiled):
        return tiling.tiled_apply(fn, [x], PIXEL_TILE, PIXEL_STRIDE) if tiled else fn(x)

    def _pixels_to_latent(self, fn, x, tiled):
        return tiling.tiled_apply(fn, [x], PIXEL_TILE, PIXEL_STRIDE, scale=1 / 8) if tiled else fn(x)

    def _latent_to_pixels(self, fn, z, tiled):
        return tiling.tiled_apply(fn, [z], self.decoder_tile, self.decoder_stride, scale=8) if tiled else fn(z)

    def _timed(self, name: str, timings: dict[str, float], fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return out
