"""One engine configuration: every "auto" of a pipeline and its worker, resolved once for a device.

    config = EngineConfig.for_device("cuda:0", torch_compile=True)
    pipe = engines.build_pipeline("models/demo", config)

:meth:`EngineConfig.for_device` takes the few choices a person makes (device, back end, precision,
whether to compile, where to spill) and fills in the rest from what measurement decided for that
device (docs/PERF.md has the numbers). ``overrides`` (``"cuda_graphs=off,tile_batch=4"``) changes
any of those measured defaults, for benchmarks and experiments; ``OVERRIDES`` lists the keys.
The object is frozen: whatever builds pipelines, workers or benchmarks reads the same values.

Light module: no torch (the API process builds its settings with it).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowie.stages import STAGE_NAMES

BACKENDS: tuple[str, ...] = ("torch", "onnx", "tensorrt")
_ALIASES = {"torch": "torch", "pytorch": "torch", "eager": "torch", "onnx": "onnx", "onnxruntime": "onnx",
            "ort": "onnx", "tensorrt": "tensorrt", "trt": "tensorrt"}
DTYPES = ("float32", "float16", "bfloat16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Stages kept in channels-last (NHWC) memory format on the CPU: oneDNN's NHWC convolutions run
# these faster there; the flow UNet gains nothing. On CUDA with fp16 NHWC was slower (docs/PERF.md).
CPU_CHANNELS_LAST = ("swinir", "cond_encoder", "vae_decoder")
# Tiles per network call on CUDA: one tile at a time leaves a large GPU mostly idle (docs/PERF.md).
CUDA_TILE_BATCH = 8
# On the CPU a call holds as many tiles as fill one official 512 x 512 tile (at least one): small
# tiles stop paying a call's overhead each, official-size tiles keep the CPU memory record.
CPU_TILE_AREA = 512 * 512
# A spilled store costs a write and a read; below this size (about 1.4 MP of work) RAM is cheaper.
AUTO_SPILL_MIN_BYTES = 16 * 1024 * 1024
# CUDA graphs captured per stage beyond the warm-up's, least recently used dropped first.
CUDA_GRAPH_CACHE = 8
# The zlib level of PNG answers: lossless at every level, level 1 is the fastest that compresses.
PNG_COMPRESS_LEVEL = 1
MAX_CODEC_THREADS = 8


def normalise_backend(backend: str | None) -> str:
    """'onnxruntime'/'ort' -> 'onnx', 'trt' -> 'tensorrt'; None or '' -> 'torch'."""
    raw = backend or "torch"
    try:
        return _ALIASES[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {raw!r}") from None


@dataclass(frozen=True)
class EngineConfig:
    """How pipelines on one device are built and fed; see :meth:`for_device`."""

    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    backend: str = "torch"  # torch | onnx | tensorrt
    dtype: str = "float32"  # precision of the networks' float inputs and weights
    # torch back end
    compile_stages: tuple[str, ...] = ()  # stages run through torch.compile
    compile_mode: str = "default"  # the torch.compile mode of those stages
    cuda_graphs: bool = False  # replay each stage as a CUDA graph per input shape
    cuda_graph_cache: int = CUDA_GRAPH_CACHE  # captures per stage kept beyond the warm-up's
    cudnn_benchmark: bool = False  # cuDNN times its convolution algorithms per new shape
    channels_last: tuple[str, ...] = ()  # stages kept in NHWC memory format
    control_stream: bool = False  # the flow UNet's ControlNet on a second CUDA stream
    # onnx back end
    intra_op_threads: int = 0  # 0 = onnxruntime's choice
    inter_op_threads: int = 0
    trt_ep_fp16: bool = False  # the TensorRT execution provider builds fp16 engines
    trt_ep_cache: bool = True  # ... and caches them under <model>/trt/ort-trt-ep
    providers: tuple[str, ...] = ()  # onnxruntime providers to use (empty = the best installed)
    # tensorrt back end
    plan_dir: str | None = None  # None = <model>/trt/<gpu>-trt<version>, checked against meta.json
    # the pipeline
    tile_batch: int = 1  # tiles per network call on a large image (0 = fill tile_area)
    tile_area: int = CPU_TILE_AREA  # with tile_batch 0: pixels of tiles per call
    spill_dir: str | None = None  # where a large image's SwinIR output waits (None = RAM)
    spill_min_bytes: int = 0  # smallest output that goes there
    # the worker around it
    encode_overlap: bool = False  # encode answers while the next batch computes
    png_compress_level: int = PNG_COMPRESS_LEVEL
    codec_threads: int = 1  # threads encoding answers (and as many decoding uploads)
    host_malloc: bool = False  # glibc tuned to keep freed memory (service.hostmem)

    @classmethod
    def for_device(cls, device: str = "cpu", *, backend: str | None = "torch", dtype: str = "auto",
                   torch_compile: bool = False, spill_dir: str | None = "auto", overrides: str = "") -> EngineConfig:
        """The configuration measured best for ``device``, with ``overrides`` applied; ValueError if bad.

        dtype: auto = float16 for the torch back end on CUDA, float32 otherwise. torch_compile:
        compile every stage (long-lived GPU workers; the warm-up pays the compile). spill_dir: auto
        = on the CPU outputs over AUTO_SPILL_MIN_BYTES go to the system temp directory, on a GPU
        host RAM; off = RAM; or a directory.
        """
        device = str(device).strip() or "cpu"
        name = normalise_backend(backend)
        cuda = device.split(":")[0] == "cuda"
        torch_cuda = cuda and name == "torch"
        if dtype == "auto":
            dtype = "float16" if torch_cuda else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        spill_to, spill_min = _spill(spill_dir, cuda)
        config = cls(
            device=device, backend=name, dtype=dtype,
            compile_stages=STAGE_NAMES if torch_compile and name == "torch" else (),
            cuda_graphs=torch_cuda, cudnn_benchmark=torch_cuda, control_stream=torch_cuda,
            channels_last=() if cuda else CPU_CHANNELS_LAST,
            tile_batch=CUDA_TILE_BATCH if cuda else 0,
            spill_dir=spill_to, spill_min_bytes=spill_min,
            encode_overlap=cuda, codec_threads=min(MAX_CODEC_THREADS, os.cpu_count() or 1), host_malloc=not cuda,
        )
        config = dataclasses.replace(config, **parse_overrides(overrides))
        config.check()
        return config

    @property
    def on_cuda(self) -> bool:
        return self.device.split(":")[0] == "cuda"

    def check(self) -> None:
        """ValueError naming the override that cannot work on this device or back end."""
        if not self.on_cuda:
            for key in ("cuda_graphs", "cudnn_benchmark", "control_stream"):
                if getattr(self, key):
                    raise ValueError(f"{key}=on needs a CUDA device, not {self.device}")
            if self.dtype != "float32" and self.backend == "torch":
                raise ValueError(f"{self.dtype} on {self.device}: the torch back end runs float32 on the CPU")
        if self.cuda_graphs and self.compile_mode == "reduce-overhead" and self.compile_stages:
            raise ValueError("compile_mode=reduce-overhead captures CUDA graphs itself: set cuda_graphs=off")

    def torch_options(self, stage: str) -> dict[str, Any]:
        """The keyword arguments of ``engines.TorchEngine`` for one stage."""
        return {"compile": self.compile_mode if stage in self.compile_stages else False,
                "cuda_graphs": self.cuda_graphs, "cuda_graph_cache": self.cuda_graph_cache,
                "cudnn_benchmark": self.cudnn_benchmark, "channels_last": stage in self.channels_last,
                "control_stream": self.control_stream and stage == "flow_unet"}

    def tiles_per_call(self, tile_px: int) -> int:
        """Batch rows per network call for tiles of ``tile_px`` image pixels a side."""
        if self.tile_batch:
            return self.tile_batch
        return max(1, self.tile_area // (tile_px * tile_px))

    def describe(self) -> dict[str, Any]:
        """Every field, JSON-able, for logs and benchmark reports."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _spill(setting: str | None, cuda: bool) -> tuple[str | None, int]:
    value = (setting or "auto").strip()
    if value.lower() == "off":
        return None, 0
    if value.lower() == "auto":
        return (None, 0) if cuda else (tempfile.gettempdir(), AUTO_SPILL_MIN_BYTES)
    if not Path(value).is_dir():
        raise ValueError(f"spill directory {value!r} does not exist: create it (on a disk, not a tmpfs), "
                         "or use 'auto' or 'off'")
    return value, 0


# ------------------------------------------------------------------ overrides

_ON, _OFF = ("on", "true", "1", "yes"), ("off", "false", "0", "no")


def _flag(text: str) -> bool:
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise ValueError("is not on or off")


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise ValueError(f"is not a whole number from {low} to {high}")
        return int(text)

    return parse


def _stages(text: str) -> tuple[str, ...]:
    if text in ("none", *_OFF):
        return ()
    if text == "all":
        return STAGE_NAMES
    names = tuple(part for part in text.split("+") if part)
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown or not names:
        raise ValueError(f"names no stage of {', '.join(STAGE_NAMES)} (join several with +, or all, none)")
    return names


def _compile_mode(text: str) -> str:
    if text not in COMPILE_MODES:
        raise ValueError(f"is not one of {', '.join(COMPILE_MODES)}")
    return text


def _directory(text: str) -> str:
    return text


# Every key an override may set, with the parser of its value.
OVERRIDES: dict[str, Callable[[str], Any]] = {
    "compile_stages": _stages, "compile_mode": _compile_mode, "cuda_graphs": _flag,
    "cuda_graph_cache": _count(0, 256), "cudnn_benchmark": _flag, "channels_last": _stages,
    "control_stream": _flag, "intra_op_threads": _count(0, 256), "inter_op_threads": _count(0, 256),
    "trt_ep_fp16": _flag, "trt_ep_cache": _flag, "plan_dir": _directory, "tile_batch": _count(0, 64),
    "spill_min_bytes": _count(0, 1 << 50), "encode_overlap": _flag, "png_compress_level": _count(0, 9),
    "codec_threads": _count(1, 64), "host_malloc": _flag,
}


def parse_overrides(text: str) -> dict[str, Any]:
    """``"cuda_graphs=off, tile_batch=4"`` -> {"cuda_graphs": False, "tile_batch": 4}; ValueError if bad.

    Stage lists join names with ``+`` (``channels_last=swinir+vae_decoder``), or say all / none.
    """
    values: dict[str, Any] = {}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip().lower(), raw.strip()
        if not sep or key not in OVERRIDES:
            raise ValueError(f"engine override {item!r}: expected key=value with a key of {', '.join(OVERRIDES)}")
        try:
            values[key] = OVERRIDES[key](raw if key == "plan_dir" else raw.lower())
        except ValueError as exc:
            raise ValueError(f"engine override {key}={raw!r} {exc}") from None
    return values
