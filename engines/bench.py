"""Timing helpers for `flowie bench`: per-stage and end-to-end, warm-up then median of N.

Times are wall-clock around complete calls; on CUDA the device is synchronised before and
after each call so queued kernels are counted where they run.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from engines.base import Engine, random_inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    runs = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        runs.append(time.perf_counter() - start)
    return runs


def summarise(runs: Sequence[float]) -> dict:
    """Milliseconds: median, min, max and every run."""
    ms = [r * 1000.0 for r in runs]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "runs_ms": [round(m, 3) for m in ms]}


def bench_stage(engine: Engine, batch: int, height: int, width: int, context: torch.Tensor,
                warmup: int, repeats: int, seed: int = 0) -> dict:
    """Time one engine on random inputs of one shape (``height``/``width`` in image pixels)."""
    inputs = random_inputs(engine.spec, batch, height, width, context, torch.Generator().manual_seed(seed))
    inputs = [x.to(engine.device) for x in inputs]
    return summarise(time_calls(lambda: engine(*inputs), engine.device, warmup, repeats))


def bench_end_to_end(pipe, batch: int, height: int, width: int, params, warmup: int, repeats: int,
                     seed: int = 0) -> dict:
    """Time ``pipe.run_batch`` on a random [batch, 3, height, width] image batch (untiled).

    Also reports the median of the pipeline's own per-stage timings (``flow_unet`` there is the
    whole sampler: every network evaluation of the run).
    """
    lq = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    seeds = list(range(batch))
    stage_runs: dict[str, list[float]] = {}

    def once():
        out = pipe.run_batch(lq, params, seeds)
        for name, seconds in out.timings.items():
            stage_runs.setdefault(name, []).append(seconds)

    runs = time_calls(once, pipe.device, warmup, repeats)
    result = summarise(runs)
    result["stages_median_ms"] = {name: statistics.median(v[warmup:]) * 1000.0 for name, v in stage_runs.items()}
    return result


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import os

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
