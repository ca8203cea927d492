"""``Pipeline.enhance`` per engine configuration: what a worker computes per batch.

Each configuration is ``EngineConfig.for_device`` with a dtype, ``torch_compile`` and overrides,
built by ``engines.build_pipeline`` from the model directory; uint8 images in and out (pre- and
post-processing, the sampler loop and the colour fix included). BFR (mean-value, 4 evaluations)
and BSR-style one-step (1 evaluation) at the bench's size, per batch size; wall clock, median of
repeats after two untimed calls (CUDA-graph capture, cuDNN's search, a compile). The answers are
then PNG-encoded as the worker does, timed apart, and compared with the ``fp32`` configuration's
answers to the same requests (PSNR of the uint8 images, goal 40 dB).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import engines
from flowie.params import EnhanceParams

from .report import log, median, psnr_db

# name: (dtype, torch_compile, overrides). "fp32" is the anchor every answer is checked against.
CONFIGS: dict[str, tuple[str, bool, str]] = {
    "fp32": ("float32", False, "cuda_graphs=off,cudnn_benchmark=off,control_stream=off"),
    "served_eager": ("auto", False, ""),
    "served": ("auto", True, ""),
    "bf16": ("bfloat16", False, ""),
    "no_graphs": ("auto", False, "cuda_graphs=off"),
    "no_cudnn_benchmark": ("auto", False, "cudnn_benchmark=off"),
    "no_control_stream": ("auto", False, "control_stream=off"),
    "channels_last": ("auto", False, "channels_last=all"),
}
COMMON = {"upscale": 1.0, "min_side": 0, "tile": "off", "color_fix": "wavelet"}
WORKLOADS = {"bfr": EnhanceParams(sampler="mean_value", **COMMON), "bsr": EnhanceParams(sampler="one_step", **COMMON)}


def engine_config(name: str, device: torch.device) -> engines.EngineConfig:
    """The named configuration on ``device``; ValueError when it cannot run there (the reason)."""
    dtype, compiled, overrides = CONFIGS[name]
    return engines.EngineConfig.for_device(str(device), dtype=dtype, torch_compile=compiled, overrides=overrides)


def synthetic_image(size: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(size, size, 3, generator=gen) * 255).round().to(torch.uint8).numpy()


def _pixels(results) -> torch.Tensor:
    """[N, H, W, 3] float in [0, 1] of a batch's answers."""
    return torch.from_numpy(np.stack([r.image for r in results])).float() / 255


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(name: str, rec: dict, config: engines.EngineConfig, model_dir, batches: list[int], size: int,
               reps: tuple[int, int, float], answers: dict, remaining) -> None:
    """Time one configuration. ``answers[(workload, batch)]``: the anchor's answers, set by the first
    configuration run (``fp32`` when listed first); later rows record ``vs_fp32`` against them, every
    row ``repeat``: its last answers against its first call's (same seeds)."""
    from service.imaging import submit_encode

    device = torch.device(config.device)
    min_reps, max_reps, target_s = reps
    rec["engine"] = config.describe()
    t0 = time.perf_counter()
    pipe = engines.build_pipeline(model_dir, config)
    rec["build_s"] = time.perf_counter() - t0
    image = synthetic_image(size, seed=3)
    codec = ThreadPoolExecutor(max_workers=config.codec_threads)
    rec["workloads"] = {}
    try:
        for workload, params in WORKLOADS.items():
            rows = rec["workloads"][workload] = {}
            for b in batches:
                if remaining() < 15:
                    rows[str(b)] = {"status": "skipped", "reason": "time limit reached"}
                    continue
                images, seeds = [image] * b, list(range(b))
                first = []
                for _ in range(2):
                    _sync(device)
                    t1 = time.perf_counter()
                    out = pipe.enhance(images, params, seeds=seeds, keep_restored=False)
                    _sync(device)
                    first.append(round((time.perf_counter() - t1) * 1000, 1))
                    if len(first) == 1:
                        warm = _pixels(out)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times: list[float] = []
                while len(times) < min_reps or (sum(times) < target_s and len(times) < max_reps):
                    _sync(device)
                    t1 = time.perf_counter()
                    out = pipe.enhance(images, params, seeds=seeds, keep_restored=False)
                    _sync(device)
                    times.append(time.perf_counter() - t1)
                got = _pixels(out)
                anchor = answers.setdefault((workload, b), got)  # the first configuration run is the anchor
                encode = []
                bands = max(1, config.codec_threads // b)  # the worker shares its codec threads out so
                for _ in range(3):
                    t1 = time.perf_counter()
                    for future in [submit_encode(codec, r.image, "png", None, config.png_compress_level, bands)
                                   for r in out]:
                        future.result()
                    encode.append(time.perf_counter() - t1)
                batch_ms = median(times) * 1000
                row = rows[str(b)] = {
                    "status": "done", "batch_ms": batch_ms, "img_per_s": b / (batch_ms / 1000), "reps": len(times),
                    "first_calls_ms": first, "answer_shape": list(out[0].image.shape),
                    "stages_ms": {k: round(v * 1000, 3) for k, v in out[0].timings.items()},
                    "encode_png_batch_ms": median(encode) * 1000, "repeat": psnr_db(got, warm)}
                if anchor is not got:
                    row["vs_fp32"] = psnr_db(got, anchor)
                if device.type == "cuda":
                    row["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                check = row.get("vs_fp32", row["repeat"])
                log(f"{name} {workload} b={b}: {batch_ms:.1f} ms/batch, {row['img_per_s']:.2f} img/s, "
                    f"first calls {first} ms, PSNR {'exact' if check['exact'] else check['psnr_db']}")
    finally:
        codec.shutdown()
        del pipe
