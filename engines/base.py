"""The Engine interface: one network stage behind named tensors, checked against its StageSpec.

Every back end (eager torch, onnxruntime, TensorRT) implements :meth:`Engine.run`; calling
an engine positionally makes it a :class:`flowie.pipeline.Pipeline` stage (inputs in StageSpec
order, one float32 tensor out), so the same Pipeline runs on any back end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from engines.errors import EngineError, ShapeError
from flowie.stages import LATENT_DOWNSCALE, StageSpec

__all__ = ["Engine", "EngineError", "ShapeError", "bind_axes", "output_shapes", "random_inputs", "torch_dtype_for"]


def torch_dtype_for(spec_dtype: str, precision: torch.dtype) -> torch.dtype:
    """The dtype an engine feeds for a TensorSpec dtype: "float" follows the precision."""
    if spec_dtype == "float":
        return precision
    if spec_dtype == "float32":
        return torch.float32
    raise ValueError(f"unknown TensorSpec dtype {spec_dtype!r}")


def bind_axes(spec: StageSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Check input shapes against the spec and return the value of every symbolic axis.

    Raises ShapeError when a name is missing or unexpected, a rank or a fixed size differs,
    a shared symbol (e.g. the batch B) takes two values, or a pixel size does not match the
    latent size (H = 8 h).
    """
    expected, given = set(spec.input_names), set(shapes)
    if expected != given:
        raise ShapeError(
            f"{spec.name}: inputs must be exactly {spec.input_names}; "
            f"missing {sorted(expected - given)}, unexpected {sorted(given - expected)}"
        )
    axes: dict[str, int] = {}
    for tensor in spec.inputs:
        shape = tuple(int(d) for d in shapes[tensor.name])
        if len(shape) != len(tensor.shape):
            raise ShapeError(f"{spec.name}.{tensor.name}: expected rank {len(tensor.shape)} "
                             f"{tensor.shape}, got shape {shape}")
        for axis, (declared, actual) in enumerate(zip(tensor.shape, shape, strict=True)):
            if isinstance(declared, int):
                if declared != actual:
                    raise ShapeError(f"{spec.name}.{tensor.name}: axis {axis} must be {declared}, got {actual} "
                                     f"(shape {shape})")
            elif axes.setdefault(declared, actual) != actual:
                raise ShapeError(f"{spec.name}.{tensor.name}: axis {axis} ({declared}) is {actual}, "
                                 f"but another input has {declared} = {axes[declared]}")
    # Pixel and latent sizes are tied: complete whichever side the inputs did not give.
    for pixel, latent in (("H", "h"), ("W", "w")):
        if pixel in axes and latent not in axes:
            if axes[pixel] % LATENT_DOWNSCALE:
                raise ShapeError(f"{spec.name}: {pixel} = {axes[pixel]} is not a multiple of {LATENT_DOWNSCALE}")
            axes[latent] = axes[pixel] // LATENT_DOWNSCALE
        elif latent in axes and pixel not in axes:
            axes[pixel] = axes[latent] * LATENT_DOWNSCALE
        elif pixel in axes and axes[pixel] != axes[latent] * LATENT_DOWNSCALE:
            raise ShapeError(f"{spec.name}: {pixel} = {axes[pixel]} but {latent} = {axes[latent]}")
    return axes


def random_inputs(spec: StageSpec, batch: int, height: int, width: int, context: torch.Tensor,
                  generator: torch.Generator, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Random inputs of realistic range: images in [0, 1], latents ~ N(0, 1), t in [0, 999],
    the model's null context (+ small noise) repeated to the batch. ``height``/``width`` in pixels."""
    tokens, dim = int(context.shape[-2]), int(context.shape[-1])
    shapes = spec.concrete_shapes(batch, height, width, context_tokens=tokens, context_dim=dim)
    inputs = []
    for tensor in spec.inputs:
        shape = shapes[tensor.name]
        if tensor.name == "t":
            x = torch.rand(shape, generator=generator) * 999.0
        elif tensor.name == "context":
            x = context.float().expand(batch, -1, -1) + 0.01 * torch.randn(shape, generator=generator)
        elif len(shape) == 4 and shape[1] == 3:  # images
            x = torch.rand(shape, generator=generator)
        else:  # latents
            x = torch.randn(shape, generator=generator)
        inputs.append(x.to(torch.float32 if tensor.dtype == "float32" else dtype))
    return inputs


def output_shapes(spec: StageSpec, axes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete output shapes from the axis values that :func:`bind_axes` returned."""
    return {t.name: tuple(axes[d] if isinstance(d, str) else d for d in t.shape) for t in spec.outputs}


class Engine(ABC):
    """One network stage: named tensors in, named tensors out, contract = ``spec``.

    Subclasses set ``backend``, ``device`` and ``precision`` (the dtype fed to "float"
    inputs) and implement :meth:`run`. Engines are not thread-safe: give each worker
    thread its own, or serialise calls.
    """

    backend: str = ""
    spec: StageSpec
    device: torch.device
    precision: torch.dtype

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self) -> dict:
        """A small JSON-able summary for logs, /models and benchmark reports."""
        return {"stage": self.name, "backend": self.backend, "device": str(self.device),
                "precision": str(self.precision).removeprefix("torch.")}

    def prepare_inputs(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check ``feed`` against the spec; return contiguous tensors in the engine's dtypes and device."""
        bind_axes(self.spec, {name: tuple(x.shape) for name, x in feed.items()})
        prepared = {}
        for tensor in self.spec.inputs:
            dtype = torch_dtype_for(tensor.dtype, self.precision)
            prepared[tensor.name] = feed[tensor.name].to(self.device, dtype).contiguous()
        return prepared

    @abstractmethod
    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the stage on ``{input name: tensor}``; return ``{output name: tensor}`` on ``device``.

        Outputs are in the engine's precision and are not views of internal buffers.
        """

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Pipeline stage protocol: inputs in StageSpec order -> the one output, float32."""
        if len(inputs) != len(self.spec.inputs):
            raise ShapeError(f"{self.name} takes {len(self.spec.inputs)} inputs {self.spec.input_names}, "
                             f"got {len(inputs)}")
        outputs = self.run(dict(zip(self.spec.input_names, inputs, strict=True)))
        return outputs[self.spec.output_names[0]].float()

    def start_warmup(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """What runs until :meth:`end_warmup` is the warm-up: shapes captured meanwhile stay captured."""

    def end_warmup(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """The warm-up is over: later shapes go to the engine's bounded cache (if it has one)."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release sessions, contexts and buffers (optional; garbage collection also does it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.device}, {str(self.precision).removeprefix('torch.')})"
