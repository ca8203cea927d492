"""Eager PyTorch engine, with optional ``torch.compile`` and CUDA-graph replay.

fp16/bf16 are for CUDA; on the CPU use float32 (CPU half-precision kernels are slow and
not what the references were made with). Both speed-ups are off unless asked for:

- ``compile``: ``True`` or a ``torch.compile`` mode ("default", "max-autotune-no-cudagraphs",
  ...). The first call per new shape compiles (seconds to minutes).
- ``cuda_graphs``: capture one CUDA graph per distinct input-shape set and replay it; the
  inputs are copied into static buffers and the output is cloned out. The captures are bounded
  (:class:`engines.captures.CaptureCache`): those made during the warm-up stay, at most
  ``cuda_graph_cache`` others are kept, least recently used dropped first (0: other shapes run
  eagerly). Do not combine it with ``compile="reduce-overhead"``, which captures graphs itself.
- ``cudnn_benchmark``: let cuDNN time its convolution algorithms once per new input shape and
  keep the fastest (``torch.backends.cudnn.benchmark``; a process-wide flag, CUDA only). The
  first call per shape is slower.
- ``channels_last``: keep the weights, and so the activations, in NHWC memory format. oneDNN's
  CPU convolutions are faster that way (docs/PERF.md, 2-core x86 VM); outputs are returned in the
  usual NCHW layout. The numbers differ from NCHW's only by float32 rounding.
- ``control_stream`` (the flow UNet only, CUDA only): run FlowIE's ControlNet on a second CUDA stream
  beside the UNet's down path, which does not depend on it (``FlowUNet``). Same operations, same
  numbers; meant for small batches, where one stream leaves most of a large GPU idle.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from engines.base import Engine, EngineError
from engines.captures import CaptureCache
from engines.config import COMPILE_MODES, CUDA_GRAPH_CACHE
from flowie.modeldir import ModelInfo
from flowie.stages import STAGES, StageSpec


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, module: nn.Module, spec: StageSpec, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool | str = False, cuda_graphs: bool = False,
                 cuda_graph_cache: int = CUDA_GRAPH_CACHE, cudnn_benchmark: bool = False, channels_last: bool = False, control_stream: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        self.precision = dtype
        if dtype != torch.float32 and self.device.type != "cuda":
            raise EngineError(f"{spec.name}: {dtype} on {self.device} is not supported by the torch engine; "
                              "use float32 on the CPU (fp16/bf16 are for CUDA)")
        mode = _compile_mode(compile)
        if cuda_graphs and self.device.type != "cuda":
            raise EngineError("cuda_graphs=True needs a CUDA device")
        if cuda_graphs and mode == "reduce-overhead":
            raise EngineError("compile='reduce-overhead' already captures CUDA graphs; drop cuda_graphs=True")
        if cudnn_benchmark and self.device.type != "cuda":
            raise EngineError("cudnn_benchmark=True needs a CUDA device")
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True  # process-wide: every engine of this process shares it
        self.cudnn_benchmark = bool(cudnn_benchmark)
        if control_stream and self.device.type != "cuda":
            raise EngineError("control_stream=True needs a CUDA device")
        if control_stream and not hasattr(module, "control_stream"):
            raise EngineError(f"{spec.name}: control_stream applies to the flow_unet stage only (it has the ControlNet)")
        if hasattr(module, "control_stream"):
            module.control_stream = bool(control_stream)
        self.control_stream = bool(control_stream)
        self.module = module.to(self.device, dtype).eval().requires_grad_(False)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            # 4-D weights only; a convolution whose weight is NHWC gives an NHWC output, so the
            # activations follow and the inputs need no conversion of their own.
            self.module.to(memory_format=torch.channels_last)
        self.compile_mode = mode
        if mode:
            _allow_recompiles()
        self._forward = torch.compile(self.module, mode=mode, dynamic=None) if mode else self.module
        self._graphs = _CudaGraphs(self._forward, self.device, cuda_graph_cache) if cuda_graphs else None

    @classmethod
    def from_model(cls, info: ModelInfo, stage: str, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, **options) -> TorchEngine:
        """Load ``stage`` of a model directory's safetensors weights."""
        from flowie.model import load_stage

        module = load_stage(info, stage, "cpu", torch.float32)
        return cls(module, STAGES[stage], device=device, dtype=dtype, **options)

    def describe(self) -> dict:
        graphs = {"cuda_graphs": self._graphs is not None}
        if self._graphs is not None:
            graphs.update(graphs_kept=len(self._graphs.cache), graphs_captured=self._graphs.cache.captures)
        return {**super().describe(), "compile": self.compile_mode, **graphs,
                "cudnn_benchmark": self.cudnn_benchmark, "channels_last": self.channels_last,
                "control_stream": self.control_stream}

    @torch.inference_mode()
    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = self.prepare_inputs(feed)
        args = [inputs[name] for name in self.spec.input_names]
        out = self._graphs(args) if self._graphs is not None else None
        if out is None:  # no graphs, or a shape outside the captured set
            out = self._forward(*args)
        if self.channels_last:
            out = out.contiguous()  # the stage contract's NCHW, for the tiling and colour-fix code after it
        return {self.spec.output_names[0]: out}

    def start_warmup(self) -> None:
        if self._graphs is not None:
            self._graphs.cache.start_warmup()

    def end_warmup(self) -> None:
        if self._graphs is not None:
            self._graphs.cache.end_warmup()


# Compiled graphs dynamo may keep per code object. A worker holds up to four per stage (batch 1 and
# batches of any size, at the warm-up's size and at any size: the warm-up's shape probe), and the same
# network class in two models (BFR and BSR) shares its forward's code object. Past dynamo's default
# limit of 8 it would silently run that stage eagerly, several times slower.
RECOMPILE_LIMIT = 64


def _allow_recompiles() -> None:
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the name before and after torch 2.6
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, name)))


def _compile_mode(option: bool | str) -> str | None:
    if option is False or option is None or option == "":
        return None
    if option is True:
        return "default"
    if option not in COMPILE_MODES:
        raise EngineError(f"compile must be a bool or one of {', '.join(COMPILE_MODES)}, got {option!r}")
    return str(option)


class _CudaGraphs:
    """CUDA graphs by input-shape set, sharing one memory pool, bounded by a CaptureCache."""

    WARMUP_RUNS = 2

    def __init__(self, forward, device: torch.device, size: int):
        self.forward = forward
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.cache: CaptureCache[tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = CaptureCache(size)

    def __call__(self, args: list[torch.Tensor]) -> torch.Tensor | None:
        """The graph's output for ``args``, or None when their shapes are outside the captured set."""
        entry = self.cache.get(tuple((tuple(a.shape), a.dtype) for a in args), lambda: self._capture(args))
        if entry is None:
            return None
        graph, static_in, static_out = entry
        for buffer, value in zip(static_in, args, strict=True):
            buffer.copy_(value)
        graph.replay()
        # The next replay overwrites static_out; callers keep results across steps.
        return static_out.clone()

    def _capture(self, args: list[torch.Tensor]):
        static_in = [a.clone() for a in args]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            # Warm-up outside the graph: lazy initialisation (cuBLAS handles, autotuning) must not be captured.
            for _ in range(self.WARMUP_RUNS):
                self.forward(*static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.forward(*static_in)
        return graph, static_in, static_out
