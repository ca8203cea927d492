"""One declared contract per network stage (torch-free).

Export, the engine builder and the request validator all read these specs, so the
tensor names, dtypes and shape envelope are stated exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Image sizes are padded to a multiple of this before the networks run: SwinIR unshuffles
# by 8 and then needs windows of 8 (8*8 = 64); the latent UNet downsamples three times.
SPATIAL_MULTIPLE = 64
LATENT_DOWNSCALE = 8


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: symbolic shape (ints are fixed, strings are dynamic axes)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float"  # "float" follows the engine precision; "float32" is always fp32
    doc: str = ""


@dataclass(frozen=True)
class ShapeEnvelope:
    """Min / opt / max of the dynamic axes, in image pixels (H = W) and batch size."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 16
    min_px: int = 64
    opt_px: int = 512
    max_px: int = 1024


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # How the spatial axes of this stage relate to image pixels (1 = pixels, 8 = latent).
    spatial_divisor: int
    envelope: ShapeEnvelope = field(default_factory=ShapeEnvelope)
    doc: str = ""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX-style dynamic axes: {tensor: {axis: symbol}} for every string dimension."""
        axes: dict[str, dict[int, str]] = {}
        for tensor in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
            if named:
                axes[tensor.name] = named
        return axes

    def concrete_shapes(self, batch: int, height_px: int, width_px: int, context_tokens: int = 77,
                        context_dim: int = 1024) -> dict[str, tuple[int, ...]]:
        """Shapes of every input and output for a batch of images of height_px x width_px."""
        values = {
            "B": batch,
            "H": height_px,
            "W": width_px,
            "h": height_px // LATENT_DOWNSCALE,
            "w": width_px // LATENT_DOWNSCALE,
            "T": context_tokens,
            "C": context_dim,
        }
        return {
            t.name: tuple(values[d] if isinstance(d, str) else d for d in t.shape)
            for t in (*self.inputs, *self.outputs)
        }


SWINIR = StageSpec(
    name="swinir",
    inputs=(TensorSpec("lq", ("B", 3, "H", "W"), doc="degraded image, RGB in [0, 1]"),),
    outputs=(TensorSpec("restored", ("B", 3, "H", "W"), doc="stage-1 restoration, not clamped"),),
    spatial_divisor=1,
    doc="SwinIR (DiffBIR variant): removes most of the degradation.",
)

COND_ENCODER = StageSpec(
    name="cond_encoder",
    inputs=(TensorSpec("restored", ("B", 3, "H", "W"), doc="SwinIR output, nominally [0, 1]"),),
    outputs=(TensorSpec("c_latent", ("B", 4, "h", "w"), doc="the hint the flow UNet expects"),),
    spatial_divisor=1,
    doc="VAE encoder + quant_conv, posterior mode; x scale factor for BFR, unscaled for BSR.",
)

FLOW_UNET = StageSpec(
    name="flow_unet",
    inputs=(
        TensorSpec("x_t", ("B", 4, "h", "w"), doc="latent at time t"),
        TensorSpec("t", ("B",), dtype="float32", doc="time in [0, 999], 999 = noise"),
        TensorSpec("c_latent", ("B", 4, "h", "w"), doc="condition latent from cond_encoder"),
        TensorSpec("context", ("B", "T", "C"), doc="null-prompt text context"),
    ),
    outputs=(TensorSpec("v", ("B", 4, "h", "w"), doc="velocity, approx. x_0 - x_T"),),
    spatial_divisor=LATENT_DOWNSCALE,
    doc="SD2.1 UNet (LoRA merged) + FlowIE latent-hint ControlNet.",
)

VAE_DECODER = StageSpec(
    name="vae_decoder",
    inputs=(TensorSpec("latent", ("B", 4, "h", "w"), doc="sampler output (scaled latent)"),),
    outputs=(TensorSpec("image", ("B", 3, "H", "W"), doc="image in [0, 1] before colour fix, unclamped"),),
    spatial_divisor=LATENT_DOWNSCALE,
    doc="post_quant_conv + decoder of latent / scale_factor, mapped from [-1, 1] to [0, 1].",
)

STAGES: dict[str, StageSpec] = {s.name: s for s in (SWINIR, COND_ENCODER, FLOW_UNET, VAE_DECODER)}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
