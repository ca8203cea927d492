"""ONNX -> TensorRT 10 plans: ``<model>/trt/<gpu>-trt<version>/<stage>.plan`` + ``meta.json``.

One optimisation profile per stage, taken from the StageSpec envelope (min/opt/max batch
and image size; latent stages divide the size by 8) unless ``--profile`` overrides it. A
timing cache beside the plans is loaded before and saved after every build, so rebuilds
and later stages reuse the kernel timings. ``meta.json`` names the GPU, its compute
capability, the TensorRT version, the precision, the build flags and the profiles; the
tensorrt engine refuses plans whose meta.json does not match the machine.

Written against the TensorRT 10 Python API (see docs/ENGINES.md for what has been run).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from engines.artifacts import (
    TRT_FORMAT,
    check_onnx_current,
    file_sha256,
    onnx_path,
    plan_path,
    read_sidecar,
    trt_dir,
    trt_meta_path,
)
from engines.errors import EngineError
from flowie.modeldir import ModelInfo, read_model_dir
from flowie.stages import SPATIAL_MULTIPLE, STAGES, ShapeEnvelope, StageSpec

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
DEFAULT_WORKSPACE_GB = 8.0


class BuildError(RuntimeError):
    """A plan could not be built; the message says why."""


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    optimization_level: int = 3  # TensorRT's default; 5 searches longest
    envelope: ShapeEnvelope | None = None  # None: each StageSpec's own

    def flags(self) -> list[str]:
        return (["FP16"] if self.fp16 else []) + [f"builder_optimization_level={self.optimization_level}",
                                                 f"workspace_gb={self.workspace_gb:g}"]


def parse_profile(text: str) -> ShapeEnvelope:
    """'1x64/1x512/8x1024' (batch x image pixels, min/opt/max) -> ShapeEnvelope."""
    parts = text.split("/")
    if len(parts) != 3:
        raise ValueError(f"--profile takes MIN/OPT/MAX, each BATCHxPIXELS (e.g. 1x64/1x512/8x1024), got {text!r}")
    values = []
    for part in parts:
        batch, sep, px = part.lower().partition("x")
        if not sep:
            raise ValueError(f"profile entry {part!r} is not BATCHxPIXELS")
        values.append((int(batch), int(px)))
    (b0, p0), (b1, p1), (b2, p2) = values
    if not (1 <= b0 <= b1 <= b2) or not (SPATIAL_MULTIPLE <= p0 <= p1 <= p2):
        raise ValueError(f"profile {text!r} must satisfy 1 <= min <= opt <= max and sizes >= {SPATIAL_MULTIPLE}")
    if any(p % SPATIAL_MULTIPLE for p in (p0, p1, p2)):
        raise ValueError(f"profile sizes must be multiples of {SPATIAL_MULTIPLE} pixels, got {text!r}")
    return ShapeEnvelope(min_batch=b0, opt_batch=b1, max_batch=b2, min_px=p0, opt_px=p1, max_px=p2)


def context_shape(info: ModelInfo) -> tuple[int, int]:
    """(tokens, width) of the text context the flow UNet takes."""
    shape = info.stages.get("null_context", {}).get("shape")
    if shape:
        return int(shape[-2]), int(shape[-1])
    return 77, int(info.stages["flow_unet"]["unet"]["context_dim"])


def stage_profile(spec: StageSpec, envelope: ShapeEnvelope, context: tuple[int, int]) -> dict[str, dict[str, list[int]]]:
    """{input: {"min": shape, "opt": shape, "max": shape}} for one optimisation profile."""
    points = {"min": (envelope.min_batch, envelope.min_px), "opt": (envelope.opt_batch, envelope.opt_px),
              "max": (envelope.max_batch, envelope.max_px)}
    profile: dict[str, dict[str, list[int]]] = {t.name: {} for t in spec.inputs}
    for point, (batch, px) in points.items():
        shapes = spec.concrete_shapes(batch, px, px, context_tokens=context[0], context_dim=context[1])
        for t in spec.inputs:
            profile[t.name][point] = list(shapes[t.name])
    return profile


def _gpu_and_trt():
    """(tensorrt module, GPU name, compute capability) or EngineError with one sentence."""
    from engines.trt_engine import gpu_identity, import_tensorrt

    trt = import_tensorrt("no plans were built")
    name, capability = gpu_identity("cuda")
    return trt, name, capability


def _stage_record(info: ModelInfo, stage: str, options: BuildOptions, profile: dict) -> dict:
    """What a plan is valid for besides the GPU and TensorRT version (those key the directory)."""
    sidecar = check_onnx_current(info, stage)
    return {"onnx_key": sidecar["key"], "profile": profile, "precision": "fp16" if options.fp16 else "fp32",
            "flags": options.flags()}


def build_plan(trt, onnx_file: Path, spec: StageSpec, profile: dict, options: BuildOptions, timing_cache: Path,
               out: Path) -> None:
    """Parse ``onnx_file``, build a serialized plan for one profile, write it to ``out``."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves <stage>.onnx.data beside the model.
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    config.builder_optimization_level = options.optimization_level
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for name, points in profile.items():
        opt_profile.set_shape(name, points["min"], points["opt"], points["max"])
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build {spec.name} (see the TensorRT log above)")
    tmp = out.with_suffix(".plan.tmp")
    with open(tmp, "wb") as fh:
        fh.write(memoryview(serialized))
    tmp.replace(out)
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))


def build_engines(model_dir: str | Path, stages: Sequence[str] | None = None, options: BuildOptions | None = None,
                  force: bool = False, progress: Progress | None = None) -> Path:
    """Build the plans for this GPU and TensorRT version; returns the plan directory.

    Idempotent: a stage whose plan exists and whose meta.json record (ONNX key, profile,
    precision, flags) matches is skipped. Raises EngineError when TensorRT or a GPU is
    missing, StaleArtifactError when an ONNX file is missing or stale.
    """
    say = progress or log.info
    options = options or BuildOptions()
    info = read_model_dir(model_dir)
    trt, gpu, capability = _gpu_and_trt()
    names = list(stages) if stages else list(STAGES)
    context = context_shape(info)
    plan_dir = trt_dir(info.path, gpu, trt.__version__)
    plan_dir.mkdir(parents=True, exist_ok=True)
    meta_file = trt_meta_path(plan_dir)
    meta = read_sidecar(meta_file) or {}
    precision = "fp16" if options.fp16 else "fp32"
    if meta.get("precision") not in (None, precision):
        say(f"plans in {plan_dir} are {meta['precision']}; rebuilding all stages as {precision}")
        meta["stages"] = {}
    meta.update({
        "format": TRT_FORMAT,
        "gpu": {"name": gpu, "compute_capability": capability},
        "tensorrt": trt.__version__,
        "precision": precision,
        "flags": options.flags(),
        "timing_cache": "timing.cache",
    })
    meta.setdefault("stages", {})
    timing_cache = plan_dir / "timing.cache"
    say(f"building TensorRT {trt.__version__} plans for {gpu} (sm {capability}), {precision}, in {plan_dir}")
    for index, stage in enumerate(names, 1):
        spec = STAGES[stage]
        envelope = options.envelope or spec.envelope
        profile = stage_profile(spec, envelope, context)
        record = _stage_record(info, stage, options, profile)
        out = plan_path(plan_dir, stage)
        previous = meta["stages"].get(stage, {})
        if not force and out.is_file() and {k: previous.get(k) for k in record} == record \
                and previous.get("plan_sha256") == file_sha256(out):
            say(f"[{index}/{len(names)}] {stage}: up to date, skipped")
            continue
        say(f"[{index}/{len(names)}] {stage}: building (batch {envelope.min_batch}..{envelope.max_batch}, "
            f"{envelope.min_px}..{envelope.max_px} px, opt {envelope.opt_batch}x{envelope.opt_px}) ...")
        start = time.perf_counter()
        build_plan(trt, onnx_path(info.path, stage), spec, profile, options, timing_cache, out)
        seconds = time.perf_counter() - start
        meta["stages"][stage] = {**record, "plan": out.name, "plan_sha256": file_sha256(out),
                                 "plan_bytes": out.stat().st_size, "build_seconds": round(seconds, 1),
                                 "built": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # Written after every stage, so an interrupted build keeps what it finished.
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
        say(f"  {stage}: {out.stat().st_size / 1e6:.1f} MB plan in {seconds:.0f} s")
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return plan_dir


__all__ = ["BuildError", "BuildOptions", "EngineError", "build_engines", "build_plan", "parse_profile",
           "stage_profile"]
