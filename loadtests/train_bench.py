#!/usr/bin/env python3
"""Training-step benchmark of `flowie train --arch full`: step time, images/s and peak memory.

Builds a full-size init directory from seeded random weights in the SD 2.1 ldm layout (the key
set of DiffBIR's full-size manifest; speed does not depend on weight values) with `flowie init`,
then times optimiser steps of the real trainer at ``--crop`` (512 by default) for each batch size
until one runs out of memory. Prints one JSON object: per batch, the median step time over
``--steps`` timed steps (after ``--warmup``), images/s, peak allocated memory, and, for the
schedule given by ``--schedule-steps`` x ``--schedule-gpus`` at the fastest batch, the
projected GPU-hours (single-GPU speed x steps x GPUs / GPUs-per-step: data-parallel overheads
not included).

    python loadtests/train_bench.py --device cuda --bf16 --grad-checkpointing --batches 1,2,4,8

On the CPU with ``--config`` a tiny official-format YAML it runs in seconds (the tests do that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_sd_layout(config: str, path: Path, seed: int) -> None:
    """An SD-layout safetensors file with seeded random weights shaped for ``config``."""
    import torch
    from safetensors.torch import save_file

    from flowie.convert import load_config, parse_config
    from flowie.nets.flow_unet import FlowUNet
    from flowie.nets.vae import CondEncoder, VaeDecoder
    from flowie.train.official import official_state_dict

    spec = parse_config(load_config(config))
    torch.manual_seed(seed)
    with torch.device("meta"):
        flow, enc, dec = FlowUNet(spec.unet), CondEncoder(spec.vae, 1.0), VaeDecoder(spec.vae, 1.0)
    stages = {"swinir": {}, "cond_encoder": {}, "vae_encoder": enc.state_dict(), "vae_decoder": dec.state_dict(),
              "flow_unet": {f"unet.{k}": v for k, v in flow.unet.state_dict().items()} | {
                  f"controlnet.{k}": v for k, v in flow.controlnet.state_dict().items()}}
    official = official_state_dict(stages, {}, spec)
    keep = ("model.diffusion_model.", "first_stage_model.")
    sd = {k: (torch.randn(v.shape) * 0.02 if v.dim() > 1 else torch.zeros(v.shape)) for k, v in official.items()
          if k.startswith(keep)}
    save_file(sd, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="bfr_v1", help="preset or official YAML (default bfr_v1: full size)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--schedule-steps", type=int, default=250_000)
    parser.add_argument("--schedule-gpus", type=int, default=7)
    parser.add_argument("--workdir", default=None, help="where the init directory goes (default: a temp dir)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from flowie.convert import load_config, parse_config
    from flowie.train.full import FullConfig, FullTrainer
    from flowie.train.init import init_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="flowie-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = parse_config(load_config(args.config))
    t0 = time.perf_counter()
    random_sd_layout(args.config, work / "sd.safetensors", seed=0)
    np.save(work / "null.npy", np.random.default_rng(0).standard_normal((1, 77, spec.unet.context_dim)).astype(np.float32))
    init_model(args.config, work / "sd.safetensors", work / "null.npy", work / "init")
    report = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "torch": torch.__version__, "config": args.config, "crop": args.crop, "bf16": args.bf16,
              "grad_checkpointing": args.grad_checkpointing, "init_seconds": round(time.perf_counter() - t0, 1),
              "batches": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        cfg = FullConfig(init=str(work / "init"), images="skimage", out=str(work / "out"), steps=10**9, batch=batch,
                         crop=args.crop, degradation="face", bf16=args.bf16, grad_checkpointing=args.grad_checkpointing,
                         device=args.device)
        try:
            trainer = FullTrainer(cfg)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(args.warmup + args.steps):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                trainer.train_step()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            report["batches"][batch] = "out of memory"
            break
        step = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        report["batches"][batch] = {"step_s": round(step, 4), "images_per_s": round(batch / step, 3),
                                    "peak_gib": None if peak is None else round(peak, 2)}
        del trainer
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    measured = {b: r for b, r in report["batches"].items() if isinstance(r, dict)}
    if measured:
        best = max(measured, key=lambda b: measured[b]["images_per_s"])
        hours = args.schedule_steps * measured[best]["step_s"] / 3600
        report["schedule"] = {"steps": args.schedule_steps, "gpus": args.schedule_gpus, "per_gpu_batch": best,
                              "gpu_hours": round(hours * args.schedule_gpus, 1), "wall_hours": round(hours, 1),
                              "note": "single-GPU step time x steps; data-parallel overheads not included"}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
