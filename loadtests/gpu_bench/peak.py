"""The card's ceilings (dense matmul rates, copy bandwidth) and the networks' FLOPs per stage."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from engines.base import random_inputs
from flowie.convert import load_config, parse_config
from flowie.stages import STAGES

from .model import stage_modules


def _seconds(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` after one untimed call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def ceilings(rec: dict, device: torch.device, tiny: bool) -> None:
    """TFLOP/s of an n x n matmul per dtype, and GB/s of a device-to-device copy (read + write)."""
    n = 512 if tiny else 8192
    dtypes = {"fp32": torch.float32} if device.type == "cpu" else \
        {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    rates = {}
    for name, dtype in dtypes.items():
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        rates[name] = 2 * n**3 / _seconds(lambda a=a, b=b: a @ b, device, 5) / 1e12
    rec["matmul_tflops"] = rates
    src = torch.empty(2**22 if tiny else 2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    rec["copy_gb_per_s"] = 2 * src.numel() / _seconds(lambda: dst.copy_(src), device, 5) / 1e9


def stage_flops(rec: dict, config: str | dict, size: int) -> None:
    """FLOPs and parameters of each stage at batch 1 and ``size`` pixels, counted on the meta device."""
    with torch.device("meta"):
        modules = stage_modules(config)
    context = torch.zeros(1, 77, parse_config(load_config(config)).unet.context_dim)
    per_stage = {}
    for stage, module in modules.items():
        inputs = [x.to("meta") for x in random_inputs(STAGES[stage], 1, size, size, context, torch.Generator())]
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
        per_stage[stage] = {"flops": counter.get_total_flops(), "params": sum(p.numel() for p in module.parameters())}
    rec["per_stage_batch1"] = per_stage
    rec["size"] = size
