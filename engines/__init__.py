"""Engines: one interface, three back ends (torch, onnxruntime, TensorRT) behind flowie.Pipeline.

    from engines import build_pipeline
    pipe = build_pipeline("models/demo", backend="onnx", device="cpu")

Importing this package is cheap (no torch); the back ends load on first use.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.errors import EngineError, ShapeError, StaleArtifactError

if TYPE_CHECKING:  # pragma: no cover
    from flowie.pipeline import Pipeline

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("torch", "onnx", "tensorrt")
_ALIASES = {"torch": "torch", "pytorch": "torch", "eager": "torch", "onnx": "onnx", "onnxruntime": "onnx",
            "ort": "onnx", "tensorrt": "tensorrt", "trt": "tensorrt"}

# Per back end: the options build_pipeline accepts (passed to every stage's engine).
OPTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("compile", "compile_stages", "cuda_graphs", "cudnn_benchmark", "channels_last", "control_stream"),
    "onnx": ("providers", "intra_op_threads", "inter_op_threads", "trt_ep_fp16", "trt_ep_cache"),
    "tensorrt": ("plan_dir",),
}

_LAZY = {
    "Engine": "engines.base",
    "TorchEngine": "engines.torch_engine",
    "OrtEngine": "engines.ort_engine",
    "TrtEngine": "engines.trt_engine",
}

__all__ = ["BACKENDS", "EngineError", "ShapeError", "StaleArtifactError", "build_pipeline", "build_engines",
           "channels_last_stages", "normalise_backend", "torch_stage_options", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engines' has no attribute {name!r}")


def normalise_backend(backend: str | None) -> str:
    """'onnxruntime'/'ort' -> 'onnx', 'trt' -> 'tensorrt'; None -> $FLOWIE_BACKEND or 'torch'."""
    raw = backend if backend else os.environ.get("FLOWIE_BACKEND", "torch")
    try:
        return _ALIASES[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {raw!r}") from None


def build_engines(model_dir: str | Path, backend: str | None = "torch", device: str = "cpu",
                  dtype: str = "float32", stages: tuple[str, ...] | None = None, **options) -> dict:
    """``{stage: Engine}`` for a model directory; see :func:`build_pipeline` for the options."""
    import torch

    from flowie.model import parse_dtype
    from flowie.modeldir import read_model_dir
    from flowie.pipeline import STAGE_ORDER

    name = normalise_backend(backend)
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for the {name} back end; it takes {list(OPTIONS[name])}")
    info = read_model_dir(model_dir)
    dev = torch.device(device)
    precision = parse_dtype(dtype)
    wanted = tuple(stages) if stages else STAGE_ORDER
    if name == "torch":
        from engines.torch_engine import TorchEngine

        per_stage = torch_stage_options(options, dev)
        return {s: TorchEngine.from_model(info, s, dev, precision, **per_stage(s)) for s in wanted}
    if name == "onnx":
        return {s: _ort_engine(info, s, dev, precision, **options) for s in wanted}
    from engines.trt_engine import TrtEngine, gpu_identity, import_tensorrt

    trt = import_tensorrt()
    plan_dir = options.get("plan_dir")
    if plan_dir is None:
        from engines.artifacts import find_plan_dir

        gpu, capability = gpu_identity(dev)
        plan_dir = find_plan_dir(info.path, gpu, capability, trt.__version__)
    built = _plan_meta(plan_dir).get("precision", "fp32")
    if precision != torch.float32 and built == "fp32":
        # Plans carry their precision; float32 is the CLI default and accepts any plan.
        raise EngineError(f"the plans in {plan_dir} are fp32; rebuild them with `flowie build-engines --fp16`")
    return {s: TrtEngine.from_model(info, s, dev, plan_dir=Path(plan_dir)) for s in wanted}


def torch_stage_options(options: dict[str, Any], device) -> Callable[[str], dict[str, Any]]:
    """The torch back end's options -> a function giving one stage's TorchEngine keyword arguments.

    ``compile_stages`` narrows ``compile`` to the named stages, ``channels_last`` becomes a bool
    per stage (:func:`channels_last_stages`) and ``control_stream`` goes to the flow UNet only (the
    stage with the ControlNet); the other options go to every stage as they are.
    """
    common = dict(options)
    compile_mode = common.pop("compile", False)
    compiled = _compile_stages(common.pop("compile_stages", None))
    nhwc = channels_last_stages(common.pop("channels_last", "auto"), device)
    control_stream = bool(common.pop("control_stream", False))

    def for_stage(stage: str) -> dict[str, Any]:
        extra = {"control_stream": True} if control_stream and stage == "flow_unet" else {}
        return {**common, "compile": compile_mode if compiled is None or stage in compiled else False,
                "channels_last": stage in nhwc, **extra}

    return for_stage


def _compile_stages(stages) -> frozenset[str] | None:
    """The ``compile_stages`` option: None = every stage, else the named ones (checked)."""
    if stages is None:
        return None
    from flowie.stages import STAGES

    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise EngineError(f"compile_stages: unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    return frozenset(stages)


def channels_last_stages(option, device) -> frozenset[str]:
    """The torch back end's ``channels_last`` option -> the stages kept in NHWC memory format.

    "auto" (or None): on the CPU the convolution-heavy stages (flowie.stages.CHANNELS_LAST_CPU_STAGES,
    measured faster there), on CUDA none (measured slower with fp16); True: every stage; False:
    none; else an iterable of stage names (checked).
    """
    from flowie.stages import CHANNELS_LAST_CPU_STAGES, STAGES

    if option is None or option == "auto":
        return frozenset(CHANNELS_LAST_CPU_STAGES) if _device_type(device) == "cpu" else frozenset()
    if isinstance(option, bool):
        return frozenset(STAGES) if option else frozenset()
    if isinstance(option, str):
        raise EngineError(f"channels_last: {option!r} is not 'auto', a bool or a list of stages")
    unknown = sorted(set(option) - set(STAGES))
    if unknown:
        raise EngineError(f"channels_last: unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    return frozenset(option)


def _device_type(device) -> str:
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


def build_pipeline(model_dir: str | Path, backend: str | None = "torch", device: str = "cpu",
                   dtype: str = "float32", **options) -> Pipeline:
    """A :class:`flowie.pipeline.Pipeline` whose four stages run on ``backend``.

    backend: "torch" | "onnx" | "tensorrt" (None: $FLOWIE_BACKEND, default torch).
    device: "cpu", "cuda" or "cuda:N". dtype: float32 | float16 | bfloat16 (torch);
    for onnx it must match the exported files (``flowie export --dtype``); TensorRT plans
    carry their own precision (``flowie build-engines --fp16``).

    options, per back end:
      torch:    compile (bool or torch.compile mode), compile_stages (the stages it applies to;
                default every stage), cuda_graphs (bool, CUDA only), cudnn_benchmark (bool, CUDA only),
                channels_last ("auto": the convolution-heavy stages on the CPU, none on CUDA; a bool;
                or the stages it applies to), control_stream (bool, CUDA only: the flow UNet runs its
                ControlNet on a second stream beside the UNet's down path)
      onnx:     intra_op_threads, inter_op_threads (0 = onnxruntime's choice), providers
                (explicit list), trt_ep_fp16 (bool), trt_ep_cache (bool, default True)
      tensorrt: plan_dir (default: <model>/trt/<gpu>-trt<version>, checked against meta.json)
    """
    from flowie.model import load_null_context
    from flowie.modeldir import read_model_dir
    from flowie.pipeline import Pipeline

    name = normalise_backend(backend)
    stages = build_engines(model_dir, name, device, dtype, **options)
    info = read_model_dir(model_dir)
    log.info("pipeline %s on %s (%s): %s", info.name, device, name,
             ", ".join(f"{s}: {e.describe().get('providers', [name])[0]}" for s, e in stages.items()))
    return Pipeline(info, stages, load_null_context(info), device=device, backend=name)


def _plan_meta(plan_dir) -> dict:
    from engines.artifacts import read_sidecar, trt_meta_path

    return read_sidecar(trt_meta_path(plan_dir)) or {}


def _ort_engine(info, stage: str, device, precision, providers=None, intra_op_threads: int = 0,
                inter_op_threads: int = 0, trt_ep_fp16: bool = False, trt_ep_cache: bool = True):
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
        cache = info.path / "trt" / "ort-trt-ep" if trt_ep_cache else None
        trt_options = trt_provider_options(spec, spec.envelope, context, cache, fp16=trt_ep_fp16)
    return OrtEngine(onnx_path(info.path, stage), STAGES[stage], device, providers=providers,
                     intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads, trt_options=trt_options)
