"""onnxruntime engine: runs ``<model>/onnx/<stage>.onnx``.

Execution providers, best first, as far as the installed onnxruntime has them: on a CUDA
device TensorRT EP -> CUDA EP -> CPU (needs ``onnxruntime-gpu``); on the CPU, the CPU EP.
On CUDA, inputs and outputs stay on the GPU through IO binding (torch-allocated buffers,
no host round trip). The precision is the ONNX file's own (``flowie export --dtype``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from engines.base import Engine, EngineError, bind_axes, output_shapes
from flowie.stages import ShapeEnvelope, StageSpec

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": (torch.float32, np.float32),
    "tensor(float16)": (torch.float16, np.float16),
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise EngineError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
    return onnxruntime


def default_providers(device: torch.device, trt_options: dict | None = None) -> list:
    """Provider list for ``device``: TensorRT EP -> CUDA EP -> CPU, keeping those available."""
    ort = _import_ort()
    available = set(ort.get_available_providers())
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise EngineError(f"the onnx back end runs on cpu or cuda, not {device}")
    index = device.index or 0
    providers: list = []
    if "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", {"device_id": index, **(trt_options or {})}))
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": index}))
    if not providers:
        raise EngineError(
            f"this onnxruntime has no CUDA or TensorRT execution provider (it has {sorted(available)}); "
            "pip install onnxruntime-gpu, or use --device cpu"
        )
    providers.append("CPUExecutionProvider")
    return providers


def trt_provider_options(spec: StageSpec, envelope: ShapeEnvelope, context_shape: tuple[int, int],
                         cache_dir: Path | None, fp16: bool) -> dict:
    """TensorRT EP options: engine and timing caches on disk, one profile from the envelope."""

    def shapes(batch: int, px: int) -> str:
        concrete = spec.concrete_shapes(batch, px, px, context_tokens=context_shape[0], context_dim=context_shape[1])
        return ",".join(f"{t.name}:{'x'.join(str(d) for d in concrete[t.name])}" for t in spec.inputs)

    options = {
        "trt_fp16_enable": fp16,
        "trt_profile_min_shapes": shapes(envelope.min_batch, envelope.min_px),
        "trt_profile_opt_shapes": shapes(envelope.opt_batch, envelope.opt_px),
        "trt_profile_max_shapes": shapes(envelope.max_batch, envelope.max_px),
    }
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
    return options


class OrtEngine(Engine):
    backend = "onnx"

    def __init__(self, path: str | Path, spec: StageSpec, device: str | torch.device = "cpu",
                 providers: Sequence | None = None, intra_op_threads: int = 0, inter_op_threads: int = 0,
                 trt_options: dict | None = None):
        """``intra_op_threads`` 0 lets onnxruntime pick (one per physical core).

        ``providers`` overrides the default order (see :func:`default_providers`).
        """
        ort = _import_ort()
        self.spec = spec
        self.device = torch.device(device)
        self.path = Path(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(intra_op_threads)
        options.inter_op_num_threads = int(inter_op_threads)
        options.log_severity_level = 3  # errors only: the EP fallback warnings are expected
        chosen = list(providers) if providers is not None else default_providers(self.device, trt_options)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime could not load {self.path}: {exc}") from exc
        self.providers = self.session.get_providers()
        if self.device.type == "cuda" and self.providers == ["CPUExecutionProvider"]:
            raise EngineError(f"onnxruntime fell back to the CPU for {self.path} on {self.device}")
        self._check_signature()
        self._input_types = {i.name: _ORT_TYPES[i.type] for i in self.session.get_inputs()}
        self._output_types = {o.name: _ORT_TYPES[o.type] for o in self.session.get_outputs()}
        floats = [self._input_types[t.name][0] for t in spec.inputs if t.dtype == "float"]
        self.precision = floats[0] if floats else torch.float32
        log.info("%s: onnxruntime %s on %s", spec.name, self.providers[0], self.device)

    def _check_signature(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != self.spec.input_names or outputs != self.spec.output_names:
            raise EngineError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; the {self.spec.name} stage needs "
                f"{self.spec.input_names} -> {self.spec.output_names}. Re-export it with `flowie export --force`."
            )
        for i in self.session.get_inputs():
            if i.type not in _ORT_TYPES:
                raise EngineError(f"{self.path}: input {i.name} has unsupported type {i.type}")

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers, "file": str(self.path)}

    def prepare_inputs(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bind_axes(self.spec, {name: tuple(x.shape) for name, x in feed.items()})
        return {name: feed[name].to(self.device, self._input_types[name][0]).contiguous()
                for name in self.spec.input_names}

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = self.prepare_inputs(feed)
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        arrays = {name: x.numpy() for name, x in inputs.items()}
        results = self.session.run(self.spec.output_names, arrays)
        return {name: torch.from_numpy(np.ascontiguousarray(r)) for name, r in zip(self.spec.output_names, results, strict=True)}

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IO binding: onnxruntime reads and writes torch's CUDA buffers directly."""
        axes = bind_axes(self.spec, {name: tuple(x.shape) for name, x in inputs.items()})
        index = self.device.index or 0
        binding = self.session.io_binding()
        for name, x in inputs.items():
            binding.bind_input(name, "cuda", index, self._input_types[name][1], list(x.shape), x.data_ptr())
        outputs = {}
        for name, shape in output_shapes(self.spec, axes).items():
            torch_type, np_type = self._output_types[name]
            out = torch.empty(shape, dtype=torch_type, device=self.device)
            binding.bind_output(name, "cuda", index, np_type, list(shape), out.data_ptr())
            outputs[name] = out
        # onnxruntime runs on its own CUDA stream: the inputs torch wrote must be complete.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs

