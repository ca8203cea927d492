#!/usr/bin/env python3
"""FlowIE pipeline benchmark on a GPU: one script that measures every configuration in one run.

Builds the full-size FlowIE networks (``bfr_v1``: SwinIR, VAE cond encoder, SD2.1 UNet + ControlNet
with LoRA merged, VAE decoder) with seeded random weights -- speed does not depend on weight
values -- and measures at 512x512 (latent 64x64), per stage and end to end, for batch sizes
1, 4, 8, 16:

- modes: fp32 eager (the official-style baseline: torch defaults, no TF32 for matmuls), fp16 and
  bf16 eager (SDPA), + channels_last, + CUDA graphs (the whole pipeline, sampler loop included,
  captured once per batch size and workload), + torch.compile (the flow UNet and the VAE decoder
  by default; batch marked dynamic so batches 4-16 share one compile, batch 1 is a second one),
  + both; then fp32 with TF32 and a max-autotune flow UNet if the time limit still allows; every
  mode but the fp32 baseline lets cuDNN time its convolution algorithms (``cudnn.benchmark``),
  and an A/B mode (``nobench``: half-precision eager at the smallest and largest batch) runs
  without it, to say what the service's ``FLOWIE_CUDNN_BENCHMARK`` is worth; two more
  (``control_stream``: half-precision eager at the smallest and largest batch, and CUDA graphs
  at every batch) run the flow UNet's ControlNet on a second CUDA stream, for
  ``FLOWIE_CONTROL_STREAM``;
- workloads: BFR mean-value (4 evaluations + wavelet colour fix), BSR one-step (1 evaluation),
  SwinIR only, DiffBIR-style 50 Euler evaluations (measured at batch 1, derived elsewhere);
- the service path: ``Pipeline.enhance`` on the service's engines (per-stage CUDA graphs,
  uint8 in and out) at the smallest and largest batch, against the modes above, and the real
  worker on that pipeline with its answers encoded before or while the next batch computes;
  ``service_compile``: the same with ``--service-compile-stages`` compiled under the graphs
  (``FLOWIE_TORCH_COMPILE``'s words: on, all, or a stage list); every answer of both is checked
  against fp32 engines' answers to the same requests, and these rows count towards the targets;
  ``compile_probe``: the real worker with ``--probe-stages`` compiled, its warm-up (with the size
  probe) and then image sizes it never saw, counting dynamo's compiles after the warm-up (none due);
- the compute floor: FLOPs counted with ``torch.utils.flop_counter`` per stage at batch 1, the
  card's measured dense matmul rates and copy bandwidth, and the achieved fraction per mode;
- a numeric check of every fast mode against fp32 eager on the same inputs, weights and noise
  (PSNR of the final BFR and BSR images, flagged below 40 dB).

Timing: CUDA events around each repeat (and between stages), no host sync inside a timed
region, a synchronize only after the last repeat; warm-up first; the median is reported.

Results are written to ``<out>/gpu_bench.json`` after every measurement, so a run stopped by a
time limit still leaves its data; ``--time-limit-s`` skips (and records as skipped) whatever would
start after that many seconds. ``--tiny`` runs everything that runs on a CPU with a tiny
config in well under a minute (CUDA-only modes are recorded as skipped, with the reason).

    python3 loadtests/gpu_bench.py --out $OUT --time-limit-s 400  # on a GPU
    python3 loadtests/gpu_bench.py --tiny --out /tmp/bench        # anywhere
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # before the heavy imports: the time limit counts them too

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a plain checkout: the project is not installed there
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from flowie import samplers  # noqa: E402
from flowie.colorfix import WAVELET_LEVELS  # noqa: E402
from flowie.convert import OFFICIAL_BFR_TIMESTEPS, OFFICIAL_BSR_T, _stage_configs, load_config, parse_config  # noqa: E402
from flowie.model import build_stage  # noqa: E402

SCHEMA = "flowie-gpu-bench/1"
STAGES = ("swinir", "cond_encoder", "flow_unet", "vae_decoder")
BFR_MIDPOINT = 3  # official face model: x_T + v at t = 399 (4 evaluations)
PSNR_FLAG_DB = 40.0
# Guessed first-compile seconds per stage (torch.compile default mode, 16-core host), used only to
# decide whether a stage's compile still fits the time limit; the measured times go into the results.
COMPILE_GUESS_S = {"flow_unet": 90.0, "vae_decoder": 30.0, "cond_encoder": 25.0, "swinir": 70.0}
# The performance targets (H100, 512x512).
TARGETS = {"bfr_img_per_s": 50.0, "bfr_b1_ms": 35.0, "bsr_img_per_s": 80.0, "speedup_vs_fp32": 15.0}
OFFICIAL_FLOWIE_IMG_PER_S = 2.85  # the anchor: the official implementation's speed

# The tiny test model of ../shared/reference/tiny_bfr/model_config.yaml, in the preset vocabulary,
# embedded so that the script needs nothing but the repository on the GPU machine.
_TINY_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 1, 1, 2],
    "num_head_channels": 16, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 64, "legacy": False,
}
TINY_CONFIG = {
    "target": "model.cldm.Reflow_ControlLDM",
    "params": {
        "scale_factor": 0.18215,
        "timesteps": 1000,
        "lora_rank": 4,
        "control_stage_config": {"target": "model.cldm.ControlNet", "params": {**_TINY_UNET, "hint_channels": 4}},
        "unet_config": {"target": "model.cldm.ControlledUnetModel", "params": dict(_TINY_UNET)},
        "first_stage_config": {
            "use_fp16": False,
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 4,
                "ddconfig": {
                    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 32, "ch_mult": [1, 2, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                },
            },
        },
        "cond_stage_config": {"target": "torch.nn.Identity"},
        "preprocess_config": {
            "target": "model.swinir.SwinIR",
            "params": {
                "img_size": 16, "patch_size": 1, "in_chans": 3, "embed_dim": 24, "depths": [2, 2],
                "num_heads": [2, 2], "window_size": 8, "mlp_ratio": 2, "sf": 8, "img_range": 1.0,
                "upsampler": "nearest+conv", "resi_connection": "1conv", "unshuffle": True, "unshuffle_scale": 8,
            },
        },
    },
}


# ---------------------------------------------------------------- small helpers


def elapsed() -> float:
    return time.monotonic() - T_START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def clean(obj):
    """JSON-safe copy: non-finite floats become None (JSON has no inf/nan), tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return obj


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def psnr_db(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR of images clamped to [0, 1] (as they are served), peak 1; plus errors on the raw values.

    ``psnr_db`` is None when the images are identical (``exact``) or when ``out`` is not finite.
    """
    out = out.detach().float().cpu()
    ref = ref.detach().float().cpu()
    nonfinite = int((~torch.isfinite(out)).sum())
    result: dict = {"nonfinite": nonfinite, "exact": False, "psnr_db": None}
    if nonfinite:
        result["ok"] = False
        return result
    mse = float(((out.clamp(0, 1) - ref.clamp(0, 1)) ** 2).mean())
    diff = out - ref
    result["max_abs_err"] = float(diff.abs().max())
    result["rel_l2_err"] = float(diff.norm() / ref.norm().clamp_min(1e-12))
    if mse == 0.0:
        result["exact"] = True
        result["ok"] = True
        return result
    result["psnr_db"] = 10.0 * math.log10(1.0 / mse)
    result["ok"] = result["psnr_db"] >= PSNR_FLAG_DB
    return result


def _psnr_text(check: dict) -> str:
    """A ``psnr_db`` result in a few words, for the log and the table."""
    if check.get("nonfinite"):
        return "NaN!"
    if check.get("exact"):
        return "exact"
    if check.get("psnr_db") is None:
        return "no check"
    return f"PSNR {check['psnr_db']:.1f} dB" + ("" if check.get("ok") else "!")


class WaveletColourFix:
    """flowie.colorfix.wavelet_color_fix with its blur kernel made once, ahead of time.

    The library builds the 3x3 kernel with ``torch.tensor(...)`` on every call, a host-to-device
    copy that cannot be captured into a CUDA graph; the arithmetic here is the same (checked
    against the library in the ``build`` section and in tests/test_gpu_bench.py).
    """

    def __init__(self, device: torch.device, channels: int = 3):
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=device) / 16
        self.kernel = kernel.expand(channels, 1, 3, 3).contiguous()
        self.channels = channels

    def _blur(self, x: torch.Tensor, radius: int) -> torch.Tensor:
        padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
        return F.conv2d(padded, self.kernel.to(x.dtype), groups=self.channels, dilation=radius)

    def _decompose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        high = torch.zeros_like(x)
        for i in range(WAVELET_LEVELS):
            low = self._blur(x, 2**i)
            high = high + (x - low)
            x = low
        return high, x

    def __call__(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        content_high, _ = self._decompose(content)
        _, style_low = self._decompose(style)
        return content_high + style_low


class StageRunner(nn.Module):
    """One stage as the serving pipeline runs it (flowie.pipeline.TorchStage): inputs moved to the
    module's device and cast to the stage's dtype (``t``, 1-D, stays float32), optionally
    channels_last, output contiguous float32. The move matters for the streamed path, whose cond
    encoder reads its tiles from the SwinIR rows kept in host RAM."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.module, self.dtype, self.channels_last = module, dtype, channels_last
        self.device = next(module.parameters()).device

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = []
        for x in inputs:
            if x.dim() == 1:
                cast.append(x.to(self.device, torch.float32))
                continue
            x = x.to(self.device, self.dtype)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            cast.append(x)
        # Contiguous fp32 out whatever the inside ran in, so the next stage (and its compiled
        # guards) always sees the same strides.
        return self.module(*cast).float().contiguous()


@dataclass
class Mode:
    name: str
    dtype: torch.dtype
    channels_last: bool = False
    compile_mode: str | None = None  # torch.compile mode for the compiled stages, None = eager
    graphs: bool = False  # CUDA graph of each whole workload, one per batch size
    tf32: bool = False  # fp32 matmuls in TF32
    baseline: bool = False  # torch defaults: no cudnn.benchmark, fp32 matmuls in full precision
    cudnn_benchmark: bool | None = None  # None: on in every mode but the baseline
    batches: tuple[int, ...] | None = None  # only these batch sizes, and no DiffBIR run (an A/B mode)
    control_stream: bool = False  # the flow UNet's ControlNet on a second CUDA stream (FLOWIE_CONTROL_STREAM)

    def describe(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


class Timer:
    """Per-repeat marks: CUDA events on a GPU (no host sync until ``read``), perf_counter on a CPU."""

    def __init__(self, device: torch.device, reps: int, marks: int):
        self.cuda = device.type == "cuda"
        self.marks = marks
        if self.cuda:
            self.events = [[torch.cuda.Event(enable_timing=True) for _ in range(marks + 1)] for _ in range(reps)]
        else:
            self.stamps = [[0.0] * (marks + 1) for _ in range(reps)]

    def marker(self, rep: int) -> Callable[[], None]:
        index = [0]

        def mark() -> None:
            if self.cuda:
                self.events[rep][index[0]].record()
            else:
                self.stamps[rep][index[0]] = time.perf_counter()
            index[0] += 1

        mark()  # the start of the repeat
        return mark

    def read(self) -> list[list[float]]:
        """[rep][segment] milliseconds; call after a synchronize."""
        if self.cuda:
            return [[ev[i].elapsed_time(ev[i + 1]) for i in range(self.marks)] for ev in self.events]
        return [[(st[i + 1] - st[i]) * 1e3 for i in range(self.marks)] for st in self.stamps]


def _noop() -> None:
    return None


# ---------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / "gpu_bench.json"
        self.deadline = T_START + args.time_limit_s
        self.data: dict = {
            "schema": SCHEMA,
            "meta": {},
            "config": {},
            "peak": {},
            "flops": {},
            "checks": {},
            "sections": [],
            "modes": {},
            "notes": [],
        }
        self.masters: dict[str, nn.Module] = {}
        self.copies: dict[tuple, dict[str, nn.Module]] = {}
        self.compiled: dict[str, dict] = {}
        self.refs: dict[str, torch.Tensor] = {}
        # fp32 answers of the service path, by (workload, batch): what the service sections check against
        self.service_refs: dict[tuple[str, int], list] = {}
        self.colour_fix: WaveletColourFix | None = None

    # -------------------------------------------------------------- bookkeeping

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(elapsed(), 2)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(clean(self.data), indent=1, allow_nan=False))
        tmp.replace(self.json_path)

    def note(self, msg: str) -> None:
        self.data["notes"].append(msg)
        log("note: " + msg)

    def section(self, name: str, fn: Callable[[dict], None], needs_cuda: bool = False, min_s: float = 0.0,
                skip_reason: str | None = None) -> dict:
        rec: dict = {"name": name, "status": "skipped", "reason": None, "start_s": round(elapsed(), 2)}
        self.data["sections"].append(rec)
        if skip_reason:
            rec["reason"] = skip_reason
        elif needs_cuda and not self.cuda:
            rec["reason"] = "needs a CUDA device"
        elif self.remaining() < min_s:
            rec["reason"] = f"time limit: {self.remaining():.0f} s left, section needs about {min_s:.0f} s"
        if rec["reason"]:
            log(f"skip {name}: {rec['reason']}")
            self.save()
            return rec
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            fn(rec)
            rec["status"] = "partial" if rec.get("partial") else "done"
        except Exception as exc:  # one broken section must not cost the others their numbers
            rec["status"] = "error"
            rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rec["traceback"] = traceback.format_exc()[-4000:]
            log(f"ERROR in {name}: {rec['error'][:300]}")
            self._recover()
        rec["elapsed_s"] = round(time.monotonic() - t0, 2)
        self.save()
        return rec

    def _recover(self) -> None:
        if not self.cuda:
            return
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as exc:  # the context is gone: record it, later sections will fail fast
            self.note(f"CUDA context unusable after an error: {exc}")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # -------------------------------------------------------------- setup sections

    def sec_env(self, rec: dict) -> None:
        a = self.args
        meta = self.data["meta"]
        meta.update(
            {
                "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "device": str(self.device),
                "git": _git_info(),
            }
        )
        try:
            import diffusers

            meta["diffusers"] = diffusers.__version__
        except Exception as exc:  # noqa: BLE001 - recorded, the build section fails loudly anyway
            meta["diffusers"] = f"unavailable: {exc}"
        try:
            import triton

            meta["triton"] = triton.__version__
        except Exception:
            meta["triton"] = None
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            meta.update(
                {
                    "gpu": props.name,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count,
                    "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
                    "cudnn": torch.backends.cudnn.version(),
                    "nvidia_smi_start": _nvidia_smi(),
                }
            )
        meta["defaults"] = {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        }
        self.data["config"] = {
            "tiny": a.tiny,
            "model": "tiny (tests/reference config, embedded)" if a.tiny else "bfr_v1 (official cldm.yaml sizes)",
            "image_px": a.size,
            "latent_px": a.size // 8,
            "batch_sizes": a.batch_sizes,
            "check_batch": a.check_batch,
            "time_limit_s": a.time_limit_s,
            "weights": "random: torch/diffusers default init after torch.manual_seed(seed), not rescaled; "
            "LoRA merged means plain Linear layers, so nothing to merge",
            "seed": a.seed,
            "bfr": f"mean-value: Euler over {OFFICIAL_BFR_TIMESTEPS}, x_T + v at index {BFR_MIDPOINT} "
            "(4 evaluations), then VAE decode and wavelet colour fix",
            "bsr": f"one evaluation at t={OFFICIAL_BSR_T:g} on x_T, decode v, no colour fix; the condition "
            "encoder is the BFR cond_encoder network (same architecture as the first-stage encoder BSR uses)",
            "diffbir": f"{a.diffbir_steps} Euler evaluations on the same networks, decode, wavelet colour fix",
            "inputs": "smooth random images in [0,1] (seeded), x_T from flowie.samplers.initial_noise with "
            "seed = image index, a random [1,77,C] null context; made before timing, resident on the device",
            "timing": "CUDA events around each repeat and between stages; synchronize only after the last "
            "repeat; warm-up first; median over repeats" if self.cuda else "perf_counter (CPU)",
            "warmup": a.warmup,
            "min_reps": a.min_reps,
            "max_reps": a.max_reps,
            "rep_target_s": a.rep_target_s,
            "compile_stages": a.compile_stages,
            "compile_mode": a.compile_mode,
            "compile_backend": a.compile_backend,
        }

    def sec_peak(self, rec: dict) -> None:
        """Dense matmul rate per dtype (random data) and device copy bandwidth."""
        n = self.args.matmul_n
        peak = self.data["peak"]
        peak["matmul_n"] = n
        rates = {}
        kinds = [("bf16", torch.bfloat16, None), ("fp16", torch.float16, None), ("fp32", torch.float32, "highest"),
                 ("tf32", torch.float32, "high")]
        if not self.cuda:
            kinds = [("fp32", torch.float32, "highest"), ("bf16", torch.bfloat16, None)]
        old_precision = torch.get_float32_matmul_precision()
        for label, dtype, precision in kinds:
            if precision:
                torch.set_float32_matmul_precision(precision)
            try:
                gen = torch.Generator(device=self.device).manual_seed(0)
                a = torch.randn(n, n, device=self.device, dtype=dtype, generator=gen)
                b = torch.randn(n, n, device=self.device, dtype=dtype, generator=gen)
                reps = 10 if dtype != torch.float32 or label == "tf32" else 4
                ms = self._time_simple(lambda a=a, b=b: torch.matmul(a, b), warmup=2, reps=reps)
                rates[label] = 2 * n**3 / (ms * 1e-3) / 1e12
                del a, b
            finally:
                torch.set_float32_matmul_precision(old_precision)
        peak["matmul_tflops"] = rates
        elems = self.args.copy_mib * 2**20 // 4
        src = torch.rand(elems, device=self.device)
        dst = torch.empty_like(src)
        ms = self._time_simple(lambda s=src, d=dst: d.copy_(s), warmup=2, reps=10)
        peak["copy_gb_per_s"] = 2 * elems * 4 / (ms * 1e-3) / 1e9  # bytes read + bytes written
        del src, dst
        log("matmul TFLOP/s " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
            + f"; copy {peak['copy_gb_per_s']:.0f} GB/s")

    def _time_simple(self, fn: Callable[[], object], warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        timer = Timer(self.device, reps, 1)
        for r in range(reps):
            mark = timer.marker(r)
            fn()
            mark()
        self.sync()
        return median([seg[0] for seg in timer.read()])

    def sec_build(self, rec: dict) -> None:
        """Full-size (or tiny) networks, fp32, random init on the device; FLOPs and bytes per stage."""
        a = self.args
        config = TINY_CONFIG if a.tiny else load_config("bfr_v1")
        spec = parse_config(config, task="bfr")
        self.spec = spec
        stage_cfgs = _stage_configs(spec)
        self.context_dim = spec.unet.context_dim
        torch.manual_seed(a.seed)
        t0 = time.monotonic()
        with torch.device(self.device):
            for name in STAGES:
                module = build_stage(name, stage_cfgs[name]).to(self.device).eval()
                module.requires_grad_(False)
                self.masters[name] = module
        self.sync()
        rec["build_s"] = round(time.monotonic() - t0, 2)
        log(f"built {', '.join(STAGES)} in {rec['build_s']} s")
        self.colour_fix = WaveletColourFix(self.device)
        self._make_inputs()
        # The pre-built colour fix must compute what flowie.colorfix computes.
        from flowie.colorfix import wavelet_color_fix

        gen = torch.Generator(device="cpu").manual_seed(7)
        c, s = torch.rand(2, 3, 64, 64, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
        diff = (WaveletColourFix(torch.device("cpu"))(c, s) - wavelet_color_fix(c, s)).abs().max().item()
        self.data["checks"]["colour_fix_vs_flowie_max_abs"] = diff
        if diff > 1e-6:
            raise AssertionError(f"pre-built colour fix differs from flowie.colorfix by {diff}")

        flops = self.data["flops"]
        per_stage = {}
        lq = self.images[:1]
        runners = {n: StageRunner(m, torch.float32, False) for n, m in self.masters.items()}
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
            # The math backend spells attention as two batched matmuls, which the counter sees on any device.
            restored = runners["swinir"](lq)
            c_latent = runners["cond_encoder"](restored)
            x_t = self.noise[:1]
            t = torch.full((1,), 999.0, device=self.device)
            ctx = self.null_context[:1]
            latent = runners["flow_unet"](x_t, t, c_latent, ctx)
            calls = {
                "swinir": (runners["swinir"], (lq,)),
                "cond_encoder": (runners["cond_encoder"], (restored,)),
                "flow_unet": (runners["flow_unet"], (x_t, t, c_latent, ctx)),
                "vae_decoder": (runners["vae_decoder"], (latent,)),
                "colour_fix": (self.colour_fix, (restored, restored)),
            }
            stats = {}
            for name, (fn, inputs) in calls.items():
                with FlopCounterMode(display=False) as counter:
                    out = fn(*inputs)
                by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
                module = self.masters.get(name)
                params = sum(p.numel() for p in module.parameters()) if module is not None else 0
                in_bytes = sum(x.numel() for x in inputs) * 2
                per_stage[name] = {
                    "flops": int(counter.get_total_flops()),
                    "flops_by_op": by_op,
                    "params": params,
                    "param_mib_fp32": params * 4 / 2**20,
                    # Fewest bytes a half-precision run must move: weights once, inputs once, output once.
                    "min_bytes_half": params * 2 + in_bytes + out.numel() * 2,
                }
                stats[name] = {"min": float(out.min()), "max": float(out.max()), "std": float(out.float().std())}
        flops["per_stage_batch1"] = per_stage
        flops["counted"] = "matmul, bmm, conv and attention FLOPs (2 per multiply-add) at batch 1; norms, " \
                           "activations and other element-wise work are not counted"
        self.data["checks"]["fp32_stage_output_ranges_batch1"] = stats
        steps = {"bfr": 4, "bsr": 1, "diffbir": a.diffbir_steps}
        workloads = {}
        for wl, n_eval in steps.items():
            total = per_stage["swinir"]["flops"] + per_stage["cond_encoder"]["flops"] \
                + n_eval * per_stage["flow_unet"]["flops"] + per_stage["vae_decoder"]["flops"]
            if wl != "bsr":
                total += per_stage["colour_fix"]["flops"]
            workloads[wl] = total
        workloads["swinir"] = per_stage["swinir"]["flops"]
        flops["per_image"] = workloads
        log("GFLOP per image: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in workloads.items())
            + f"; flow UNet params {per_stage['flow_unet']['params'] / 1e6:.0f} M")
        self.floors()

    def floors(self) -> None:
        """Lower bounds per image: max(FLOPs / measured dense half rate, bytes / measured copy rate)."""
        peak = self.data["peak"]
        rates = peak.get("matmul_tflops", {})
        half_rate = max([rates.get("bf16", 0.0), rates.get("fp16", 0.0)]) * 1e12
        bw = peak.get("copy_gb_per_s", 0.0) * 1e9
        per_stage = self.data["flops"].get("per_stage_batch1")
        if not half_rate or not bw or not per_stage:
            return
        evals = {"bfr": 4, "bsr": 1, "diffbir": self.args.diffbir_steps, "swinir": 0}
        floors: dict = {"rate_tflops": half_rate / 1e12, "bandwidth_gb_per_s": bw / 1e9, "ms_per_img": {}}

        def stage_s(name: str, b: int) -> float:
            st = per_stage[name]
            act_bytes = (st["min_bytes_half"] - st["params"] * 2) * b
            return max(st["flops"] * b / half_rate, (st["params"] * 2 + act_bytes) / bw)

        for wl, n in evals.items():
            row = {}
            for b in self.args.batch_sizes:
                total = stage_s("swinir", b)
                if wl != "swinir":
                    total += stage_s("cond_encoder", b) + n * stage_s("flow_unet", b) + stage_s("vae_decoder", b)
                    if wl != "bsr":
                        total += stage_s("colour_fix", b)
                row[str(b)] = total / b * 1e3
            floors["ms_per_img"][wl] = row
        self.data["flops"]["floor"] = floors

    def _make_inputs(self) -> None:
        a = self.args
        n = max(max(a.batch_sizes), a.check_batch)
        gen = torch.Generator(device="cpu").manual_seed(a.seed + 1)
        low = torch.rand(n, 3, a.size // 16, a.size // 16, generator=gen)
        images = F.interpolate(low, size=(a.size, a.size), mode="bicubic", align_corners=False)
        images = (images + 0.03 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
        self.images = images.to(self.device)
        h = a.size // 8
        self.noise = samplers.initial_noise((n, 4, h, h), list(range(n)), device=self.device)
        ctx = torch.randn(1, 77, self.context_dim, generator=gen)
        self.null_context = ctx.expand(n, -1, -1).contiguous().to(self.device)

    def inputs(self, b: int) -> dict[str, torch.Tensor]:
        # Made under inference_mode like every tensor the stages see later: dynamo guards on the
        # dispatch keys, so a mix of normal and inference tensors would recompile the stages.
        with torch.inference_mode():
            return {"lq": self.images[:b].clone(), "x_T": self.noise[:b].clone(), "ctx": self.null_context[:b].clone()}

    # -------------------------------------------------------------- workloads

    def workload_fn(self, workload: str, S: dict, inp: dict) -> tuple[Callable, list[str]]:
        """(run(mark) -> output, segment names). ``mark()`` is called at the end of each segment."""
        fix = self.colour_fix
        lq, x_T, ctx = inp["lq"], inp["x_T"], inp["ctx"]
        diffbir_ts = samplers.euler_timesteps(self.args.diffbir_steps)
        bfr_ts = [float(t) for t in OFFICIAL_BFR_TIMESTEPS]

        if workload == "swinir":
            def run(mark):
                out = S["swinir"](lq)
                mark()
                return out

            return run, ["swinir"]

        def run(mark):
            restored = S["swinir"](lq)
            mark()
            c_latent = S["cond_encoder"](restored)
            mark()

            def velocity(x, t):
                return S["flow_unet"](x, t, c_latent, ctx)

            step = lambda i, n: mark()  # noqa: E731 - one mark per network evaluation
            if workload == "bfr":
                latent = samplers.mean_value(velocity, x_T, bfr_ts, BFR_MIDPOINT, on_step=step)
            elif workload == "bsr":
                latent = samplers.one_step(velocity, x_T, OFFICIAL_BSR_T, output="v", on_step=step)
            else:
                latent = samplers.euler(velocity, x_T, diffbir_ts, on_step=step)
            decoded = S["vae_decoder"](latent)
            mark()
            if workload == "bsr":
                return decoded
            image = fix(decoded, restored)
            mark()
            return image

        n_eval = {"bfr": BFR_MIDPOINT + 1, "bsr": 1, "diffbir": self.args.diffbir_steps}[workload]
        names = ["swinir", "cond_encoder", *[f"eval{i + 1}" for i in range(n_eval)], "vae_decoder"]
        if workload != "bsr":
            names.append("colour_fix")
        return run, names

    def measure(self, run: Callable, names: list[str], warmup: int, min_reps: int | None = None) -> dict:
        a = self.args
        min_reps = a.min_reps if min_reps is None else min_reps
        t0 = time.perf_counter()
        out = None
        warm = []
        for _ in range(warmup):
            w0 = time.perf_counter()
            out = run(_noop)
            self.sync()
            warm.append(time.perf_counter() - w0)
        est = min(warm) if warm else None
        if est is not None and est < a.rep_target_s / 2:
            # The first run of a shape pays cudnn.benchmark's search and allocator growth, so it
            # overstates a short workload; one more (cheap) run sizes the repeats.
            w0 = time.perf_counter()
            out = run(_noop)
            self.sync()
            est = time.perf_counter() - w0
            warm.append(est)
        reps = min_reps if est is None else int(min(a.max_reps, max(min_reps, math.ceil(a.rep_target_s / max(est, 1e-6)))))
        if est is not None:  # never run far past the time limit for the sake of more repeats
            reps = max(min(reps, int(max(self.remaining(), 0) / max(est, 1e-6))), min(min_reps, 2), 1)
        timer = Timer(self.device, reps, len(names))
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        w0 = time.perf_counter()
        for r in range(reps):
            out = run(timer.marker(r))
        self.sync()
        wall = time.perf_counter() - w0
        segs = timer.read()
        totals = [sum(s) for s in segs]
        result = {
            "reps": reps,
            "warmup_runs": len(warm),
            "warmup_s": round(sum(warm), 3),
            "batch_ms": median(totals),
            "batch_ms_min": min(totals),
            "batch_ms_max": max(totals),
            "wall_ms_per_rep": wall / reps * 1e3,
            "measure_s": round(time.perf_counter() - t0, 3),
        }
        if len(names) > 1:
            result["stages_ms"] = {n: median([s[i] for s in segs]) for i, n in enumerate(names)}
            evals = [k for k in names if k.startswith("eval")]
            if evals:
                per_eval = [median([s[names.index(k)] for s in segs]) for k in evals]
                result["stages_ms"]["flow_unet_total"] = sum(per_eval)
                result["stages_ms"]["flow_unet_per_eval"] = median(per_eval)
        if self.cuda:
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return result, out

    def capture(self, run: Callable) -> tuple[Callable, float]:
        """CUDA graph of ``run`` (static inputs are the tensors it closes over); returns a replayer."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy init, cudnn.benchmark and allocator warm-up stay out of the graph
                run(_noop)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run(_noop)
        self.sync()

        def replay(mark):
            graph.replay()
            mark()
            return static_out

        replay.graph = graph  # keep the graph (and its memory pool) alive as long as the replayer
        return replay, time.perf_counter() - t0

    # -------------------------------------------------------------- modes

    def set_backend_flags(self, mode: Mode) -> None:
        torch.set_float32_matmul_precision("high" if mode.tf32 else "highest")
        torch.backends.cudnn.benchmark = not mode.baseline if mode.cudnn_benchmark is None else mode.cudnn_benchmark
        # cudnn.allow_tf32 stays at the torch default (recorded in meta.defaults): convolutions of the
        # official-style fp32 baseline run as torch runs them out of the box.

    def modules_for(self, dtype: torch.dtype, channels_last: bool) -> dict[str, nn.Module]:
        if dtype == torch.float32 and not channels_last:
            return self.masters
        key = (dtype, channels_last)
        if key not in self.copies:
            # Free other half copies first: one fp32 master + one derived set stay on the device.
            for k in [k for k in self.copies if k != key]:
                del self.copies[k]
            self.compiled.clear()
            if self.cuda:
                torch.cuda.empty_cache()
            mods = {}
            for name, m in self.masters.items():
                c = copy.deepcopy(m).to(dtype=dtype)
                if channels_last:
                    c = c.to(memory_format=torch.channels_last)
                mods[name] = c
            self.copies[key] = mods
        return self.copies[key]

    def stage_fns(self, mode: Mode, rec: dict) -> dict[str, Callable]:
        mods = self.modules_for(mode.dtype, mode.channels_last)
        # Set (or cleared) for every mode: the modules are shared between modes.
        mods["flow_unet"].control_stream = mode.control_stream
        runners = {n: StageRunner(m, mode.dtype, mode.channels_last) for n, m in mods.items()}
        if not mode.compile_mode:
            return runners
        key = f"{mode.dtype}-{mode.channels_last}-{mode.compile_mode}"
        if key in self.compiled:
            cached = self.compiled[key]
            if "failed" in cached:
                raise RuntimeError(f"compiling failed in {cached['section']}: {cached['failed']}")
            rec["compile"] = {"reused_from": cached["section"], "batches": cached["batches"]}
            return cached["fns"]
        fns = dict(runners)
        compile_rec = {"mode": mode.compile_mode, "stages": {}, "dynamic_batch": True}
        rec["compile"] = compile_rec
        _raise_recompile_limit()
        try:
            self.compile_warm(mode, runners, fns, compile_rec)
        except Exception as exc:
            self.compiled[key] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}", "section": rec["name"]}
            raise
        self.compiled[key] = {"fns": fns, "section": rec["name"], "batches": compile_rec.get("batches", [])}
        return fns

    def compile_warm(self, mode: Mode, runners: dict, fns: dict, compile_rec: dict) -> None:
        """Compile the chosen stages at the largest batch with the batch axis marked dynamic (one
        graph then serves every batch from 2 up), then at batch 1.

        dynamo specialises sizes 0 and 1, so batch 1 is a second compile; it is done only while the
        time limit allows, with the first compile's time as the estimate. A stage that would not fit the
        time limit, or fails to compile, stays eager (recorded per stage).
        """
        import torch._dynamo

        a = self.args
        counters = torch._dynamo.utils.counters
        sizes = sorted(a.batch_sizes, reverse=True)
        big = [b for b in sizes if b > 1]
        order = ([big[0]] if big else []) + ([1] if 1 in sizes else [])
        wanted = [s for s in a.compile_stages if s in runners]
        compiled: dict[str, Callable] = {}
        done_batches = []
        for b in order:
            first = b == order[0]
            if not first:
                est = sum(v.get(f"first_call_s_b{order[0]}", 0.0) for v in compile_rec["stages"].values())
                if self.remaining() < est + a.compile_reserve_s:
                    compile_rec["batch1"] = (f"skipped: {self.remaining():.0f} s left, the batch-{order[0]} "
                                             f"compile took {est:.0f} s")
                    log("compile: " + compile_rec["batch1"])
                    break
            inp = self.inputs(b)
            with torch.inference_mode():
                t = torch.full((b,), 999.0, device=self.device)
                restored = runners["swinir"](inp["lq"])
                c_latent = runners["cond_encoder"](restored)
                latent = runners["flow_unet"](inp["x_T"], t, c_latent, inp["ctx"])
            stage_inputs = {
                "swinir": (inp["lq"],),
                "cond_encoder": (restored,),
                "flow_unet": (inp["x_T"], t, c_latent, inp["ctx"]),
                "vae_decoder": (latent,),
            }
            for name in wanted:
                st = compile_rec["stages"].setdefault(name, {"status": "eager"})
                if first:
                    guess = COMPILE_GUESS_S.get(name, 60.0) * (0.1 if a.tiny else 1.0)
                    if self.remaining() < a.compile_reserve_s + guess:
                        st["status"] = f"eager: time limit ({self.remaining():.0f} s left, compile guessed at {guess:.0f} s)"
                        log(f"compile: {name} stays eager ({st['status']})")
                        continue
                    if a.compile_backend == "inductor":
                        compiled[name] = torch.compile(runners[name], mode=mode.compile_mode, dynamic=None)
                    else:  # development: check this orchestration quickly on a CPU
                        compiled[name] = torch.compile(runners[name], backend=a.compile_backend, dynamic=None)
                elif name not in compiled:
                    continue
                xs = stage_inputs[name]
                if b > 1:
                    for x in xs:
                        torch._dynamo.mark_dynamic(x, 0)
                graphs_before = counters["stats"]["unique_graphs"]
                t0 = time.monotonic()
                try:
                    with torch.inference_mode():
                        compiled[name](*xs)
                    self.sync()
                except Exception as exc:  # this stage stays eager; the others keep their compile
                    st["status"] = f"eager: compile failed at batch {b}: {type(exc).__name__}: {str(exc)[:600]}"
                    st["traceback"] = traceback.format_exc()[-2500:]
                    log(f"compile of {name} failed, it stays eager: {type(exc).__name__}: {str(exc)[:200]}")
                    compiled.pop(name, None)
                    self._recover()
                    continue
                dt = time.monotonic() - t0
                st["status"] = "compiled"
                st[f"first_call_s_b{b}"] = round(dt, 2)
                st[f"graphs_b{b}"] = counters["stats"]["unique_graphs"] - graphs_before
                log(f"compiled {name} at batch {b}{' (batch dynamic)' if b > 1 else ''} in {dt:.1f} s")
                self.save()
            done_batches.append(b)
        fns.update(compiled)
        compile_rec["graph_breaks"] = sum(counters["graph_break"].values())
        compile_rec["batches"] = done_batches
        compile_rec["total_s"] = round(sum(v for st in compile_rec["stages"].values() for k, v in st.items()
                                           if k.startswith("first_call_s")), 2)

    def run_mode(self, mode: Mode, rec: dict) -> None:
        a = self.args
        self.set_backend_flags(mode)
        rec["mode"] = mode.describe()
        result = self.data["modes"].setdefault(mode.name, {"settings": mode.describe(), "workloads": {}})
        result["section"] = rec["name"]
        fns = self.stage_fns(mode, rec)
        if mode.compile_mode:
            result["compile"] = rec.get("compile")
        compiled_batches = None
        if mode.compile_mode:
            key = f"{mode.dtype}-{mode.channels_last}-{mode.compile_mode}"
            compiled_batches = set(self.compiled[key]["batches"])
            if len(compiled_batches) and max(compiled_batches) > 1:
                compiled_batches |= {b for b in a.batch_sizes if b > 1}
        sizes = sorted((b for b in a.batch_sizes if mode.batches is None or b in mode.batches),
                       reverse=bool(mode.compile_mode))
        # SwinIR alone does not touch the flow UNet, so a control-stream mode leaves it out.
        for workload in ("bfr", "bsr") if mode.control_stream else ("bfr", "bsr", "swinir"):
            wl = result["workloads"].setdefault(workload, {})
            for b in sizes:
                if compiled_batches is not None and b not in compiled_batches:
                    wl[str(b)] = {"status": "skipped", "reason": "not compiled for this batch (time limit)"}
                    continue
                if self.remaining() < 0:
                    wl[str(b)] = {"status": "skipped", "reason": "time limit"}
                    rec["partial"] = True
                    continue
                wl[str(b)] = self.measure_one(mode, fns, workload, b)
                self.save()
        # DiffBIR-style 50 evaluations: measured at batch 1 where there is time, derived everywhere.
        wl = result["workloads"].setdefault("diffbir", {})
        if mode.batches is not None:
            wl["1"] = {"status": "skipped", "reason": "an A/B mode: batch sizes " + ",".join(map(str, sizes))}
        elif 1 in a.batch_sizes and (compiled_batches is None or 1 in compiled_batches):
            bfr1 = result["workloads"]["bfr"].get("1", {})
            est = bfr1.get("batch_ms", 0) / 1e3 * a.diffbir_steps / 4 * (2 + (1 if mode.graphs else 0))
            if self.remaining() > est:
                wl["1"] = self.measure_one(mode, fns, "diffbir", 1, warmup=1 if mode.graphs else 0,
                                           min_reps=max(1, min(2, a.min_reps)))
            else:
                wl["1"] = {"status": "skipped", "reason": f"time limit: about {est:.0f} s needed"}
        for b in a.batch_sizes:
            derived = self.derive_diffbir(result["workloads"], b)
            if derived:
                wl.setdefault(str(b), {"status": "derived"})
                wl[str(b)]["derived"] = derived
        self.add_rates(mode, result)
        errors = [f"{w} b={b}: {e.get('error', '')[:100]}" for w, rows in result["workloads"].items()
                  for b, e in rows.items() if e.get("status") == "error"]
        if errors:
            rec["partial"] = True
            rec["entry_errors"] = errors
        self.save()

    def measure_one(self, mode: Mode, fns: dict, workload: str, b: int, warmup: int | None = None,
                    min_reps: int | None = None) -> dict:
        a = self.args
        inp = self.inputs(b)
        run, names = self.workload_fn(workload, fns, inp)
        entry: dict = {"status": "done", "batch": b}
        graphs_before = _dynamo_graphs() if mode.compile_mode else 0
        try:
            with torch.inference_mode():
                if mode.graphs:
                    run, entry["capture_s"] = self.capture(run)
                    names = ["total"]
                    w = 1 if warmup is None else warmup
                else:
                    w = a.warmup if warmup is None else warmup
                res, out = self.measure(run, names, warmup=w, min_reps=min_reps)
                entry.update(res)
                if workload in ("bfr", "bsr") and b == a.check_batch:
                    entry["check"] = self.check_output(mode, workload, run, out)
        except torch.cuda.OutOfMemoryError as exc:
            entry = {"status": "error", "batch": b, "error": f"out of memory: {str(exc)[:300]}"}
            self._recover()
        except Exception as exc:
            if mode.graphs or mode.compile_mode:
                entry = {"status": "error", "batch": b, "error": f"{type(exc).__name__}: {str(exc)[:800]}",
                         "traceback": traceback.format_exc()[-2500:]}
                log(f"ERROR {mode.name} {workload} b={b}: {entry['error'][:200]}")
                self._recover()
            else:
                raise
        finally:
            run = None
            if self.cuda:
                torch.cuda.empty_cache()
        if mode.compile_mode:
            # Graphs dynamo compiled during this measurement (warm-up included): 0 unless a batch recompiled.
            entry["dynamo_new_graphs"] = _dynamo_graphs() - graphs_before
        if entry["status"] == "done":
            entry["ms_per_img"] = entry["batch_ms"] / b
            entry["img_per_s"] = b / (entry["batch_ms"] / 1e3)
            log(f"{mode.name:24s} {workload:7s} b={b:<2d} {entry['batch_ms']:9.2f} ms/batch "
                f"{entry['ms_per_img']:8.2f} ms/img {entry['img_per_s']:8.2f} img/s ({entry['reps']} reps)"
                + (f" capture {entry['capture_s']:.1f} s" if "capture_s" in entry else ""))
        return entry

    def check_output(self, mode: Mode, workload: str, run: Callable, out: torch.Tensor) -> dict:
        """PSNR against fp32 eager (same inputs, weights, noise), and a rerun of the same mode."""
        out = out.detach().float().clone()
        again = run(_noop).detach().float().clone()
        self.sync()
        check = {"repeat": psnr_db(again, out)}
        key = f"{workload}_ref"
        if mode.name == "fp32_eager":
            self.refs[key] = out.cpu()
            inside = ((out >= 0) & (out <= 1)).float().mean().item()
            check["reference"] = {"min": float(out.min()), "max": float(out.max()), "std": float(out.std()),
                                  "fraction_in_0_1": inside}
        elif key in self.refs:
            check["vs_fp32"] = psnr_db(out, self.refs[key])
            v = check["vs_fp32"]
            if v["nonfinite"]:
                self.note(f"{mode.name} {workload}: {v['nonfinite']} non-finite output values "
                          f"(overflow with these random weights)")
            elif not v["ok"]:
                self.note(f"{mode.name} {workload}: PSNR {v['psnr_db']:.1f} dB vs fp32, below {PSNR_FLAG_DB:g}")
            psnr_txt = "exact" if v.get("exact") else (f"{v['psnr_db']:.1f} dB" if v["psnr_db"] else "n/a")
            log(f"check {mode.name} {workload} vs fp32: {psnr_txt}")
        else:
            check["vs_fp32"] = {"psnr_db": None, "reason": "no fp32 reference (fp32_eager did not run)"}
        return check

    def derive_diffbir(self, workloads: dict, b: int) -> dict | None:
        steps = self.args.diffbir_steps
        bfr = workloads.get("bfr", {}).get(str(b), {})
        if bfr.get("status") != "done":
            return None
        st = bfr.get("stages_ms")
        if st:
            ms = st["swinir"] + st["cond_encoder"] + steps * st["flow_unet_per_eval"] + st["vae_decoder"] + st["colour_fix"]
            how = f"bfr stages: swinir + cond_encoder + {steps} x median eval + vae_decoder + colour_fix"
        else:
            bsr = workloads.get("bsr", {}).get(str(b), {})
            if bsr.get("status") != "done":
                return None
            per_eval = max((bfr["batch_ms"] - bsr["batch_ms"]) / BFR_MIDPOINT, 0.0)
            ms = bfr["batch_ms"] + (steps - BFR_MIDPOINT - 1) * per_eval
            how = f"bfr total + {steps - BFR_MIDPOINT - 1} x (bfr - bsr) / {BFR_MIDPOINT} (eval time from totals)"
        return {"batch_ms": ms, "ms_per_img": ms / b, "img_per_s": b / (ms / 1e3), "how": how}

    def add_rates(self, mode: Mode, result: dict) -> None:
        per_image = self.data["flops"].get("per_image", {})
        rates = self.data["peak"].get("matmul_tflops", {})
        label = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(mode.dtype, "tf32" if mode.tf32 else "fp32")
        peak = rates.get(label)
        floor = self.data["flops"].get("floor", {}).get("ms_per_img", {})
        for wl, rows in result["workloads"].items():
            flops = per_image.get(wl)
            for b, entry in rows.items():
                src = entry if entry.get("status") == "done" else entry.get("derived")
                if not src or not flops:
                    continue
                tflops = flops * src["img_per_s"] / 1e12
                src["tflops"] = tflops
                if peak:
                    src["frac_of_mode_peak"] = tflops / peak
                    src["peak_used"] = f"{label} {peak:.1f} TFLOP/s"
                fl = floor.get(wl, {}).get(str(b))
                if fl:
                    src["x_floor"] = src["ms_per_img"] / fl

    # -------------------------------------------------------------- scaling with image size

    def sec_scaling(self, rec: dict, dtype: torch.dtype) -> None:
        """Peak device memory and time against image size.

        The serving pipeline itself (flowie.pipeline.Pipeline, eager, tiles on, one step, wavelet fix)
        on these networks: ``run_streamed`` (what ``enhance`` runs for a lone large image: the card
        holds tiles, bands and latents; image-sized buffers live in host RAM) and, for comparison,
        ``run_batch`` (float32 images on the device). The streamed path runs twice: one tile per
        network call, and the service's CUDA default of tiles per call (``CUDA_TILE_BATCH``; 2 on a
        CPU, to check the path). Memory is ``max_memory_allocated`` above what was allocated before
        the call (weights and the input), per size and path.
        """
        from engines.config import CUDA_TILE_BATCH
        from flowie import imageops
        from flowie.convert import model_meta
        from flowie.modeldir import ModelInfo
        from flowie.params import EnhanceParams
        from flowie.pipeline import Pipeline

        a = self.args
        mods = self.modules_for(dtype, False)
        stages = {n: StageRunner(mods[n], dtype, False) for n in STAGES}
        meta = model_meta(self.spec, tuple(self.null_context[:1].shape), {"name": "gpu-bench random weights"})
        pipe = Pipeline(ModelInfo(path=self.out_dir, meta=meta), stages, self.null_context[:1], device=self.device)
        params = EnhanceParams(sampler="one_step", color_fix="wavelet", upscale=1.0, min_side=0, tile="on")
        rec.update(dtype=str(dtype).replace("torch.", ""), sampler="one_step", rows=[])
        gen = torch.Generator(device="cpu").manual_seed(a.seed + 2)

        def work_image(h: int, w: int):  # uint8 HWC numpy image
            low = torch.rand(1, 3, max(1, h // 32), max(1, w // 32), generator=gen)
            image = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
            return (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()

        # One untimed run of each path at the smallest size first, as a worker's FLOWIE_WARMUP does:
        # the first call of each tile shape pays cuDNN's algorithm search and lazy CUDA set-up
        # (left in, it added 2.9 s to the 1 MP streamed row on an NVIDIA H200, against 0.7 s for the batch path).
        h0, w0 = a.scaling_sizes[0]
        t0 = time.perf_counter()
        warm = work_image(h0, w0)
        # Tiles per network call: one at a time, and the service's CUDA default (FLOWIE_TILE_BATCH).
        tiles_per_call = CUDA_TILE_BATCH if self.cuda else 2
        paths = {"streamed": (1, "streamed"), f"streamed_tiles{tiles_per_call}": (tiles_per_call, "streamed"),
                 "batch": (1, "batch")}
        rec["tile_batches"] = {name: n for name, (n, _) in paths.items()}
        pipes = {n: pipe.with_options(tile_batch=n) for n in (1, tiles_per_call)}
        for n in (1, tiles_per_call):
            pipes[n].run_streamed(warm, params, seed=0)
        pipe = pipes[1]
        pipe.run_batch(imageops.images_to_tensor([warm], self.device), params, seeds=[0])
        # Then every row count a tiled call can hold, at the tile size, as the worker's warm-up does
        # (Runner.tile_rows): left out, cuDNN's search for 5 tiles per call lands in the 4 MP row
        # (0.89x one tile per call there, 2.4x at 16 MP, NVIDIA H200).
        tile_image = work_image(pipe.pixel_tile, pipe.pixel_tile)
        for rows in range(1, tiles_per_call + 1):
            pipe.run_batch(imageops.images_to_tensor([tile_image] * rows, self.device), params, seeds=[0] * rows)
        rec["warmup_tile_rows"] = tiles_per_call
        self.sync()
        rec["warmup_s"] = round(time.perf_counter() - t0, 3)
        log(f"scaling warm-up at {h0}x{w0}: {rec['warmup_s']:.2f} s")
        for h, w in a.scaling_sizes:
            work = work_image(h, w)
            row: dict = {"h": h, "w": w, "megapixels": h * w / 1e6}
            for path, (tile_batch, kind) in paths.items():
                if self.remaining() < 20:
                    row[path] = {"skipped": "time limit"}
                    continue
                pipe = pipes[tile_batch]
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(self.device)
                    before = torch.cuda.memory_allocated(self.device)
                t0 = time.perf_counter()
                if kind == "streamed":
                    out = pipe.run_streamed(work, params, seed=0)
                    timings = out.timings
                    del out
                else:
                    lq = imageops.images_to_tensor([work], self.device)  # the pipeline's own conversion
                    if self.cuda:
                        before = torch.cuda.memory_allocated(self.device)  # the float input is the baseline
                    out = pipe.run_batch(lq, params, seeds=[0])
                    timings = out.timings
                    del out, lq
                self.sync()
                entry = {"s": round(time.perf_counter() - t0, 3), "stages_s": {k: round(v, 4) for k, v in timings.items()}}
                if self.cuda:
                    entry["peak_mib"] = round((torch.cuda.max_memory_allocated(self.device) - before) / 2**20, 1)
                row[path] = entry
                log(f"scaling {h}x{w} {path}: {entry['s']:.2f} s" + (f", peak +{entry['peak_mib']:.0f} MiB"
                                                                      if "peak_mib" in entry else ""))
            rec["rows"].append(row)
            self.save()
        rows = [r for r in rec["rows"] if "peak_mib" in r.get("streamed", {})]
        if len(rows) >= 2:
            rec["streamed_peak_ratio_last_two"] = rows[-1]["streamed"]["peak_mib"] / max(rows[-2]["streamed"]["peak_mib"], 1e-9)
        timed = [r for r in rec["rows"] if "s" in r.get("streamed", {})]
        if len(timed) >= 2:
            first = timed[0]
            rec["streamed_s_per_pixel_vs_first"] = [
                (r["streamed"]["s"] / (r["h"] * r["w"])) / (first["streamed"]["s"] / (first["h"] * first["w"]))
                for r in timed]
        self.data["scaling"] = rec

    def sec_service(self, rec: dict, dtype: torch.dtype, compiled: tuple[str, ...] = ()) -> None:
        """What a worker computes per batch: ``Pipeline.enhance`` on ``TorchEngine`` stages with the
        service's CUDA defaults (``dtype``, a CUDA graph per stage and input shape, cudnn.benchmark;
        eager float32 on a CPU), uint8 images in and out, so the pre- and post-processing, the sampler
        loop in Python and one synchronisation per stage (the per-stage timings) are included; the
        modes above capture the whole sampler in one graph instead. BFR mean-value and a one-step
        run of the same networks (BSR-style: 1 evaluation, no upscale) at the bench's size, batch 1
        and the largest; wall clock, median of repeats after two warm-up calls (graph capture). The
        answers are then encoded as the worker encodes them (PNG at the service's default zlib level,
        in bands on min(8, cores) codec threads shared out among the batch's answers), timed apart:
        on a GPU this CPU work can rival the compute.

        ``compiled``: stages to ``torch.compile`` as ``FLOWIE_TORCH_COMPILE`` does (section
        ``service_compile``: the largest batch only, whose first calls include the compile; no
        worker run). Empty: the service's defaults (section ``service``).

        Every row's answers are checked against the same requests run through fp32 engines without
        graphs or compile (``vs_fp32``: PSNR of the uint8 images, goal >= 40 dB), so a faster service
        path never silently serves different pictures.
        """
        from concurrent.futures import ThreadPoolExecutor

        from engines.config import EngineConfig
        from engines.torch_engine import TorchEngine
        from flowie.convert import model_meta
        from flowie.modeldir import ModelInfo
        from flowie.params import EnhanceParams
        from flowie.pipeline import Pipeline
        from flowie.stages import STAGES as SPECS
        from service.imaging import DEFAULT_PNG_COMPRESS_LEVEL, submit_encode

        a = self.args
        mods = self.modules_for(dtype, False)
        options = {"cuda_graphs": self.cuda, "cudnn_benchmark": self.cuda}
        if compiled:
            _raise_recompile_limit()
        # FLOWIE_CONTROL_STREAM's default (on with CUDA; inert where the flow UNet is compiled)
        control_stream = self.cuda
        stages = {n: TorchEngine(mods[n], SPECS[n], self.device, dtype, compile=n in compiled,
                                 control_stream=control_stream and n == "flow_unet", **options)
                  for n in STAGES}
        meta = model_meta(self.spec, tuple(self.null_context[:1].shape), {"name": "gpu-bench random weights"})
        pipe = Pipeline(ModelInfo(path=self.out_dir, meta=meta), stages, self.null_context[:1], device=self.device)
        rec.update(dtype=str(dtype).replace("torch.", ""),
                   engine_options={**options, "control_stream": control_stream, "compiled": list(compiled)},
                   size=a.size, workloads={})
        batches = [max(a.batch_sizes)] if compiled else sorted({min(a.batch_sizes), max(a.batch_sizes)})
        common = {"upscale": 1.0, "min_side": 0, "tile": "off", "color_fix": "wavelet"}
        workloads = {"bfr": EnhanceParams(sampler="mean_value", **common),
                     "bsr": EnhanceParams(sampler="one_step", **common)}
        gen = torch.Generator(device="cpu").manual_seed(a.seed + 3)
        image = (torch.rand(a.size, a.size, 3, generator=gen) * 255).round().to(torch.uint8).numpy()
        rec["codec_threads"] = EngineConfig.for_device(str(self.device)).codec_threads
        codec = ThreadPoolExecutor(max_workers=rec["codec_threads"])
        rec["png_compress_level"] = DEFAULT_PNG_COMPRESS_LEVEL
        try:
            for workload, params in workloads.items():
                rows = rec["workloads"][workload] = {}
                for b in batches:
                    if self.remaining() < 15:
                        rows[str(b)] = {"status": "skipped", "reason": "time limit"}
                        continue
                    images, seeds = [image] * b, list(range(b))
                    first = []  # what FLOWIE_WARMUP spares the first requests of a shape
                    for _ in range(2):  # capture the graphs of this shape, pick the algorithms
                        self.sync()
                        t0 = time.perf_counter()
                        pipe.enhance(images, params, seeds=seeds, keep_restored=False)
                        first.append(round((time.perf_counter() - t0) * 1000, 1))
                    if self.cuda:  # what a worker batch of this size holds on the card (weights included)
                        self.sync()
                        torch.cuda.reset_peak_memory_stats(self.device)
                    times, stage_s = [], {}
                    while len(times) < a.min_reps or (sum(times) < a.rep_target_s and len(times) < a.max_reps):
                        self.sync()
                        t0 = time.perf_counter()
                        out = pipe.enhance(images, params, seeds=seeds, keep_restored=False)
                        times.append(time.perf_counter() - t0)
                        stage_s = out[0].timings
                    batch_ms = median(times) * 1000
                    vs_fp32 = self._service_check(workload, params, images, seeds, out)
                    encode_times = []
                    bands = max(1, rec["codec_threads"] // b)  # as the worker shares its codec threads out
                    for _ in range(3):
                        t0 = time.perf_counter()
                        answers = [submit_encode(codec, r.image, "png", None, DEFAULT_PNG_COMPRESS_LEVEL, bands)
                                   for r in out]
                        for answer in answers:
                            answer.result()
                        encode_times.append(time.perf_counter() - t0)
                    encode_ms = median(encode_times) * 1000
                    rows[str(b)] = {"status": "done", "batch_ms": batch_ms, "ms_per_img": batch_ms / b,
                                    "img_per_s": b / (batch_ms / 1000), "reps": len(times), "first_calls_ms": first,
                                    "stages_ms": {k: round(v * 1000, 3) for k, v in stage_s.items()},
                                    "encode_png_batch_ms": encode_ms,
                                    "img_per_s_with_encode": b / ((batch_ms + encode_ms) / 1000),
                                    "vs_fp32": vs_fp32}
                    if self.cuda:
                        rows[str(b)]["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
                    log(f"{rec['name']} {workload} b={b}: {batch_ms:.1f} ms/batch, {b / (batch_ms / 1000):.2f} img/s; "
                        f"PNG answers {encode_ms:.1f} ms more; first calls {first} ms; {_psnr_text(vs_fp32)} vs fp32")
                    self.save()
            if compiled:
                return
            try:
                rec["worker"] = self._worker_overlap(pipe, workloads["bfr"], image)
            except Exception as exc:  # noqa: BLE001 - the rows above keep their numbers
                rec["worker"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                                 "traceback": traceback.format_exc()[-4000:]}
                log(f"ERROR in the service section's worker run: {rec['worker']['error'][:300]}")
        finally:
            codec.shutdown()
            del pipe, stages
            if self.cuda:
                torch.cuda.empty_cache()
            self.data[rec["name"]] = rec

    def _service_check(self, workload: str, params: Any, images: list, seeds: list[int], out: list) -> dict:
        """The service path's answers ``out`` against fp32 engines' answers to the same requests (made
        once per workload and batch, on the fp32 masters, no CUDA graphs, no compile): PSNR of the
        uint8 images as served."""
        from engines.torch_engine import TorchEngine
        from flowie.convert import model_meta
        from flowie.modeldir import ModelInfo
        from flowie.pipeline import Pipeline
        from flowie.stages import STAGES as SPECS

        key = (workload, len(images))
        try:
            if key not in self.service_refs:
                engines = {n: TorchEngine(m, SPECS[n], self.device, torch.float32) for n, m in self.masters.items()}
                meta = model_meta(self.spec, tuple(self.null_context[:1].shape), {"name": "gpu-bench random weights"})
                pipe = Pipeline(ModelInfo(path=self.out_dir, meta=meta), engines, self.null_context[:1],
                                device=self.device)
                torch.set_float32_matmul_precision("highest")  # as the fp32 baseline mode runs
                ref = pipe.enhance(images, params, seeds=seeds, keep_restored=False)
                self.service_refs[key] = [torch.from_numpy(r.image.copy()) for r in ref]
            got = torch.stack([torch.from_numpy(r.image.copy()) for r in out]).float() / 255
            return psnr_db(got, torch.stack(self.service_refs[key]).float() / 255)
        except Exception as exc:  # noqa: BLE001 - the row keeps its timing
            log(f"service check against fp32 failed: {type(exc).__name__}: {exc}"[:300])
            return {"ok": None, "error": f"{type(exc).__name__}: {exc}"[:500]}

    def _worker_overlap(self, pipe: Any, params: Any, image: Any) -> dict:
        """The real worker on the real in-memory queue computing with ``pipe``: images/s of a backlog of
        BFR jobs (6 batches) with its answers encoded before the next batch (FLOWIE_ENCODE_OVERLAP=off)
        and while it computes (on, the default on CUDA), at batch 1 and the largest; the settings
        alternate, twice each. PNG answers at the service's level on its default codec threads."""
        wb = _worker_bench()
        if isinstance(wb, str):
            log(f"service worker: skipped ({wb})")
            return {"status": "skipped", "reason": wb}
        from engines.config import EngineConfig
        from service.imaging import encode_image
        from service.runner import PipelineRunner

        runner = PipelineRunner({"bfr": pipe}, EngineConfig.for_device(str(self.device)))
        png = encode_image(image, "png")
        out: dict[str, Any] = {}
        for b in sorted({min(self.args.batch_sizes), max(self.args.batch_sizes)}):
            if self.remaining() < 30:
                out[str(b)] = {"status": "skipped", "reason": "time limit"}
                continue
            args = argparse.Namespace(jobs=6 * b, batch=b, codec_threads=0)
            runs = [wb.run_once(runner, overlap, args, image, png, params) for overlap in (False, True, False, True)]
            speed = {name: median([r["images_per_s"] for r in runs if r["encode_overlap"] is flag])
                     for name, flag in (("off", False), ("on", True))}
            out[str(b)] = {"status": "done", "jobs": args.jobs, "img_per_s": speed,
                           "ratio_on_off": speed["on"] / speed["off"], "runs": runs}
            log(f"service worker b={b}: {speed['off']:.2f} img/s with the answers encoded before the next batch, "
                f"{speed['on']:.2f} while it computes ({speed['on'] / speed['off']:.2f}x)")
            self.save()
        return out

    def sec_compile_probe(self, rec: dict, dtype: torch.dtype) -> None:
        """The real worker with ``--probe-stages`` compiled under its CUDA graphs (FLOWIE_TORCH_COMPILE):
        its warm-up at the bench's size, batch 1 to max(2, tiles per call), then the size probe at batch
        1 and 2 (Runner.shape_probe); then jobs of sizes and batch sizes it never saw. Records dynamo's
        compiles per phase (none are expected after the warm-up) and the wall time of each phase: a
        new size's first batch still pays the cuDNN search and a graph capture per stage."""
        import asyncio

        from torch._dynamo.utils import counters

        from engines.config import EngineConfig
        from engines.torch_engine import TorchEngine
        from flowie.convert import model_meta
        from flowie.modeldir import ModelInfo
        from flowie.pipeline import Pipeline, PipelineOptions
        from flowie.stages import STAGES as SPECS

        wb = _worker_bench()
        if isinstance(wb, str):
            raise RuntimeError(wb)
        from service.imaging import encode_image
        from service.metrics import Metrics
        from service.queue import MemoryJobQueue
        from service.runner import PipelineRunner
        from service.settings import load_settings
        from service.worker import Worker

        a = self.args
        mods = self.modules_for(dtype, False)
        stages = {n: TorchEngine(mods[n], SPECS[n], self.device, dtype, compile=n in a.probe_stages,
                                 cuda_graphs=self.cuda, cudnn_benchmark=self.cuda,
                                 control_stream=self.cuda and n == "flow_unet") for n in STAGES}
        meta = model_meta(self.spec, tuple(self.null_context[:1].shape), {"name": "gpu-bench random weights"})
        # The CUDA default of tiles per call (8); a tiny run keeps it short.
        pipe = Pipeline(ModelInfo(path=self.out_dir, meta=meta), stages, self.null_context[:1], device=self.device,
                        options=PipelineOptions(tile_batch=2 if a.tiny else 8))
        runner = PipelineRunner({"bfr": pipe}, EngineConfig.for_device(str(self.device)))
        size = a.size
        probe = runner.shape_probe("bfr", size, size)
        rec.update(dtype=str(dtype).replace("torch.", ""), compiled=list(a.probe_stages), size=size,
                   probe=list(probe) if probe else None, phases=[])
        self.data[rec["name"]] = rec
        settings = load_settings(max_batch=2, max_wait_ms=200.0, warmup=f"{size}x{size}", device=str(self.device))
        queue = MemoryJobQueue(16, 3600)
        worker = Worker(queue, lambda: runner, settings, Metrics())
        gen = torch.Generator(device="cpu").manual_seed(a.seed + 5)

        def jobs_of(h: int, w: int, n: int) -> list:
            pixels = (torch.rand(h, w, 3, generator=gen) * 255).round().to(torch.uint8).numpy()
            return wb.make_jobs(n, pixels, encode_image(pixels, "png", None, 1))

        # sizes it never saw: both sides new at batch 1, another pair at batch 2, then the first again
        # (a second sight: graphs captured), and the warm size
        phases = [("new size, batch 1", jobs_of(size + 128, size + 192, 1)),
                  ("another size, batch 2", jobs_of(size + 64, size, 2)),
                  ("the first new size again", jobs_of(size + 128, size + 192, 1)),
                  ("the warm-up size", jobs_of(size, size, 1))]

        async def scenario() -> None:
            before = counters["frames"]["ok"]
            t0 = time.perf_counter()
            task = asyncio.create_task(worker.run())
            while not worker.ready:
                if task.done():
                    task.result()  # the worker's own error
                await asyncio.sleep(0.05)
            rec["warm_up"] = {"s": time.perf_counter() - t0, "dynamo_frames_compiled": counters["frames"]["ok"] - before}
            log(f"compile_probe: warm-up {rec['warm_up']['s']:.1f} s, {rec['warm_up']['dynamo_frames_compiled']} "
                f"dynamo frames compiled (probe {probe})")
            try:
                for name, jobs in phases:
                    before, t0 = counters["frames"]["ok"], time.perf_counter()
                    for job in jobs:
                        await queue.submit(job, wait=False)
                    results = [await queue.wait(job.id, 3600) for job in jobs]
                    row = {"phase": name, "shape": list(jobs[0].pixels.shape[:2]), "batch": len(jobs),
                           "s": time.perf_counter() - t0, "dynamo_frames_compiled": counters["frames"]["ok"] - before,
                           "states": [r.state if r else None for r in results]}
                    rec["phases"].append(row)
                    log(f"compile_probe: {name} {row['shape']} x{row['batch']}: {row['s'] * 1000:.0f} ms, "
                        f"{row['dynamo_frames_compiled']} frames compiled, {row['states']}")
                    self.save()
            finally:
                worker.request_stop()
                await task

        try:
            asyncio.run(scenario())
        finally:
            runner.pipelines.clear()
            del pipe, stages
            if self.cuda:
                torch.cuda.empty_cache()
        rec["compiles_after_warm_up"] = sum(r["dynamo_frames_compiled"] for r in rec["phases"])
        rec["all_done"] = all(state == "done" for r in rec["phases"] for state in r["states"])

    # -------------------------------------------------------------- choices between sections

    def best_half(self) -> str:
        if self.args.half != "auto":
            return self.args.half
        scores = {}
        for name in ("fp16", "bf16"):
            m = self.data["modes"].get(f"{name}_eager")
            if not m:
                continue
            big = self._bfr_top(m)
            check = (m["workloads"].get("bfr", {}).get(str(self.args.check_batch), {}).get("check") or {})
            vs = check.get("vs_fp32", {})
            finite = not vs.get("nonfinite")
            psnr = 999.0 if vs.get("exact") else (vs.get("psnr_db") or 0.0)
            scores[name] = (finite, big, psnr)
        if not scores:
            return "bf16"
        if len(scores) == 1:
            return next(iter(scores))
        f16, b16 = scores["fp16"], scores["bf16"]
        if f16[0] != b16[0]:
            choice = "fp16" if f16[0] else "bf16"
        elif f16[1] > 1.05 * b16[1]:
            choice = "fp16"
        elif b16[1] > 1.05 * f16[1]:
            choice = "bf16"
        else:  # same speed within 5%: the more accurate one
            choice = "fp16" if f16[2] >= b16[2] else "bf16"
        self.note(f"half precision for the later modes: {choice} (finite, BFR img/s at the largest batch, PSNR: "
                  f"fp16 {f16}, bf16 {b16})")
        return choice

    def _bfr_top(self, mode_result: dict) -> float:
        rows = mode_result["workloads"].get("bfr", {})
        done = [(int(b), e) for b, e in rows.items() if e.get("status") == "done"]
        return max(done)[1]["img_per_s"] if done else 0.0

    def use_channels_last(self, half: str) -> bool:
        if self.args.channels_last != "auto":
            return self.args.channels_last == "on"
        plain = self.data["modes"].get(f"{half}_eager")
        cl = self.data["modes"].get(f"{half}_eager_cl")
        if not plain or not cl:
            return False
        a, b = self._bfr_top(plain), self._bfr_top(cl)
        choice = b > 1.02 * a
        self.note(f"channels_last for the later modes: {'on' if choice else 'off'} "
                  f"(BFR img/s at the largest batch: {a:.2f} plain, {b:.2f} channels_last)")
        return choice

    # -------------------------------------------------------------- the autotune extra

    def sec_autotune(self, rec: dict, half: str, cl: bool) -> None:
        """The flow UNet alone at batch 1, max-autotune-no-cudagraphs vs default compile vs eager."""
        import torch._dynamo

        dtype = torch.float16 if half == "fp16" else torch.bfloat16
        self.set_backend_flags(Mode("autotune", dtype, cl))
        mods = self.modules_for(dtype, cl)
        runner = StageRunner(mods["flow_unet"], dtype, cl)
        b = 1
        inp = self.inputs(b)
        with torch.inference_mode():
            t = torch.full((b,), 999.0, device=self.device)
            c_latent = torch.randn_like(inp["x_T"]) * 0.1
        torch._dynamo.reset()
        self.compiled.clear()
        out: dict = {"batch": b, "dtype": half, "channels_last": cl}
        t0 = time.monotonic()
        fn = torch.compile(runner, mode="max-autotune-no-cudagraphs", dynamic=False)
        with torch.inference_mode():
            fn(inp["x_T"], t, c_latent, inp["ctx"])
            self.sync()
            out["compile_s"] = round(time.monotonic() - t0, 1)
            log(f"max-autotune flow UNet compiled in {out['compile_s']} s")
            for label, f in (("eager", runner), ("max_autotune", fn)):
                ms = self._time_simple(lambda f=f: f(inp["x_T"], t, c_latent, inp["ctx"]), warmup=3, reps=20)
                out[f"{label}_ms_per_eval"] = ms
                log(f"flow UNet b=1 {label}: {ms:.2f} ms/eval")
        for name, m in self.data["modes"].items():
            if m.get("settings", {}).get("compile_mode") and not m["settings"].get("graphs"):
                bfr1 = m.get("workloads", {}).get("bfr", {}).get("1", {})
                if bfr1.get("status") == "done" and "stages_ms" in bfr1:
                    out[f"{name}_ms_per_eval_in_bfr"] = bfr1["stages_ms"]["flow_unet_per_eval"]
        rec["result"] = out
        self.data["modes"]["unet_max_autotune"] = {"settings": {"stage": "flow_unet"}, "result": out}

    # -------------------------------------------------------------- the run

    def run(self) -> int:
        a = self.args
        self.section("env", self.sec_env)
        self.section("peak", self.sec_peak)
        build = self.section("build", self.sec_build)
        if build["status"] != "done":
            log("cannot go on without the networks")
            self.finish()
            return 1

        def mode_section(mode: Mode, needs_cuda: bool = False, min_s: float = 0.0, skip: str | None = None):
            return self.section(mode.name, lambda rec: self.run_mode(mode, rec), needs_cuda=needs_cuda,
                                min_s=min_s, skip_reason=skip)

        wanted = set(a.modes) if a.modes else None

        def skip_unless(name: str) -> str | None:
            return None if wanted is None or name in wanted else "not selected (--modes)"

        mode_section(Mode("fp32_eager", torch.float32, baseline=True), skip=skip_unless("fp32_eager"))
        fp16_skip = skip_unless("fp16_eager") or (None if self.cuda or a.cpu_fp16 else
                                                  "fp16 on a CPU is slow and not what the GPU runs; pass --cpu-fp16")
        mode_section(Mode("fp16_eager", torch.float16), skip=fp16_skip)
        mode_section(Mode("bf16_eager", torch.bfloat16), skip=skip_unless("bf16_eager"))
        half = self.best_half()
        hdtype = torch.float16 if half == "fp16" else torch.bfloat16
        mode_section(Mode(f"{half}_eager_cl", hdtype, channels_last=True), skip=skip_unless("eager_cl"))
        # Every mode above but the baseline lets cuDNN pick convolution algorithms by timing them;
        # this one does not, at the smallest and largest batch: what the setting is worth
        # (FLOWIE_CUDNN_BENCHMARK, on by default on CUDA).
        ab_batches = (min(a.batch_sizes), max(a.batch_sizes))
        # (--tiny runs it on the CPU, where cuDNN plays no part: it checks the script's path only.)
        mode_section(Mode(f"{half}_eager_nobench", hdtype, cudnn_benchmark=False, batches=ab_batches),
                     needs_cuda=not a.tiny, skip=skip_unless("nobench"))
        self.section("scaling", lambda rec: self.sec_scaling(rec, hdtype if self.cuda or a.cpu_fp16 else torch.float32),
                     min_s=0 if a.tiny else 60, skip_reason=skip_unless("scaling"))
        cl = self.use_channels_last(half)
        suffix = "_cl" if cl else ""
        mode_section(Mode(f"{half}{suffix}_graphs", hdtype, channels_last=cl, graphs=True), needs_cuda=True,
                     skip=skip_unless("graphs"))
        # FLOWIE_CONTROL_STREAM: the ControlNet beside the UNet's down path on a second stream, with
        # and without CUDA graphs, against the two modes above (same batches; the PSNR check shows
        # the numbers unchanged). --tiny runs the eager one on the CPU, where the flag is inert.
        mode_section(Mode(f"{half}_eager_cs", hdtype, control_stream=True, batches=ab_batches),
                     needs_cuda=not a.tiny, skip=skip_unless("control_stream"))
        mode_section(Mode(f"{half}{suffix}_graphs_cs", hdtype, channels_last=cl, graphs=True, control_stream=True),
                     needs_cuda=True, skip=skip_unless("control_stream"))
        self.section("service", lambda rec: self.sec_service(rec, hdtype if self.cuda else torch.float32),
                     min_s=0 if a.tiny else 40, skip_reason=skip_unless("service"))
        compile_skip = skip_unless("compile") or (None if self.cuda or a.cpu_compile else
                                                  "torch.compile is measured on the GPU only; pass --cpu-compile")
        # The service with FLOWIE_TORCH_COMPILE=on (or --service-compile-stages): its stages compiled
        # under its CUDA graphs.
        self.section("service_compile",
                     lambda rec: self.sec_service(rec, hdtype if self.cuda else torch.float32,
                                                  tuple(a.service_compile_stages)),
                     min_s=0 if a.tiny else a.compile_min_s,
                     skip_reason=skip_unless("service_compile") or (None if self.cuda or a.cpu_compile else
                                                                    "torch.compile is measured on the GPU only; "
                                                                    "pass --cpu-compile"))
        self.section("compile_probe", lambda rec: self.sec_compile_probe(rec, hdtype if self.cuda else torch.float32),
                     min_s=0 if a.tiny else 120,
                     skip_reason=skip_unless("compile_probe") or (None if self.cuda or a.cpu_compile else
                                                                  "torch.compile is measured on the GPU only; "
                                                                  "pass --cpu-compile"))
        mode_section(Mode(f"{half}{suffix}_compile", hdtype, channels_last=cl, compile_mode=a.compile_mode),
                     min_s=a.compile_min_s, skip=compile_skip)
        # Reuses the compile above when there is one; otherwise it would have to compile first.
        mode_section(Mode(f"{half}{suffix}_compile_graphs", hdtype, channels_last=cl, compile_mode=a.compile_mode,
                          graphs=True), needs_cuda=True, min_s=20 if self.compiled else a.compile_min_s,
                     skip=skip_unless("compile_graphs"))
        if self.cuda:
            self.print_table()  # the table now, in case the extras below outlast the run's time limit
        mode_section(Mode("fp32_tf32_eager", torch.float32, tf32=True), needs_cuda=True, min_s=30,
                     skip=skip_unless("tf32"))
        autotune_skip = skip_unless("autotune")
        if not autotune_skip and a.autotune == "off":
            autotune_skip = "--autotune off"
        self.section("unet_max_autotune", lambda rec: self.sec_autotune(rec, half, cl), needs_cuda=True,
                     min_s=0 if a.autotune == "on" else a.autotune_min_s, skip_reason=autotune_skip)
        self.finish()
        return 0

    def finish(self) -> None:
        if self.cuda:
            self.data["meta"]["nvidia_smi_end"] = _nvidia_smi()
        self.data["summary"] = self.summary()
        self.save()
        table = self.print_table()
        (self.out_dir / "gpu_bench_table.txt").write_text(table + "\n")

    # -------------------------------------------------------------- summary

    def summary(self) -> dict:
        a = self.args
        modes = self.data["modes"]
        big = str(max(a.batch_sizes))
        base = modes.get("fp32_eager", {}).get("workloads", {})
        base_bfr = base.get("bfr", {}).get(big, {}).get("img_per_s")
        rows = {}
        best = {"bfr_img_per_s": (0.0, None), "bfr_b1_ms": (float("inf"), None), "bsr_img_per_s": (0.0, None)}
        for name, m in modes.items():
            wls = m.get("workloads")
            if not wls:
                continue

            def get(wl, b, key, wls=wls):
                e = wls.get(wl, {}).get(b, {})
                return e.get(key) if e.get("status") == "done" else None

            row = {
                "bfr_b1_ms": get("bfr", "1", "batch_ms"),
                "bfr_big_img_per_s": get("bfr", big, "img_per_s"),
                "bsr_big_img_per_s": get("bsr", big, "img_per_s"),
                "swinir_big_img_per_s": get("swinir", big, "img_per_s"),
                "diffbir_b1_ms": get("diffbir", "1", "batch_ms"),
                "bfr_big_frac_peak": (wls.get("bfr", {}).get(big, {}) or {}).get("frac_of_mode_peak"),
                "bfr_big_x_floor": (wls.get("bfr", {}).get(big, {}) or {}).get("x_floor"),
            }
            check = (wls.get("bfr", {}).get(str(a.check_batch), {}) or {}).get("check") or {}
            vs = check.get("vs_fp32") or {}
            row["bfr_psnr_db"] = "exact" if vs.get("exact") else vs.get("psnr_db")
            row["bfr_nonfinite"] = vs.get("nonfinite")
            if base_bfr and row["bfr_big_img_per_s"]:
                row["speedup_vs_fp32_eager"] = row["bfr_big_img_per_s"] / base_bfr
            if row["diffbir_b1_ms"] and row["bfr_b1_ms"]:
                row["diffbir50_over_bfr_b1"] = row["diffbir_b1_ms"] / row["bfr_b1_ms"]
            rows[name] = row
            accurate = name == "fp32_eager" or (vs.get("ok") is True)
            for key, value, better in (("bfr_img_per_s", row["bfr_big_img_per_s"], max),
                                       ("bfr_b1_ms", row["bfr_b1_ms"], min),
                                       ("bsr_img_per_s", row["bsr_big_img_per_s"], max)):
                if value is not None and accurate and better(value, best[key][0]) == value:
                    best[key] = (value, name)
        # The service sections count too, where their answers passed the same check against fp32.
        for section in ("service", "service_compile"):
            wls = self.data.get(section, {}).get("workloads") or {}
            for key, wl, b, field, better in (("bfr_img_per_s", "bfr", big, "img_per_s", max),
                                              ("bfr_b1_ms", "bfr", "1", "batch_ms", min),
                                              ("bsr_img_per_s", "bsr", big, "img_per_s", max)):
                e = wls.get(wl, {}).get(b, {})
                if e.get("status") == "done" and (e.get("vs_fp32") or {}).get("ok") is True \
                        and better(e[field], best[key][0]) == e[field]:
                    best[key] = (e[field], section)
        targets = {}
        if self.cuda and not a.tiny:
            for key, goal in TARGETS.items():
                if key == "speedup_vs_fp32":
                    value = best["bfr_img_per_s"][0] / base_bfr if base_bfr and best["bfr_img_per_s"][1] else None
                    mode = best["bfr_img_per_s"][1]
                else:
                    value, mode = best[key]
                    value = value if mode else None
                ok = None if value is None else (value <= goal if key == "bfr_b1_ms" else value >= goal)
                targets[key] = {"goal": goal, "best": value, "mode": mode, "met": ok}
        if best["bfr_img_per_s"][1] and self.cuda and not a.tiny:
            targets["vs_official_flowie"] = {
                "anchor_img_per_s": OFFICIAL_FLOWIE_IMG_PER_S, "best": best["bfr_img_per_s"][0],
                "ratio": best["bfr_img_per_s"][0] / OFFICIAL_FLOWIE_IMG_PER_S, "mode": best["bfr_img_per_s"][1]}
        return {"largest_batch": int(big), "modes": rows, "targets": targets,
                "note": "best values count only modes whose BFR check passed (PSNR >= 40 dB vs fp32), fp32 itself and "
                         "service rows whose answers passed the same check"}

    def print_table(self) -> str:
        a = self.args
        meta = self.data["meta"]
        summary = self.summary()
        big = summary["largest_batch"]
        peak = self.data["peak"].get("matmul_tflops", {})
        lines = [
            f"FlowIE gpu_bench  {meta.get('gpu', 'CPU')} "
            f"(cc {meta.get('compute_capability', '-')})  torch {meta.get('torch')} cuda {meta.get('cuda')} "
            f"triton {meta.get('triton')}  {a.size}x{a.size}{'  TINY' if a.tiny else ''}  {meta.get('date_utc')}",
            "peak TFLOP/s: " + ", ".join(f"{k} {v:.3g}" for k, v in peak.items())
            + (f"; copy {self.data['peak'].get('copy_gb_per_s', 0):.0f} GB/s" if peak else ""),
        ]
        floor = self.data["flops"].get("floor", {}).get("ms_per_img", {})
        if floor:
            lines.append("floor ms/img: " + ", ".join(
                f"{wl} b1 {row.get('1', float('nan')):.2f} b{big} {row.get(str(big), float('nan')):.2f}"
                for wl, row in floor.items() if wl in ("bfr", "bsr")))
        head = f"{'mode':28s} {'BFR b1':>8s} {'BFR b' + str(big):>9s} {'BSR b' + str(big):>9s} " \
               f"{'SwIR b' + str(big):>9s} {'DiffBIR':>8s} {'x fp32':>6s} {'%peak':>6s} {'xfloor':>6s} {'PSNR':>6s}"
        lines += [head, f"{'':28s} {'ms':>8s} {'img/s':>9s} {'img/s':>9s} {'img/s':>9s} {'b1 ms':>8s}", "-" * len(head)]

        def f(v, fmt):
            if isinstance(v, (int, float)) and math.isfinite(v):
                return format(v, fmt)
            width = "".join(ch for ch in fmt.split(".")[0] if ch.isdigit())
            return "-".rjust(int(width) if width else 1)  # keep the columns where a value is missing

        for name, row in summary["modes"].items():
            psnr = row["bfr_psnr_db"]
            psnr_txt = "exact" if psnr == "exact" else (f(psnr, ".1f") + ("!" if isinstance(psnr, float) and psnr < PSNR_FLAG_DB else ""))
            if row.get("bfr_nonfinite"):
                psnr_txt = "NaN!"
            if name == "fp32_eager":
                psnr_txt = "ref"
            frac = row["bfr_big_frac_peak"]
            lines.append(
                f"{name:28s} {f(row['bfr_b1_ms'], '8.1f')} {f(row['bfr_big_img_per_s'], '9.2f')} "
                f"{f(row['bsr_big_img_per_s'], '9.2f')} {f(row['swinir_big_img_per_s'], '9.1f')} "
                f"{f(row['diffbir_b1_ms'], '8.0f')} {f(row.get('speedup_vs_fp32_eager'), '6.1f')} "
                f"{f(frac * 100 if frac is not None else None, '6.1f')} {f(row['bfr_big_x_floor'], '6.1f')} {psnr_txt:>6s}"
            )
        for key, t in summary["targets"].items():
            if key == "vs_official_flowie":
                lines.append(f"vs official FlowIE ({t['anchor_img_per_s']} img/s): {t['ratio']:.1f}x ({t['mode']})")
                continue
            state = "-" if t["met"] is None else ("met" if t["met"] else "MISSED")
            lines.append(f"target {key} {'<=' if key == 'bfr_b1_ms' else '>='} {t['goal']:g}: "
                         f"best {f(t['best'], '.2f')} ({t['mode']}) {state}")
        scaling = self.data.get("scaling", {})
        if scaling.get("rows"):
            def cell(r, path):
                e = r.get(path, {})
                return f"{f(e.get('s'), '.2f')} s" + (f"/{e['peak_mib']:.0f} MiB" if "peak_mib" in e else "")

            lines.append(f"scaling ({scaling.get('dtype')}, one step, tiles): " + "; ".join(
                f"{r['megapixels']:.2g} MP streamed {cell(r, 'streamed')}, "
                + "".join(f"{name.removeprefix('streamed_')} per call {cell(r, name)}, "
                          for name in scaling.get("tile_batches", {}) if name.startswith("streamed_"))
                + f"batch {cell(r, 'batch')}" for r in scaling["rows"])
                + (f"; streamed peak last/previous {scaling['streamed_peak_ratio_last_two']:.2f}x (goal <= 1.2)"
                   if "streamed_peak_ratio_last_two" in scaling else ""))
        for service in (self.data.get("service", {}), self.data.get("service_compile", {})):
            if not service.get("workloads"):
                continue
            opts = service.get("engine_options", {})
            compiled = f", compiled: {', '.join(opts['compiled'])}" if opts.get("compiled") else ""
            lines.append(f"service path (Pipeline.enhance on {service.get('dtype')} engines, CUDA graphs per stage "
                         f"{'on' if opts.get('cuda_graphs') else 'off'}"
                         f"{', control stream' if opts.get('control_stream') else ''}{compiled}): " + "; ".join(
                f"{wl.upper()} b{b} {e['batch_ms']:.1f} ms = {e['img_per_s']:.2f} img/s "
                f"(+PNG {e['encode_png_batch_ms']:.1f} ms: {e['img_per_s_with_encode']:.2f}; "
                f"{_psnr_text(e.get('vs_fp32') or {})})"
                for wl, rows in service["workloads"].items() for b, e in rows.items() if e.get("status") == "done"))
            done = {b: e for b, e in service.get("worker", {}).items() if isinstance(e, dict) and e.get("status") == "done"}
            if done:
                lines.append("worker, BFR backlog, img/s with answers encoded before / while the next batch computes: "
                             + "; ".join(f"b{b} {e['img_per_s']['off']:.2f} / {e['img_per_s']['on']:.2f} "
                                         f"({e['ratio_on_off']:.2f}x)" for b, e in done.items()))
        probe = self.data.get("compile_probe", {})
        if probe.get("phases"):
            lines.append(f"worker with {', '.join(probe['compiled'])} compiled: warm-up {probe['warm_up']['s']:.1f} s "
                         f"(probe {probe['probe']}); after it: " + "; ".join(
                             f"{r['phase']} {r['shape'][0]}x{r['shape'][1]} x{r['batch']} {r['s'] * 1000:.0f} ms, "
                             f"{r['dynamo_frames_compiled']} compiles" for r in probe["phases"]))
        skipped = [f"{s['name']} ({s['reason']})" for s in self.data["sections"] if s["status"] == "skipped"]
        errors = [f"{s['name']}: {s.get('error', '')[:120]}" for s in self.data["sections"] if s["status"] == "error"]
        partial = [f"{s['name']} ({'; '.join(s.get('entry_errors', [])[:2]) or 'time limit'})"
                   for s in self.data["sections"] if s["status"] == "partial"]
        if skipped:
            lines.append("skipped: " + "; ".join(skipped))
        if partial:
            lines.append("partial: " + "; ".join(partial))
        if errors:
            lines.append("errors: " + "; ".join(errors))
        lines.append(f"%peak: counted FLOPs x img/s over the mode's measured matmul rate; xfloor: measured over "
                     f"the half-precision floor; PSNR: final BFR image vs fp32 eager, b={a.check_batch} (! < 40 dB)")
        lines.append(f"full results: {self.json_path}  ({elapsed():.0f} s)")
        table = "\n".join(lines)
        print("\n" + table, flush=True)
        return table


# ---------------------------------------------------------------- environment probes


def _worker_bench() -> Any:
    """loadtests/worker_bench.py as a module, or why it cannot load (the worker needs pydantic, which
    travels to the GPU machine as a carried wheel)."""
    import importlib.util

    if "worker_bench" in sys.modules:
        return sys.modules["worker_bench"]
    spec = importlib.util.spec_from_file_location("worker_bench", Path(__file__).with_name("worker_bench.py"))
    wb = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = wb  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(wb)  # type: ignore[union-attr]
    except ImportError as exc:
        del sys.modules[spec.name]
        return f"the worker needs {exc.name or exc}: carry its wheels (loadtests/README.md)"
    return wb


def _raise_recompile_limit(limit: int = 64) -> None:
    """Every StageRunner shares one forward code object, so dynamo's per-code cache holds an entry per
    (stage, batch class); the default limit of 8 would be reached with all four stages compiled."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def _dynamo_graphs() -> int:
    import torch._dynamo

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _nvidia_smi() -> str | None:
    query = "name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu"
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15)
        return f"{query} = {res.stdout.strip()}" if res.returncode == 0 else None
    except Exception:
        return None


def _git_info() -> str | None:
    if not (ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except Exception:
        return None


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny test config on the CPU (development and tests)")
    p.add_argument("--out", default=os.environ.get("OUT") or "out", help="folder for gpu_bench.json (default $OUT or ./out)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="seconds from start after which no new measurement starts (default 400; tiny 120)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; cpu with --tiny)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,8,16; tiny 1,2)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels, a multiple of 64 (default 512; tiny 128: the tiny UNet needs a 16-pixel latent)")
    p.add_argument("--check-batch", type=int, default=None, help="batch whose outputs are compared with fp32 (default 4)")
    p.add_argument("--modes", default=None,
                   help="comma list to run only some of: fp32_eager, fp16_eager, bf16_eager, eager_cl, nobench, graphs, "
                        "control_stream, service, service_compile, compile_probe, compile, compile_graphs, tf32, autotune, "
                        "scaling (default: all)")
    p.add_argument("--half", choices=("auto", "fp16", "bf16"), default="auto",
                   help="half precision of the later modes (auto: by the eager results)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for the compile sections (default 'default'; "
                        "'max-autotune-no-cudagraphs' costs minutes more)")
    p.add_argument("--compile-stages", default="flow_unet,vae_decoder",
                   help="stages to compile, in priority order; a stage whose compile would not fit the time limit stays "
                        "eager (default flow_unet,vae_decoder: 87%% of the BFR FLOPs; 'all' adds cond_encoder and swinir, "
                        "48 Swin blocks that take long to compile)")
    p.add_argument("--service-compile-stages", default="on",
                   help="stages the service_compile section compiles, as FLOWIE_TORCH_COMPILE takes them: on (the "
                        "setting's stages: all four), all, or a comma list (default on)")
    p.add_argument("--probe-stages", default="cond_encoder",
                   help="stages the compile_probe section compiles (the worker's warm-up and new image sizes after "
                        "it), as FLOWIE_TORCH_COMPILE takes them (default cond_encoder: the quickest to compile)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor; 'eager' or 'aot_eager' only to check the script itself)")
    p.add_argument("--compile-min-s", type=float, default=120.0, help="skip the compile section with less time left")
    p.add_argument("--compile-reserve-s", type=float, default=40.0,
                   help="leave this much time after a compile (stages or batch 1 that would not fit are left eager/skipped)")
    p.add_argument("--autotune", choices=("auto", "on", "off"), default="auto",
                   help="max-autotune flow UNet at batch 1 (auto: only with --autotune-min-s of time left)")
    p.add_argument("--autotune-min-s", type=float, default=240.0)
    p.add_argument("--diffbir-steps", type=int, default=None, help="evaluations of the DiffBIR-style run (default 50; tiny 8)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per measurement (eager; graphs replay once)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=20)
    p.add_argument("--rep-target-s", type=float, default=None,
                   help="aim for this much timed work per measurement (default 0.5; tiny 0.05)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size for the peak rate (default 8192; tiny 256)")
    p.add_argument("--copy-mib", type=int, default=None, help="copy size for the bandwidth (default 1024; tiny 16)")
    p.add_argument("--scaling-sizes", default=None,
                   help="HxW,HxW,... for the scaling section (default 1024x960,1984x2048,3968x4032 = 1/4/16 MP; "
                        "tiny 576x64,1088x64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --tiny, where a shared CPU makes more threads far "
                        "slower; torch's own default otherwise)")
    p.add_argument("--cpu-compile", action="store_true", help="with a CPU device, run the compile section too (slow)")
    p.add_argument("--cpu-fp16", action="store_true", help="with a CPU device, run fp16 eager too")
    args = p.parse_args(argv)

    tiny = args.tiny
    if args.device is None:
        args.device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    if args.time_limit_s is None:
        args.time_limit_s = 120.0 if tiny else 400.0
    args.batch_sizes = [int(x) for x in (args.batch_sizes or ("1,2" if tiny else "1,4,8,16")).split(",")]
    if args.size is None:
        args.size = 128 if tiny else 512
    if args.diffbir_steps is None:
        args.diffbir_steps = 8 if tiny else 50
    if args.size % 64:
        p.error("--size must be a multiple of 64")
    if args.check_batch is None:
        args.check_batch = 4 if 4 in args.batch_sizes else max(args.batch_sizes)
    if args.check_batch not in args.batch_sizes:
        p.error("--check-batch must be one of --batch-sizes")
    if args.rep_target_s is None:
        args.rep_target_s = 0.05 if tiny else 0.5
    if tiny and args.min_reps == 3:
        args.min_reps = 1
    if args.matmul_n is None:
        args.matmul_n = 256 if tiny else 8192
    if args.copy_mib is None:
        args.copy_mib = 16 if tiny else 1024
    args.modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
    try:
        args.scaling_sizes = [tuple(int(v) for v in item.lower().split("x")) for item in
                              (args.scaling_sizes or ("576x64,1088x64" if tiny else "1024x960,1984x2048,3968x4032")).split(",")]
    except ValueError:
        p.error("--scaling-sizes takes HxW,HxW,... (e.g. 1024x960,1984x2048)")
    if any(len(hw) != 2 or hw[0] % 64 or hw[1] % 64 for hw in args.scaling_sizes):
        p.error("--scaling-sizes: each size is HxW with both sides multiples of 64")
    stages = ("flow_unet", "vae_decoder", "cond_encoder", "swinir") if args.compile_stages == "all" else tuple(s.strip() for s in args.compile_stages.split(","))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown --compile-stages {unknown}; choose from {', '.join(STAGES)}")
    args.compile_stages = list(stages)
    for option in ("service_compile_stages", "probe_stages"):
        try:
            setattr(args, option, _compile_stage_list(getattr(args, option)))
        except ValueError as exc:
            p.error(f"--{option.replace('_', '-')}: {exc}")
    return args


def _compile_stage_list(value: str) -> list[str]:
    """Stages named as FLOWIE_TORCH_COMPILE names them (on, all or a comma list), without the service's
    settings module: this script runs where pydantic may be missing."""
    from flowie.stages import STAGE_NAMES

    stages = {"on": STAGE_NAMES, "all": STAGE_NAMES}.get(value.strip().lower()) or tuple(
        s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown or not stages:
        raise ValueError(f"{', '.join(unknown) or 'nothing'}: use on, all or a comma list of {', '.join(STAGE_NAMES)}")
    return list(stages)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"gpu_bench: device {args.device}, {args.size}px, batches {args.batch_sizes}, time limit {args.time_limit_s:.0f} s, "
        f"out {args.out}")
    if args.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: run with --tiny (CPU) or on the GPU machine")
        return 2
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" and args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    bench = Bench(args)
    return bench.run()


if __name__ == "__main__":
    sys.exit(main())
