"""The FlowIE pipeline: SwinIR -> condition latent -> few-step flow -> VAE decode -> colour fix.

DiffBIR v1 models (model.json ``family: diffbir``) run the same stages with a diffusion sampler
(flowie.diffusion) in place of the flow sampler; the flow_unet stage then outputs eps or v.

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

import numpy as np
import torch

from flowie import diffusion, imageops, samplers, tiling
from flowie.colorfix import color_fix_, wavelet_fix_rows
from flowie.modeldir import ModelInfo
from flowie.params import EnhanceParams
from flowie.progress import report_stage
from flowie.rowstore import RowStore
from flowie.stages import STAGE_NAMES

StageFn = Callable[..., torch.Tensor]
# Official tiled inference: 512 px tiles, stride 448. A model may declare its own pixel tiles
# (model.json tiling.pixel_tile / pixel_stride); these are the defaults.
PIXEL_TILE, PIXEL_STRIDE = 512, 448
# Smallest padded side we run: at 64 px the UNet bottom is 1x1, where GroupNorm degenerates.
MIN_PADDED_SIDE = 128


@dataclass(frozen=True)
class PipelineOptions:
    """How a Pipeline arranges its work on large images (``engines.EngineConfig`` chooses them).

    tile_batch: batch rows (tiles x images) per network call on a tiled image; 1 = one tile at a
    time, the least memory; 0 = as many tiles as fill ``tile_area`` pixels (at least one).
    spill_dir: where a streamed run keeps the SwinIR output when it has at least
    ``spill_min_bytes`` (None = host RAM).
    """

    tile_batch: int = 1
    tile_area: int = PIXEL_TILE * PIXEL_TILE
    spill_dir: str | None = None
    spill_min_bytes: int = 0

    def tiles_per_call(self, tile_px: int) -> int:
        """Batch rows per network call for tiles of ``tile_px`` image pixels a side."""
        if self.tile_batch:
            return self.tile_batch
        return max(1, self.tile_area // (tile_px * tile_px))


@dataclass
class EnhanceResult:
    image: np.ndarray  # uint8 HWC RGB, the requested output size
    restored: np.ndarray | None  # uint8 HWC RGB stage-1 (SwinIR) output at the same size (if kept)
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"


@dataclass
class BatchOutput:
    """Float outputs of one padded batch, NCHW, for checks and benchmarks."""

    image: torch.Tensor  # after colour fix, unclamped
    restored: torch.Tensor  # SwinIR output, unclamped
    latent: torch.Tensor | None
    timings: dict[str, float]


@dataclass
class StreamedOutput:
    """Outputs of :meth:`Pipeline.run_streamed` for one padded image, uint8 HWC."""

    image: np.ndarray  # after colour fix
    restored: np.ndarray | None  # SwinIR output (when asked for)
    latent: torch.Tensor | None
    timings: dict[str, float]


# Colour fixes that can run on rows as they are decoded; AdaIN needs whole-image statistics first.
STREAMABLE_COLOR_FIXES = ("wavelet", "none")


class Pipeline:
    """Runs a model directory's stages; see :meth:`enhance`."""

    def __init__(self, info: ModelInfo, stages: dict[str, StageFn], null_context: torch.Tensor,
                 device: str | torch.device = "cpu", backend: str = "torch",
                 options: PipelineOptions = PipelineOptions()):  # noqa: B008 - frozen, shared safely
        missing = [s for s in STAGE_NAMES if s not in stages]
        if missing:
            raise ValueError(f"pipeline needs the stages {missing}")
        self.info = info
        self.stages = stages
        self.device = torch.device(device)
        self.backend = backend
        self.options = options
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
        # SwinIR and the cond encoder run on pixel tiles. Both sides must be multiples of 64: SwinIR
        # unshuffles by 8 and then works in 8-pixel windows, and the encoder's tiles land on whole
        # latents. Why a model would change them: docs/MODEL.md, tiling.
        self.pixel_tile = int(tiling_cfg.get("pixel_tile", PIXEL_TILE))
        self.pixel_stride = int(tiling_cfg.get("pixel_stride", PIXEL_STRIDE))
        _check_tiles("pixel", self.pixel_tile, self.pixel_stride, multiple=64)
        _check_tiles("latent", self.latent_tile, self.latent_stride)
        _check_tiles("decoder_latent", self.decoder_tile, self.decoder_stride)

    def with_options(self, **changes) -> Pipeline:
        """A pipeline on the same stages with some :class:`PipelineOptions` changed."""
        return Pipeline(self.info, self.stages, self.null_context, self.device, self.backend,
                        dataclasses.replace(self.options, **changes))

    # ------------------------------------------------------------------ public API

    def resolve(self, params: EnhanceParams) -> EnhanceParams:
        return params.with_defaults(self.info.defaults).validate().check_family(self.info.family)

    def plan(self, h: int, w: int, params: EnhanceParams) -> imageops.ResizePlan:
        """Resize plan of an h x w image; tiny images get extra zero padding (cropped afterwards)."""
        p = self.resolve(params)
        plan = imageops.plan_resize(h, w, float(p.upscale), int(p.min_side))
        padded = (max(plan.padded_hw[0], MIN_PADDED_SIDE), max(plan.padded_hw[1], MIN_PADDED_SIDE))
        return dataclasses.replace(plan, padded_hw=padded)

    def padded_shape(self, h: int, w: int, params: EnhanceParams) -> tuple[int, int]:
        return self.plan(h, w, params).padded_hw

    def enhance(self, images: Sequence[np.ndarray], params: EnhanceParams, seeds: Sequence[int] | None = None,
                noise: torch.Tensor | None = None, on_step: Callable[[int, int], None] | None = None,
                keep_restored: bool = True, step_noise: torch.Tensor | None = None) -> list[EnhanceResult]:
        """Restore uint8 HWC RGB images. Images of different padded sizes run as separate batches.

        seeds: one per image (``params.seed`` or random when absent). noise: [N,4,h,w] initial
        latents, row i for image i (overrides seeds; for exact reproducibility). step_noise:
        [steps,N,4,h,w], the tensor each ``ddpm`` step draws (diffusion models; default: drawn from
        the image's seeded generator after x_T, as the official code draws it). keep_restored:
        also return the stage-1 image (``EnhanceResult.restored``; None otherwise). The service
        does not send it, so it skips converting and resizing it.
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
            if len(idx) == 1 and self.streams(plans[idx[0]].padded_hw, p):
                i = idx[0]
                work = imageops.prepare(images[i], plans[i])
                streamed = self.run_streamed(work, p, int(seeds[i]), noise[i:i + 1] if noise is not None else None,
                                             on_step=on_step, keep_restored=keep_restored,
                                             step_noise=step_noise[:, i:i + 1] if step_noise is not None else None)
                del work
                restored = imageops.finish(streamed.restored, plans[i]) if streamed.restored is not None else None
                results[i] = EnhanceResult(image=imageops.finish(streamed.image, plans[i]), restored=restored,
                                           seed=int(seeds[i]),
                                           timings={**streamed.timings, "total": time.perf_counter() - start})
                continue
            lq = imageops.images_to_tensor([imageops.prepare(images[i], plans[i]) for i in idx], self.device)
            batch_noise = noise[idx] if noise is not None else None
            out = self.run_batch(lq, p, [int(seeds[i]) for i in idx], batch_noise, on_step=on_step,
                                 step_noise=step_noise[:, idx] if step_noise is not None else None)
            final = imageops.tensor_to_uint8(out.image)
            stage1 = imageops.tensor_to_uint8(out.restored) if keep_restored else None
            total = time.perf_counter() - start
            for row, i in enumerate(idx):
                timings = {**out.timings, "total": total}
                results[i] = EnhanceResult(
                    image=imageops.finish(final[row], plans[i]),
                    restored=imageops.finish(stage1[row], plans[i]) if stage1 is not None else None,
                    seed=int(seeds[i]),
                    timings=timings,
                )
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ the algorithm

    def run_batch(self, lq: torch.Tensor, params: EnhanceParams, seeds: Sequence[int] | None = None,
                  noise: torch.Tensor | None = None, on_step: Callable[[int, int], None] | None = None,
                  step_noise: torch.Tensor | None = None) -> BatchOutput:
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
        x_T, noise_fn = self._noise((b, 4, h // 8, w // 8), seeds, noise, step_noise)
        context = self.null_context.expand(b, -1, -1)
        velocity = self._velocity(c_latent, context, tiled)
        latent = self._timed("flow_unet", timings, lambda: self._sample(velocity, x_T, p, on_step, noise_fn))
        decoded = self._timed("vae_decoder", timings,
                              lambda: self._latent_to_pixels(self.stages["vae_decoder"], latent, tiled))
        image = self._timed("colour_fix", timings, lambda: self._color_fix_in_place(p.color_fix, decoded, restored))
        return BatchOutput(image=image, restored=restored, latent=latent, timings=timings)

    def streams(self, padded_hw: tuple[int, int], params: EnhanceParams) -> bool:
        """Whether :meth:`enhance` runs a lone image of this padded size through :meth:`run_streamed`."""
        p = self.resolve(params)
        return self._use_tiles(p.tile, *padded_hw) and p.color_fix in STREAMABLE_COLOR_FIXES

    def tiled(self, padded_hw: tuple[int, int], params: EnhanceParams) -> bool:
        """Whether the networks see tiles (not the whole image) for this padded size."""
        return self._use_tiles(self.resolve(params).tile, *padded_hw)

    def run_streamed(self, work: np.ndarray, params: EnhanceParams, seed: int | None = None,
                     noise: torch.Tensor | None = None, on_step: Callable[[int, int], None] | None = None,
                     keep_restored: bool = False, step_noise: torch.Tensor | None = None) -> StreamedOutput:
        """One padded uint8 HWC image -> uint8 outputs, holding nothing image-sized in float.

        The same algorithm as :meth:`run_batch` on tiles, and the same bits (the tests compare
        them), arranged so that memory stays flat as images grow:
        - SwinIR reads its input one tile row at a time from the uint8 image and writes finished
          rows to a :class:`RowStore` (host RAM, or a spill file when ``options.spill_dir`` is set);
        - the cond encoder reads its tile rows back from the store; latents (1/64 of the pixels)
          stay on the device;
        - the decoder hands over each finished band of rows (:func:`tiling.tiled_rows`), the
          wavelet fix corrects it against the stored SwinIR rows as soon as the rows below it
          within its halo exist, and the band lands in the uint8 result.
        On a GPU the device holds only tiles, bands and latents. ``color_fix`` must be wavelet or
        none (AdaIN needs whole-image statistics).
        """
        p = self.resolve(params)
        if work.dtype != np.uint8 or work.ndim != 3 or work.shape[2] != 3:
            raise ValueError(f"run_streamed needs a uint8 HWC RGB image, got {work.dtype} {work.shape}")
        h, w = work.shape[:2]
        if h % 64 or w % 64:
            raise ValueError(f"run_streamed needs H, W multiples of 64, got {h}x{w}")
        if p.color_fix not in STREAMABLE_COLOR_FIXES:
            raise ValueError(f"run_streamed cannot apply the {p.color_fix!r} colour fix; use run_batch")
        timings: dict[str, float] = {}
        opts = self.options
        spill = opts.spill_dir if opts.spill_dir and 12 * h * w >= opts.spill_min_bytes else None
        with RowStore(3, h, w, spill) as restored:
            def swinir() -> None:
                source = _Uint8Rows(work, self.device)
                for top, rows in tiling.tiled_rows(self.stages["swinir"], [source], self.pixel_tile,
                                                   self.pixel_stride,
                                                   tile_batch=self.tiles_per_call(self.pixel_tile)):
                    restored.write(top, rows)
                    del rows  # before the next tile row runs

            self._timed("swinir", timings, swinir)
            if p.sampler == "restore_only":
                image = _store_to_uint8(restored)
                return StreamedOutput(image=image, restored=image if keep_restored else None, latent=None,
                                      timings=timings)
            c_latent = self._timed("cond_encoder", timings, lambda: self._pixels_to_latent(
                self.stages["cond_encoder"], restored, tiled=True))  # tiles read back from the store
            x_T, noise_fn = self._noise((1, 4, h // 8, w // 8), None if seed is None else [seed], noise, step_noise)
            velocity = self._velocity(c_latent, self.null_context.expand(1, -1, -1), tiled=True)
            latent = self._timed("flow_unet", timings, lambda: self._sample(velocity, x_T, p, on_step, noise_fn))
            image = np.empty((h, w, 3), dtype=np.uint8)
            decoder_seconds = [0.0]

            def decoded_rows():
                # The decoder's tile rows, timed apart from the colour fix that pulls them.
                rows = tiling.tiled_rows(self.stages["vae_decoder"], [latent], self.decoder_tile,
                                         self.decoder_stride, scale=8,
                                         tile_batch=self.tiles_per_call(self.decoder_tile * 8))
                while True:
                    start = time.perf_counter()
                    block = next(rows, None)
                    self._sync()
                    decoder_seconds[0] += time.perf_counter() - start
                    if block is None:
                        return
                    yield block
                    del block  # before the next tile row runs

            def decode_and_fix() -> None:
                fixed = decoded_rows() if p.color_fix == "none" else wavelet_fix_rows(decoded_rows(), restored.read, h)
                for top, rows in fixed:
                    image[top:top + rows.shape[2]] = imageops.tensor_to_uint8(rows)[0]
                    del rows  # before the next tile row runs

            self._timed("vae_decoder", timings, decode_and_fix)
            # The fix and the uint8 conversion ran between the decoder's tile rows: report them apart.
            timings["colour_fix"] = timings["vae_decoder"] - decoder_seconds[0]
            timings["vae_decoder"] = decoder_seconds[0]
            stage1 = _store_to_uint8(restored) if keep_restored else None
        return StreamedOutput(image=image, restored=stage1, latent=latent, timings=timings)

    def _noise(self, shape: tuple[int, ...], seeds: Sequence[int] | None, noise: torch.Tensor | None,
               step_noise: torch.Tensor | None) -> tuple[torch.Tensor, diffusion.NoiseFn | None]:
        """x_T and, for diffusion models, the per-step noise: given, or drawn from each image's
        seeded generator after its x_T (the official order of draws)."""
        if self.info.family != "diffbir":
            return self._initial_noise(shape, seeds, noise), None
        if step_noise is not None:
            expected = tuple(shape)
            if tuple(step_noise.shape[1:]) != expected:
                raise ValueError(f"step noise has shape {tuple(step_noise.shape)}, expected [steps, *{expected}]")
            return self._initial_noise(shape, seeds, noise), diffusion.given_noise(step_noise, self.device)
        if seeds is None:
            raise ValueError("a diffusion sampler needs seeds or step noise")
        seeded = diffusion.SeededNoise(seeds, shape, self.device)
        x_T = seeded.draw()
        return (self._initial_noise(shape, seeds, noise) if noise is not None else x_T), seeded

    def _initial_noise(self, shape: tuple[int, ...], seeds: Sequence[int] | None, noise: torch.Tensor | None
                       ) -> torch.Tensor:
        if noise is None:
            if seeds is None:
                raise ValueError("run_batch needs seeds or noise")
            return samplers.initial_noise(shape, seeds, device=self.device)
        x_T = noise.to(self.device, torch.float32)
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        return x_T

    @staticmethod
    @torch.inference_mode()  # a torch stage's output is an inference tensor: only written to in this mode
    def _color_fix_in_place(kind: str, decoded: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        # ``decoded`` is a fresh buffer of this batch (a stage's output or the tile accumulator)
        # and nothing reads it afterwards, so fixing it in place adds no image-sized buffer.
        return color_fix_(kind, decoded, restored)

    def _sample(self, velocity, x_T, p: EnhanceParams, on_step, noise_fn=None) -> torch.Tensor:
        if self.info.family == "diffbir":
            return _diffusion_sample(velocity, x_T, p, self.info, on_step, noise_fn)
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
            return h > self.pixel_tile or w > self.pixel_tile
        return tiling.needs_tiling(h, w, self.max_untiled_pixels)

    def _velocity(self, c_latent, context, tiled: bool):
        unet = self.stages["flow_unet"]
        if not tiled:
            return lambda x, t: unet(x, t, c_latent, context)

        def tiled_velocity(x, t):
            def per_tile(x_tile, c_tile):
                n = x_tile.shape[0]
                if n == t.shape[0]:
                    return unet(x_tile, t, c_tile, context[:n])
                # tile_batch tiles stacked on the batch axis, each with the batch's N images
                copies = n // t.shape[0]
                return unet(x_tile, t.repeat(copies), c_tile, context.repeat(copies, 1, 1))

            return tiling.tiled_apply(per_tile, [x, c_latent], self.latent_tile, self.latent_stride,
                                      tile_batch=self.tiles_per_call(self.latent_tile * 8))

        return tiled_velocity

    def _pixels_to_pixels(self, fn, x, tiled):
        return (tiling.tiled_apply(fn, [x], self.pixel_tile, self.pixel_stride,
                                   tile_batch=self.tiles_per_call(self.pixel_tile))
                if tiled else fn(x))

    def _pixels_to_latent(self, fn, x, tiled):
        return (tiling.tiled_apply(fn, [x], self.pixel_tile, self.pixel_stride, scale=1 / 8,
                                   tile_batch=self.tiles_per_call(self.pixel_tile))
                if tiled else fn(x))

    def _latent_to_pixels(self, fn, z, tiled):
        return (tiling.tiled_apply(fn, [z], self.decoder_tile, self.decoder_stride, scale=8,
                                   tile_batch=self.tiles_per_call(self.decoder_tile * 8))
                if tiled else fn(z))

    def tiles_per_call(self, tile_px: int) -> int:
        return self.options.tiles_per_call(tile_px)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, name: str, timings: dict[str, float], fn):
        report_stage(name)  # to the call's watcher (flowie.progress), if any
        self._sync()
        start = time.perf_counter()
        out = fn()
        self._sync()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return out


def _diffusion_sample(model, x_T, p: EnhanceParams, info: ModelInfo, on_step, noise_fn) -> torch.Tensor:
    """Dispatch a diffusion sampler (``p`` resolved): the network output is eps or v (model.json)."""
    schedule = diffusion.Schedule.from_dict(info.meta.get("schedule", {}))
    steps, prediction = int(p.steps), info.prediction
    if p.sampler == "ddpm":
        return diffusion.ddpm(model, x_T, steps, noise_fn, prediction, schedule, on_step=on_step)
    if p.sampler == "ddim":
        return diffusion.ddim(model, x_T, steps, prediction, schedule, on_step=on_step)
    if p.sampler == "dpm_solver":
        return diffusion.dpm_solver(model, x_T, steps, prediction, schedule, on_step=on_step)
    raise ValueError(f"unknown diffusion sampler {p.sampler!r}")


class _Uint8Rows:
    """A row source over a uint8 HWC image: regions come out as float32 [1, 3, n, w] in [0, 1].

    Converted exactly as :func:`imageops.images_to_tensor` converts the whole image, one tile at
    a time: the tile's bytes go to the device and are converted there.
    """

    def __init__(self, image: np.ndarray, device: torch.device):
        self.image, self.device = image, device
        self.shape = (1, 3, image.shape[0], image.shape[1])

    def read(self, top: int, bottom: int, left: int = 0, right: int | None = None) -> torch.Tensor:
        region = torch.from_numpy(np.ascontiguousarray(self.image[None, top:bottom, left:right]))
        return imageops.bytes_to_unit_float(region.to(self.device)).permute(0, 3, 1, 2)


def _store_to_uint8(store: RowStore, band_rows: int = 256) -> np.ndarray:
    """The stored rows as uint8 HWC, converted band by band (as tensor_to_uint8 converts)."""
    _, _, h, w = store.shape
    out = np.empty((h, w, 3), dtype=np.uint8)
    for top in range(0, h, band_rows):
        bottom = min(top + band_rows, h)
        out[top:bottom] = imageops.tensor_to_uint8(store.read(top, bottom))[0]
    return out


def _check_tiles(name: str, tile: int, stride: int, multiple: int = 1) -> None:
    """Refuse a model.json tiling pair that cannot cover an image, naming the keys to fix."""
    keys = f"model.json tiling.{name}_tile / {name}_stride"
    if tile <= 0 or stride <= 0 or stride > tile:
        raise ValueError(f"{keys} = {tile} / {stride}: both must be positive and the stride at most the tile "
                         "(a larger stride leaves gaps)")
    if tile % multiple or stride % multiple:
        raise ValueError(f"{keys} = {tile} / {stride}: both must be multiples of {multiple}")
