#!/usr/bin/env python
"""Peak memory and time against image size, tiling on.

    python loadtests/scaling_bench.py --model DIR --sizes 1,4,16 --out DIR \
        [--sampler one_step|mean_value] [--device cpu|cuda] [--plot PNG]

For every size (megapixels, 1 MP = 10^6 pixels) a deterministic synthetic image, square-ish
with both sides multiples of 64, runs once with ``tile="on"``: through ``Pipeline.run_streamed``
on the uint8 image (``--path streamed``, the default: what ``enhance`` runs for one large image;
``--spill-dir`` keeps the SwinIR output in a file) or ``Pipeline.run_batch`` on float32
(``--path batch``).
Each size runs in a fresh child process, twice:

* ``real``: the model's networks. Records the pipeline's per-stage wall times and peak memory.
* ``null``: the same pipeline (same tiling, blending, sampler, colour fix) with every network
  replaced by a free function that returns a tensor of the right shape. Its peak is the memory
  the image-sized buffers need (input, SwinIR output, latents, tile accumulators and blend
  weights, colour-fix temporaries): what must grow with the image. ``real - null`` per stage
  is the working memory of the networks above those buffers, which tiling should keep flat.

Peak memory:
* CUDA: ``torch.cuda.max_memory_allocated`` (reset after model load and input allocation),
  minus ``memory_allocated`` at that point.
* CPU: resident set size from /proc/self/status. The peak RSS of a process is monotone and the
  allocator keeps freed pages, so numbers taken in one process across sizes mean nothing; each
  size gets a fresh process. After model load, a warm-up on one tile-sized image and
  ``malloc_trim``, the baseline is the current RSS (model + input); per stage the kernel's peak
  counter is reset to the current RSS (``echo 5 > /proc/self/clear_refs``) and read back
  (VmHWM) afterwards. Without clear_refs, ``ru_maxrss`` gives the process peak only.
  The children set up host memory as the service does (``--host-malloc``, default auto: on for
  the CPU, see service/hostmem.py), so the times are the service's.

On a CPU shared with other work, pass ``--threads`` no larger than the cores really free (1 on
the 2-core dev box): with more OpenMP threads than free cores every parallel region waits for a
time slice and the timings measure the load, not the pipeline (seen on a 2-core x86 VM, 2026-11-27).

Writes ``scaling.json`` and a plot to --out, prints a table and checks the two scaling claims
(memory flat once tiling engages: <= 1.2x between the two largest sizes; time ~ linear in
pixels). It reports; it never fails on a timing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtests"))
from memory_probe import CpuMemory, CudaMemory  # noqa: E402
from scaling_report import STAGES, format_claims, format_table, mib_text, plot  # noqa: E402

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NETWORK_STAGES = ("swinir", "cond_encoder", "flow_unet", "vae_decoder")
FLAT_LIMIT = 1.2  # the scaling target: peak memory may grow at most 1.2x from 4 to 16 MP
LINEAR_TOLERANCE = 0.15  # time per pixel within +-15% of the smallest size counts as linear


# ---------------------------------------------------------------------------- sizes


def image_shape(megapixels: float) -> tuple[int, int]:
    """(H, W), both multiples of 64 (>= 64), square-ish, H * W as close to mp * 10^6 as rounding allows."""
    if not megapixels > 0:
        raise ValueError(f"sizes must be positive megapixels, got {megapixels}")
    pixels = megapixels * 1e6
    h = max(64, 64 * round(math.sqrt(pixels) / 64))
    w = max(64, 64 * round(pixels / h / 64))
    return h, w


def parse_sizes(text: str) -> list[tuple[float | None, int, int]]:
    """"1,4,16" (megapixels) and/or explicit "HxW" (multiples of 64) -> [(mp or None, H, W)], by pixels."""
    sizes = []
    for item in (s.strip().lower() for s in text.split(",")):
        if not item:
            continue
        try:
            if "x" in item:
                h, w = (int(v) for v in item.split("x"))
                if h <= 0 or w <= 0 or h % 64 or w % 64:
                    raise ValueError
                sizes.append((None, h, w))
            else:
                mp = float(item)
                sizes.append((mp, *image_shape(mp)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad size {item!r}: megapixels (e.g. 4) or HxW with multiples of 64 (e.g. 576x128)") from None
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes needs at least one size")
    return sorted(set(sizes), key=lambda s: (s[1] * s[2], s[1]))


# ---------------------------------------------------------------------------- memory probes (child)


def synthetic_image(h: int, w: int, seed: int = 0):
    """[1, 3, H, W] float32 in [0, 1]: smooth colour gradients, sinusoidal texture and noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0.0, 1.0, h).view(h, 1)
    x = torch.linspace(0.0, 1.0, w).view(1, w)
    image = torch.empty(1, 3, h, w)
    for c in range(3):
        fy, fx = 3.0 + 2.0 * c, 5.0 - c
        channel = image[0, c]
        channel.copy_(0.5 + 0.2 * torch.sin(2 * math.pi * (fy * y + fx * x) + c))
        channel.add_(0.15 * (x - 0.5) * (1 if c % 2 else -1) + 0.1 * (y - 0.5))
        channel.add_(torch.randn(h, w, generator=gen), alpha=0.04)
    return image.clamp_(0.0, 1.0)


def _as_uint8(image):
    """[1, 3, H, W] float in [0, 1] -> uint8 H x W x 3 (what `enhance` hands to run_streamed)."""
    import torch

    return (image[0].permute(1, 2, 0) * 255).round_().to(torch.uint8).numpy()


class _Counted:
    """Stage wrapper counting calls (= tiles) and the input pixels they cover."""

    def __init__(self, fn):
        self.fn, self.calls, self.pixels = fn, 0, 0

    def __call__(self, *inputs):
        self.calls += 1
        self.pixels += int(inputs[0].shape[-2]) * int(inputs[0].shape[-1])
        return self.fn(*inputs)


def _null_stages(info):
    """Networks replaced by free shape-correct functions (memory of the pipeline's own buffers)."""
    import torch

    def swinir(x):
        return x.clone()

    def cond_encoder(x):
        b, _, h, w = x.shape
        return torch.zeros(b, 4, h // 8, w // 8, dtype=x.dtype, device=x.device)

    def flow_unet(x, t, c, ctx):
        return torch.zeros_like(x)

    def vae_decoder(z):
        b, _, h, w = z.shape
        return torch.zeros(b, 3, h * 8, w * 8, dtype=z.dtype, device=z.device)

    return {"swinir": swinir, "cond_encoder": cond_encoder, "flow_unet": flow_unet, "vae_decoder": vae_decoder}


def build_pipeline(model: str, mode: str, device: str, dtype: str, spill_dir: str | None = None):
    """The served pipeline (``engines.build_pipeline``); mode "null": its stages replaced by the
    zero-output stand-ins above, every other choice as served."""
    import engines
    from engines import EngineConfig

    config = EngineConfig.for_device(device, dtype=dtype, spill_dir=spill_dir or "off")
    if mode == "real":
        return engines.build_pipeline(model, config)
    from flowie.modeldir import read_model_dir

    return engines.build_pipeline(model, config, stages=_null_stages(read_model_dir(model)))


def run_child(args) -> dict:
    import torch

    from flowie.params import EnhanceParams

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mem = CudaMemory(device) if device.type == "cuda" else CpuMemory()
    rss_start = mem.current()
    t0 = time.perf_counter()
    pipe = build_pipeline(args.model, args.mode, args.device, args.dtype, args.spill_dir)
    load_s = time.perf_counter() - t0
    params = EnhanceParams(sampler=args.sampler, tile="on", color_fix=args.color_fix)
    resolved = pipe.resolve(params)

    warmup_s = None
    streamed = args.path == "streamed"
    if args.warmup:
        # One tile-sized image: the same tile shapes as the measured run, untiled; pays lazy
        # initialisation and kernel selection once so every size has the same fixed cost.
        t0 = time.perf_counter()
        if streamed:
            pipe.run_streamed(_as_uint8(synthetic_image(512, 512, seed=1)), params, seed=1)
        else:
            pipe.run_batch(synthetic_image(512, 512, seed=1).to(device), params, seeds=[1])
        warmup_s = time.perf_counter() - t0

    mem.trim()
    model_bytes = mem.current()
    # The input: the uint8 work image `enhance` hands to run_streamed, or a float32 batch of one.
    lq = _as_uint8(synthetic_image(args.h, args.w, seed=args.seed)) if streamed else \
        synthetic_image(args.h, args.w, seed=args.seed).to(device)
    mem.trim()
    baseline = mem.current()

    counters = {name: _Counted(pipe.stages[name]) for name in NETWORK_STAGES}
    pipe.stages.update(counters)
    stage_mem: dict[str, dict[str, int]] = {}
    stage_cpu: dict[str, float] = {}
    overall = {"peak": baseline}
    original_timed = pipe._timed

    def timed(name, timings, fn):
        overall["peak"] = max(overall["peak"], mem.peak())
        # Hand freed memory back first, so the stage's increase is its own and not a reuse of
        # pages the allocator kept from an earlier stage (outside the timed region).
        mem.trim()
        start = mem.current()
        mem.reset_peak()
        cpu0 = time.process_time()
        out = original_timed(name, timings, fn)
        stage_cpu[name] = stage_cpu.get(name, 0.0) + time.process_time() - cpu0
        peak = mem.peak()
        overall["peak"] = max(overall["peak"], peak)
        stage_mem[name] = {"start": start, "peak": peak, "end": mem.current()}
        return out

    pipe._timed = timed  # instance attribute: wraps this pipeline's stage timer only
    mem.reset_peak()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if streamed:
        out = pipe.run_streamed(lq, params, seed=args.seed)
    else:
        out = pipe.run_batch(lq, params, seeds=[args.seed])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    overall["peak"] = max(overall["peak"], mem.peak())
    # uint8 results are finite by construction; a NaN would have become 0 (tensor_to_uint8).
    finite = True if streamed else bool(torch.isfinite(out.image).all())
    result = {
        "mode": args.mode,
        "path": args.path,
        "spill_dir": args.spill_dir,
        "h": args.h,
        "w": args.w,
        "pixels": args.h * args.w,
        "sampler": resolved.sampler,
        "steps": resolved.steps,
        "color_fix": resolved.color_fix,
        "tiled": pipe._use_tiles("on", args.h, args.w),
        "memory_kind": mem.kind,
        "per_stage_peaks": bool(mem.can_reset),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "wall_s": wall,
        "timings_s": dict(out.timings),
        # CPU seconds of this process (all threads): on a shared machine less sensitive to other
        # users' load than wall time (it still includes contention effects such as cache misses).
        "cpu_s": cpu,
        "stage_cpu_s": stage_cpu,
        "memory_bytes": {
            "process_start": rss_start,
            "after_model_load": model_bytes,
            "baseline": baseline,
            "peak": overall["peak"],
            "peak_increase": overall["peak"] - baseline,
            "input_bytes": lq.nbytes if streamed else lq.numel() * lq.element_size(),
        },
        "stage_memory_bytes": {
            name: {**v, "increase": v["peak"] - v["start"], "above_baseline": v["peak"] - baseline}
            for name, v in stage_mem.items()
        },
        "tiles": {name: {"calls": c.calls, "input_pixels": c.pixels} for name, c in counters.items()},
        "output_finite": finite,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["memory_bytes"]["peak_reserved"] = mem.peak_reserved()
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


# ---------------------------------------------------------------------------- parent: run, analyse


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spawn(args, mode: str, h: int, w: int, out_dir: Path, tag: str) -> dict:
    result_path = out_dir / f"child-{tag}-{mode}.json"
    log_path = out_dir / f"child-{tag}-{mode}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode, "--model", str(args.model),
           "--h", str(h), "--w", str(w), "--device", args.device, "--dtype", args.dtype,
           "--seed", str(args.seed), "--result", str(result_path), "--path", args.path]
    if args.spill_dir:
        cmd += ["--spill-dir", str(args.spill_dir)]
    if args.sampler:
        cmd += ["--sampler", args.sampler]
    if args.color_fix:
        cmd += ["--color-fix", args.color_fix]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not args.warmup or mode == "null":
        cmd += ["--no-warmup"]
    cmd += ["--host-malloc", args.host_malloc]
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        # glibc: a fixed threshold turns off the dynamic one, so every allocation above it is its
        # own mapping, returned to the system when freed: RSS then follows live memory closely.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    load_before = _loadavg()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.child_timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{mode} run at {h}x{w} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result["child_elapsed_s"] = elapsed
    result["loadavg_before"], result["loadavg_after"] = load_before, _loadavg()
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _mean_load(child: dict) -> float | None:
    loads = [v[0] for v in (child.get("loadavg_before"), child.get("loadavg_after")) if v]
    return sum(loads) / len(loads) if loads else None


def summarise(mp: float, real: dict, null: dict | None) -> dict:
    """One row: times, total peak, image-sized buffers (null pipeline) and working memory."""
    pixels = real["pixels"]
    image_fp32 = 3 * pixels * 4  # one float32 RGB image of this size
    stages = {}
    for name in STAGES:
        rs = real["stage_memory_bytes"].get(name)
        ns = (null or {}).get("stage_memory_bytes", {}).get(name)
        entry = {"seconds": real["timings_s"].get(name), "cpu_seconds": real.get("stage_cpu_s", {}).get(name)}
        if rs is not None:
            entry["increase_bytes"] = rs["increase"]
            entry["above_baseline_bytes"] = rs["above_baseline"]
        if ns is not None:
            entry["null_increase_bytes"] = ns["increase"]
        if rs is not None and ns is not None:
            entry["working_bytes"] = rs["increase"] - ns["increase"]
        tiles = real["tiles"].get(name)
        if tiles:
            entry["tile_calls"] = tiles["calls"]
            entry["tile_input_pixels"] = tiles["input_pixels"]
            if entry["seconds"] is not None and tiles["calls"]:
                entry["seconds_per_call"] = entry["seconds"] / tiles["calls"]
        stages[name] = entry
    total = real["memory_bytes"]["peak_increase"]
    image_sized = null["memory_bytes"]["peak_increase"] if null else None
    per_stage_ok = real["per_stage_peaks"] and (null is None or null["per_stage_peaks"])
    working = None
    if per_stage_ok and null is not None:
        working = max(s["working_bytes"] for s in stages.values() if "working_bytes" in s)
    elif null is not None:
        working = total - image_sized
    network_s = sum(real["timings_s"].get(s, 0.0) for s in STAGES)
    return {
        "megapixels_requested": mp,
        "path": real.get("path", "batch"),
        "spill_dir": real.get("spill_dir"),
        "h": real["h"],
        "w": real["w"],
        "pixels": pixels,
        "megapixels": pixels / 1e6,
        "tiled": real["tiled"],
        "wall_s": real["wall_s"],
        "stages_s": network_s,
        "seconds_per_megapixel": real["wall_s"] / (pixels / 1e6),
        "cpu_s": real.get("cpu_s"),
        "loadavg_1min_mean": _mean_load(real),
        "peak_increase_bytes": total,
        "image_sized_bytes": image_sized,
        "working_bytes": working,
        "fp32_rgb_image_bytes": image_fp32,
        "peak_increase_in_images": total / image_fp32,
        "image_sized_in_images": (image_sized / image_fp32) if image_sized is not None else None,
        "baseline_bytes": real["memory_bytes"]["baseline"],
        "after_model_load_bytes": real["memory_bytes"]["after_model_load"],
        "stages": stages,
        "loadavg": [real["loadavg_before"], real["loadavg_after"]],
    }


def check_claims(rows: list[dict], flat_limit: float = FLAT_LIMIT, tolerance: float = LINEAR_TOLERANCE) -> dict:
    claims: dict = {"flat_limit": flat_limit, "linear_tolerance": tolerance}
    tiled = [r for r in rows if r["tiled"]]
    if len(tiled) >= 2:
        a, b = tiled[-2], tiled[-1]
        mem = {"from_mp": a["megapixels"], "to_mp": b["megapixels"], "pixel_ratio": b["pixels"] / a["pixels"]}
        for key in ("peak_increase_bytes", "working_bytes", "image_sized_bytes"):
            mem[key.replace("_bytes", "_ratio")] = _ratio(b[key], a[key])
        mem["total_holds"] = mem["peak_increase_ratio"] is not None and mem["peak_increase_ratio"] <= flat_limit
        mem["working_holds"] = mem["working_ratio"] is not None and mem["working_ratio"] <= flat_limit
        claims["memory_flat"] = mem
    else:
        claims["memory_flat"] = {"note": "needs two sizes with tiling engaged (a side > 512 px)"}
    if len(rows) >= 2:
        first = rows[0]
        per_px = [r["wall_s"] / r["pixels"] for r in rows]
        rel = [p / per_px[0] for p in per_px]
        xs = [math.log(r["pixels"]) for r in rows]
        ys = [math.log(r["wall_s"]) for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else None
        # Tiled work: tiles overlap, and the last tile is pulled back flush with the border, so the
        # pixels the networks actually process per image pixel vary with the size.
        work = []
        for r in rows:
            tiles = [r["stages"][s].get("tile_input_pixels") for s in ("swinir", "vae_decoder")]
            work.append(None if None in tiles else {"swinir_overlap": tiles[0] / r["pixels"],
                                                   "decoder_overlap": tiles[1] * 64 / r["pixels"]})
        # Prediction "time linear in the pixels the networks process": each stage's anchor time
        # scaled by its tiled input pixels, the untiled colour fix by the image pixels.
        predicted = []
        for r in rows:
            # Outside the stages (noise, sampler arithmetic): image-sized work, scaled by pixels.
            total = (first["wall_s"] - first["stages_s"]) * r["pixels"] / first["pixels"]
            for s in STAGES:
                t0, a, b = first["stages"][s]["seconds"] or 0.0, None, None
                if s in NETWORK_STAGES:
                    a, b = first["stages"][s].get("tile_input_pixels"), r["stages"][s].get("tile_input_pixels")
                total += t0 * (b / a if a and b else r["pixels"] / first["pixels"])
            predicted.append(total)
        claims["time_linear"] = {
            "predicted_by_tiled_work_s": predicted,
            "measured_vs_tiled_work_prediction": [r["wall_s"] / p for r, p in zip(rows, predicted, strict=True)],
            "anchor_mp": first["megapixels"],
            "time_ratio": [r["wall_s"] / first["wall_s"] for r in rows],
            "pixel_ratio": [r["pixels"] / first["pixels"] for r in rows],
            "time_per_pixel_vs_anchor": rel,
            "loglog_slope": slope,
            "tile_overlap": work,
            # linear: per-pixel time within +-tolerance of the anchor's; at most linear: never
            # more than tolerance above it (cheaper per pixel at large sizes is not a failure).
            "holds": all(abs(v - 1.0) <= tolerance for v in rel),
            "at_most_linear": all(v <= 1.0 + tolerance for v in rel),
            "holds_slope": slope is not None and abs(slope - 1.0) <= tolerance,
            "cpu_time_per_pixel_vs_anchor": (
                [(r["cpu_s"] / r["pixels"]) / (first["cpu_s"] / first["pixels"]) for r in rows]
                if all(r.get("cpu_s") for r in rows) else None
            ),
            "holds_vs_tiled_work": all(
                abs(r["wall_s"] / p - 1.0) <= tolerance for r, p in zip(rows, predicted, strict=True)
            ),
        }
    return claims


# ---------------------------------------------------------------------------- main


def write_report(args, argv, started, t_start, rows, raw, complete: bool) -> tuple[dict, Path, str]:
    """scaling.json (+ the plot when two sizes are in): rewritten after every size, so an
    interrupted run keeps what it measured (``complete`` false)."""
    claims = check_claims(rows)
    first = raw[0]["real"]
    device_name = first.get("gpu") or f"{_cpu_name()} ({os.cpu_count()} logical CPUs)"
    report = {
        "benchmark": "scaling",
        "complete": complete,
        "date_utc": started.isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - t_start,
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "model": str(args.model),
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "threads": first["threads"],
        "torch": first["torch"],
        "sampler": first["sampler"],
        "steps": first["steps"],
        "color_fix": first["color_fix"],
        "tile": "on",
        "memory_kind": first["memory_kind"],
        "per_stage_peaks": first["per_stage_peaks"],
        "malloc_mmap_threshold": args.malloc_mmap_threshold or None,
        "host_malloc": args.host_malloc,
        "loadavg_start_end": [raw[0]["real"]["loadavg_before"], _loadavg()],
        "rows": rows,
        "claims": claims,
        "raw": raw,
    }
    plot_path = args.plot or args.out / "scaling.png"
    spill = args.spill_dir if args.path == "streamed" and args.spill_dir not in (None, "off") else None
    where = f"{args.path}" + (f", spill {spill}" if spill in ("auto",) else ", SwinIR output spilled" if spill else "")
    title = (f"FlowIE scaling, {where}, tile=on, {report['sampler']}, {args.device} {device_name}, "
             f"{args.dtype}, {report['threads']} thread(s), {report['date_utc'][:10]}")
    if len(rows) >= 2:
        plot(rows, claims, plot_path, title)
        report["plot"] = str(plot_path)
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2))
    return report, plot_path, title


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (model.json + safetensors)")
    ap.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1,4,16"),
                    help="comma-separated megapixels (1 MP = 10^6 px; square-ish, sides multiples of 64) "
                         "and/or explicit HxW")
    ap.add_argument("--sampler", choices=["one_step", "mean_value", "euler"], default="one_step")
    ap.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default=None,
                    help="default: the model's (wavelet for the shipped models)")
    ap.add_argument("--path", choices=["streamed", "batch"], default="streamed",
                    help="streamed: Pipeline.run_streamed on the uint8 image, what `enhance` runs for a lone tiled "
                         "image (default); batch: Pipeline.run_batch on a float32 batch of one")
    ap.add_argument("--spill-dir", default=None,
                    help="streamed path: where the SwinIR output waits, as FLOWIE_SPILL_DIR reads it (auto, off "
                         "or a directory; default: RAM, i.e. off)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default="float32", help="network dtype (float32, float16, bfloat16)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the 512x512 warm-up run in each child")
    ap.add_argument("--no-null", dest="null", action="store_false",
                    help="skip the null-network runs (no split of image-sized vs working memory)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=0,
                    help="CPU, glibc: set MALLOC_MMAP_THRESHOLD_ (bytes, e.g. 131072) in the children so RSS "
                         "tracks live memory (less allocator noise; slower, for memory-only runs)")
    ap.add_argument("--host-malloc", choices=["auto", "on", "off"], default="auto",
                    help="the children's host memory, as the engine configuration's host_malloc (default auto: on for the "
                         "CPU, as `flowie serve` runs it; off with --malloc-mmap-threshold, which it would override)")
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds per child process")
    ap.add_argument("--out", type=Path, default=Path("scaling-out"))
    ap.add_argument("--plot", type=Path, default=None, help="plot path (default OUT/scaling.png)")
    # internal: one measurement in this process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["real", "null"], default="real", help=argparse.SUPPRESS)
    ap.add_argument("--h", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--w", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.malloc_mmap_threshold and args.host_malloc != "off":
        # hostmem's mallopt would replace the threshold the environment sets for the children.
        if args.host_malloc == "on":
            ap.error("--malloc-mmap-threshold needs --host-malloc off (or auto): both set glibc's mmap threshold")
        args.host_malloc = "off"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        from engines import EngineConfig
        from service import hostmem

        served = EngineConfig.for_device(args.device).host_malloc
        # first: as the service does before its threads start
        hostmem.apply(args.host_malloc == "on" or (args.host_malloc == "auto" and served))
        result = run_child(args)
        args.result.write_text(json.dumps(result))
        return 0

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    rows, raw = [], []
    for mp_index, (mp, h, w) in enumerate(args.sizes):
        tag = f"{h}x{w}"
        label = f"{mp:g} MP -> {tag}" if mp is not None else f"{tag} ({h * w / 1e6:.3f} MP)"
        print(f"[scaling] {label}: real run (load {_loadavg()})", flush=True)
        real = spawn(args, "real", h, w, out_dir, tag)
        null = None
        if args.null:
            print(f"[scaling] {label}: null-network run", flush=True)
            null = spawn(args, "null", h, w, out_dir, tag)
        row = summarise(mp, real, null)
        row["memory_kind"] = real["memory_kind"]
        rows.append(row)
        raw.append({"real": real, "null": null})
        print(f"[scaling]   wall {real['wall_s']:.2f} s, peak +{mib_text(row['peak_increase_bytes'])} MiB, "
              f"image-sized {mib_text(row['image_sized_bytes'])} MiB, working {mib_text(row['working_bytes'])} MiB "
              f"(child {real['child_elapsed_s']:.0f} s)", flush=True)
        if mp_index + 1 < len(args.sizes):
            write_report(args, argv, started, t_start, rows, raw, complete=False)

    report, plot_path, title = write_report(args, argv, started, t_start, rows, raw, complete=True)
    json_path = out_dir / "scaling.json"
    claims = report["claims"]
    print()
    print(f"{title}  (load {report['loadavg_start_end']})")
    print(format_table(rows))
    print()
    print(format_claims(claims))
    print(f"\nwrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
