"""TensorRT 10 engine: runs ``<model>/trt/<gpu>-trt<version>/<stage>.plan``.

Deserialises the plan, sets the input shapes on every call (dynamic batch and size within
the plan's optimisation profile) and runs ``execute_async_v3`` on its own CUDA stream,
reading and writing torch-allocated CUDA tensors. A plan is refused, before TensorRT sees
it, when its ``meta.json`` names another GPU, compute capability or TensorRT version.

Written against the TensorRT 10 Python API; see docs/ENGINES.md for what has been run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from engines.artifacts import StaleArtifactError, find_plan_dir, plan_path, read_sidecar, trt_meta_path
from engines.base import Engine, EngineError, ShapeError, bind_axes
from flowie.modeldir import ModelInfo
from flowie.stages import STAGES, StageSpec

log = logging.getLogger(__name__)

TENSORRT_MISSING = "TensorRT is not installed (pip install 'tensorrt>=10' on a machine with an NVIDIA GPU)"


def import_tensorrt(consequence: str = "use --backend torch or onnx here"):
    """The ``tensorrt`` module, version 10 or later, or EngineError with one clear sentence."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"{TENSORRT_MISSING}; {consequence}") from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is installed but FlowIE Serve needs TensorRT 10 or later")
    return trt


def gpu_identity(device: torch.device | str = "cuda") -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device``."""
    if not torch.cuda.is_available():
        raise EngineError("no CUDA GPU is visible to torch; TensorRT plans need one")
    device = torch.device(device)
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for name, torch_type in (("bfloat16", torch.bfloat16), ("int64", torch.int64)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_type
    if dtype not in table:
        raise EngineError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TrtEngine(Engine):
    backend = "tensorrt"

    def __init__(self, plan: str | Path, spec: StageSpec, device: str | torch.device = "cuda",
                 profile_index: int = 0):
        trt = import_tensorrt()
        self.spec = spec
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise EngineError(f"the tensorrt back end runs on CUDA devices, not {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.path = Path(plan)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise EngineError(f"TensorRT could not deserialise {self.path}; rebuild it with `flowie build-engines`")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        self.profile_index = profile_index
        if profile_index:
            self.context.set_optimization_profile_async(profile_index, self.stream.cuda_stream)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(inputs) != sorted(spec.input_names) or sorted(outputs) != sorted(spec.output_names):
            raise EngineError(f"{self.path} has inputs {inputs} and outputs {outputs}; the {spec.name} stage "
                              f"needs {spec.input_names} -> {spec.output_names}. Rebuild it with `flowie build-engines`.")
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._profiles = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, profile_index))
                          for n in inputs}
        floats = [self._dtypes[t.name] for t in spec.inputs if t.dtype == "float"]
        self.precision = floats[0] if floats else torch.float32

    @classmethod
    def from_model(cls, info: ModelInfo, stage: str, device: str | torch.device = "cuda",
                   plan_dir: Path | None = None) -> TrtEngine:
        """Load ``stage``'s plan for this GPU and TensorRT version; refuse mismatched plans."""
        trt = import_tensorrt()
        if plan_dir is None:
            name, capability = gpu_identity(device)
            plan_dir = find_plan_dir(info.path, name, capability, trt.__version__)
        meta = read_sidecar(trt_meta_path(plan_dir)) or {}
        if stage not in meta.get("stages", {}):
            raise StaleArtifactError(f"{plan_dir} has no plan for {stage}; run `flowie build-engines --model {info.path}`")
        return cls(plan_path(plan_dir, stage), STAGES[stage], device=device)

    def describe(self) -> dict:
        return {**super().describe(), "plan": str(self.path),
                "profile": {n: {"min": p[0], "opt": p[1], "max": p[2]} for n, p in self._profiles.items()}}

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        low, _, high = self._profiles[name]
        if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
            raise ShapeError(f"{self.name}.{name}: shape {shape} is outside the plan's profile {low}..{high}; "
                             "rebuild with a wider `flowie build-engines --profile`")

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bind_axes(self.spec, {name: tuple(x.shape) for name, x in feed.items()})
        inputs = {name: feed[name].to(self.device, self._dtypes[name]).contiguous() for name in self.spec.input_names}
        current = torch.cuda.current_stream(self.device)
        for name, x in inputs.items():
            self._check_profile(name, tuple(x.shape))
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise ShapeError(f"TensorRT refused shape {tuple(x.shape)} for {self.name}.{name}")
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = {}
        for name in self.spec.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"TensorRT could not infer the shape of {self.name}.{name} ({shape})")
            out = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        # Run on our stream once torch's pending writes to the inputs are done; buffers that
        # torch allocated on the current stream are marked as used by ours so they are not
        # recycled early; the caller's stream then waits for the result.
        self.stream.wait_stream(current)
        for x in (*inputs.values(), *outputs.values()):
            x.record_stream(self.stream)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"TensorRT execution of {self.name} failed (see the TensorRT log above)")
        current.wait_stream(self.stream)
        return outputs

    def close(self) -> None:
        self.context = None
        self.engine = None
