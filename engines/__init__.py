"""Engines: one interface, three back ends (torch, onnxruntime, TensorRT) behind flowie.Pipeline.

    from engines import EngineConfig, build_pipeline
    pipe = build_pipeline("models/demo", EngineConfig.for_device("cpu", backend="onnx"))

:func:`build_pipeline` is the one way a pipeline is made from a model directory: the service's
worker, ``flowie enhance``/``eval``/``bench``, the benchmarks and the tests all call it, so each
runs what is served. Importing this package is cheap (no torch); the back ends load on first use.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.config import BACKENDS, EngineConfig, normalise_backend
from engines.errors import EngineError, ShapeError, StaleArtifactError

if TYPE_CHECKING:  # pragma: no cover
    from flowie.pipeline import Pipeline

log = logging.getLogger(__name__)

_LAZY = {
    "Engine": "engines.base",
    "TorchEngine": "engines.torch_engine",
    "OrtEngine": "engines.ort_engine",
    "TrtEngine": "engines.trt_engine",
}

__all__ = ["BACKENDS", "EngineConfig", "EngineError", "ShapeError", "StaleArtifactError", "build_engines",
           "build_pipeline", "normalise_backend", "torch_engine", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engines' has no attribute {name!r}")


def build_engines(model_dir: str | Path, config: EngineConfig | None = None,
                  stages: tuple[str, ...] | None = None) -> dict:
    """``{stage: Engine}`` for a model directory (default: every stage, ``EngineConfig()``: the CPU)."""
    import torch

    from flowie.model import parse_dtype
    from flowie.modeldir import read_model_dir
    from flowie.stages import STAGE_NAMES

    config = config or EngineConfig.for_device("cpu")
    info = read_model_dir(model_dir)
    dev = torch.device(config.device)
    precision = parse_dtype(config.dtype)
    wanted = tuple(stages) if stages else STAGE_NAMES
    if config.backend == "torch":
        from engines.torch_engine import TorchEngine

        return {s: TorchEngine.from_model(info, s, dev, precision, **config.torch_options(s)) for s in wanted}
    if config.backend == "onnx":
        return {s: _ort_engine(info, s, dev, precision, config) for s in wanted}
    from engines.trt_engine import TrtEngine, gpu_identity, import_tensorrt

    trt = import_tensorrt()
    plan_dir = config.plan_dir
    if plan_dir is None:
        from engines.artifacts import find_plan_dir

        gpu, capability = gpu_identity(dev)
        plan_dir = find_plan_dir(info.path, gpu, capability, trt.__version__)
    built = _plan_meta(plan_dir).get("precision", "fp32")
    if precision != torch.float32 and built == "fp32":
        # Plans carry their precision; float32 accepts any plan.
        raise EngineError(f"the plans in {plan_dir} are fp32; rebuild them with `flowie build-engines --fp16`")
    return {s: TrtEngine.from_model(info, s, dev, plan_dir=Path(plan_dir)) for s in wanted}


def torch_engine(module, stage: str, config: EngineConfig):
    """A TorchEngine around an already built network (random-weight benchmarks), as the config says."""
    from engines.torch_engine import TorchEngine
    from flowie.model import parse_dtype
    from flowie.stages import STAGES

    return TorchEngine(module, STAGES[stage], config.device, parse_dtype(config.dtype), **config.torch_options(stage))


def build_pipeline(model_dir: str | Path, config: EngineConfig | None = None,
                   stages: dict | None = None) -> Pipeline:
    """A :class:`flowie.pipeline.Pipeline` of a model directory, its four stages and its tiling as
    ``config`` says (default: :meth:`EngineConfig.for_device` on the CPU).

    stages: engines already made by ``build_engines(model_dir, config)`` (a benchmark that timed
    them first); default: built here. The onnx back end needs ``flowie export`` first (its dtype
    must match the exported files); TensorRT plans (``flowie build-engines``) carry their own precision.
    """
    from flowie.model import load_null_context
    from flowie.modeldir import read_model_dir
    from flowie.pipeline import Pipeline, PipelineOptions

    config = config or EngineConfig.for_device("cpu")
    stages = stages if stages is not None else build_engines(model_dir, config)
    info = read_model_dir(model_dir)
    log.info("pipeline %s on %s (%s): %s", info.name, config.device, config.backend,
             ", ".join(f"{s}: {_runs_on(e, config.backend)}" for s, e in stages.items()))
    options = PipelineOptions(tile_batch=config.tile_batch, tile_area=config.tile_area, spill_dir=config.spill_dir,
                              spill_min_bytes=config.spill_min_bytes)
    return Pipeline(info, stages, load_null_context(info), device=config.device, backend=config.backend,
                    options=options)


def _runs_on(stage, backend: str) -> str:
    """What a stage runs on, for the log: its first provider, or the back end (plain callables: "given")."""
    if not hasattr(stage, "describe"):
        return "given"
    return stage.describe().get("providers", [backend])[0]


def _plan_meta(plan_dir) -> dict:
    from engines.artifacts import read_sidecar, trt_meta_path

    return read_sidecar(trt_meta_path(plan_dir)) or {}


def _ort_engine(info, stage: str, device, precision, config: EngineConfig):
    import torch

    from engines.artifacts import check_onnx_current, onnx_path
    from engines.ort_engine import OrtEngine, trt_provider_options
    from flowie.stages import STAGES

    sidecar = check_onnx_current(info, stage)
    exported = sidecar.get("key", {}).get("dtype", "fp32")
    wanted = {torch.float32: "fp32", torch.float16: "fp16"}.get(precision)
    if wanted is None:
        raise EngineError(f"the onnx back end runs fp32 or fp16 exports, not {precision}")
    if exported != wanted:
        raise EngineError(f"{onnx_path(info.path, stage)} is {exported}; re-export with "
                          f"`flowie export --model {info.path} --dtype {wanted}` or ask for "
                          f"dtype {'float16' if exported == 'fp16' else 'float32'}")
    trt_options = None
    if device.type == "cuda":
        spec = STAGES[stage]
        context = tuple(info.stages.get("null_context", {}).get("shape", [1, 77, 1024])[-2:])
        cache = info.path / "trt" / "ort-trt-ep" if config.trt_ep_cache else None
        trt_options = trt_provider_options(spec, spec.envelope, context, cache, fp16=config.trt_ep_fp16)
    return OrtEngine(onnx_path(info.path, stage), STAGES[stage], device, providers=list(config.providers) or None,
                     intra_op_threads=config.intra_op_threads,
                     inter_op_threads=config.inter_op_threads, trt_options=trt_options)
