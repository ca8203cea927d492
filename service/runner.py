"""What the worker computes with: one `flowie.pipeline.Pipeline` per task, behind a small protocol.

Only the worker side imports this module's `PipelineRunner` (it imports torch); the protocol
lets the worker's batching be written without knowing the model.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engines.config import EngineConfig
from flowie.params import EnhanceParams
from flowie.progress import report_step
from service import faces_job

log = logging.getLogger("flowie.service.runner")


class Runner(Protocol):
    backend: str

    @functools.cached_property
    def restorers(self) -> dict[str, Any]:
        """Whole photos (faces=detect): a FaceRestorer per face-model task (service.faces_job), made on
        the first whole-photo job, so a worker that never gets one never loads a detector."""
        return faces_job.build_restorers(self.pipelines, self.config.device, self.face_detector, self.background_task,
                                         self.face_models, self.face_parser)

    @property
    def tasks(self) -> list[str]: ...

    def padded_shape(self, task: str, height: int, width: int, params: EnhanceParams) -> tuple[int, int]:
        """Padded work size (H, W) in pixels: images with equal work size batch together."""

    def enhance(self, task: str, images: list[np.ndarray], params: EnhanceParams,
                seeds: list[int]) -> list[Any]:
        """One batch: results with ``.image`` (uint8 HWC RGB), ``.seed``, ``.timings``; where it is
        goes to the watcher of `flowie.progress` the caller installed, if any."""

    def memory_bytes(self) -> dict[str, int]:
        """Accelerator memory held, by kind ({} on the CPU)."""

    def default_min_side(self, task: str) -> int:
        """The model's default ``min_side``: the work size of a typical small request."""

    def tile_rows(self, task: str, height: int, width: int) -> int:
        """Most batch rows a network call on a large image's tiles can hold when (height, width) is
        the size of those tiles and their shapes are worth warming up; 0 otherwise."""

    def shape_probe(self, task: str, height: int, width: int) -> tuple[int, int] | None:
        """A second work size to warm up after (height, width) when the task's networks are compiled
        for the sizes they see (torch.compile), so that other image sizes need no compile; else None."""

    def warmup_done(self) -> None:
        """The warm-up is over: what it captured stays, later shapes go to bounded caches."""


class PipelineRunner:
    """One pipeline per task, all on ``config.device``; :meth:`load` builds them from model directories."""

    def __init__(self, pipelines: dict[str, Any], config: EngineConfig, face_detector: str = "mtcnn",
                 background_task: str = "", face_models: str = "", face_parser: str = "auto") -> None:
        self.pipelines = dict(pipelines)
        self.config = config
        self.device = config.device
        self.backend = config.backend
        for pipe in self.pipelines.values():
            for engine in pipe.stages.values():
                engine.start_warmup()  # until warmup_done: the shapes a worker warms up stay captured
        self.face_detector, self.background_task = face_detector, background_task
        self.face_models, self.face_parser = face_models, face_parser  # faces_job.build_restorers

    @classmethod
    def load(cls, model_dirs: list[Path], config: EngineConfig | None = None, face_detector: str = "mtcnn",
             background_task: str = "", face_models: str = "", face_parser: str = "auto") -> PipelineRunner:
        """Build every model directory's pipeline with ``engines.build_pipeline``; one model per task."""
        from engines import build_pipeline  # torch: the worker side only

        config = config or EngineConfig.for_device("cpu")
        pipelines: dict[str, Any] = {}
        for model_dir in model_dirs:
            # torch modules, onnxruntime sessions or TensorRT plans (`flowie export` / `build-engines`)
            pipe = build_pipeline(model_dir, config)
            task = pipe.info.task
            if task in pipelines:
                raise ValueError(f"two model directories serve task {task!r}: "
                                 f"{pipelines[task].info.path} and {model_dir}; pass one per task")
            pipelines[task] = pipe
            log.info("model loaded", extra={"task": task, "model": pipe.info.name, "device": config.device,
                                            "backend": pipe.backend})
        return cls(pipelines, config, face_detector, background_task, face_models, face_parser)

    @functools.cached_property
    def restorers(self) -> dict[str, Any]:
        """Whole photos (faces=detect): a FaceRestorer per face-model task (service.faces_job), made on
        the first whole-photo job, so a worker that never gets one never loads a detector."""
        return faces_job.build_restorers(self.pipelines, self.config.device, self.face_detector, self.background_task,
                                         self.face_models, self.face_parser)

    @property
    def tasks(self) -> list[str]:
        return list(self.pipelines)

    def padded_shape(self, task: str, height: int, width: int, params: EnhanceParams) -> tuple[int, int]:
        if params.faces == "detect":
            faces_job.check_face_params(self.restorers, task, params)
            return faces_job.FACE_BATCH_SHAPE
        return tuple(self.pipelines[task].padded_shape(height, width, params))  # type: ignore[return-value]

    def enhance(self, task: str, images: list[np.ndarray], params: EnhanceParams,
                seeds: list[int]) -> list[Any]:
        if params.faces == "detect":
            return self.restorers[task].enhance(images, params, seeds)
        # The API answers with the final image only: skip the stage-1 image's conversion. The sampler's
        # steps go to the watcher the worker installed (flowie.progress), as the stages and tiles do.
        return list(self.pipelines[task].enhance(images, params, seeds=seeds, keep_restored=False,
                                                 on_step=report_step))

    def default_min_side(self, task: str) -> int:
        return int(self.pipelines[task].info.defaults.get("min_side") or 0)

    def tile_rows(self, task: str, height: int, width: int) -> int:
        # A large image's tiles go through each network up to tiles_per_call rows at a time (all its
        # images' tiles together). When the pixel, latent and decoder tiles cover the same area (the
        # official models: 512 px), those calls are shaped like a batch of that many tile-sized
        # images. On CUDA each new row count costs cuDNN's algorithm search and a CUDA-graph capture
        # per stage on first sight: seconds (docs/PERF.md, third H200 run). The CPU has neither.
        pipe = self.pipelines[task]
        tile = pipe.pixel_tile
        same_area = pipe.latent_tile * 8 == pipe.decoder_tile * 8 == tile
        if not self.config.on_cuda or not same_area or (height, width) != (tile, tile):
            return 0
        return int(pipe.tiles_per_call(tile))

    def shape_probe(self, task: str, height: int, width: int) -> tuple[int, int] | None:
        # torch.compile (dynamic=None) compiles for the exact sizes it first sees, then once more, with
        # the sizes that changed made symbolic, when others come. Without this, the first request of a
        # new image geometry would pay that second compile, minutes on a GPU host (docs/PERF.md, fourth
        # H200 run: 166-187 s), while every job behind it waits. Warmed up at batch 1 and 2 (a batch of
        # one is always compiled apart), a size whose two sides both differ leaves graphs that take
        # any size and batch. The sizes warmed up before keep their own kernels, captured in their CUDA
        # graphs. The size must not be tiled: tiles have the tile's shape.
        pipe = self.pipelines[task]
        if not any(engine.describe().get("compile") for engine in pipe.stages.values()):
            return None
        params = EnhanceParams(upscale=1.0, min_side=0)  # as the warm-up runs: the image's own size
        probe = (height + 64, width + 128)
        seen, padded = pipe.padded_shape(height, width, params), pipe.padded_shape(*probe, params)
        if padded[0] == seen[0] or padded[1] == seen[1] or pipe.tiled(padded, params):
            return None
        return probe

    def warmup_done(self) -> None:
        for pipe in self.pipelines.values():
            for engine in pipe.stages.values():
                engine.end_warmup()

    def memory_bytes(self) -> dict[str, int]:
        if not self.config.on_cuda:
            return {}
        import torch

        return {"allocated": int(torch.cuda.memory_allocated(self.device)),
                "reserved": int(torch.cuda.memory_reserved(self.device))}
