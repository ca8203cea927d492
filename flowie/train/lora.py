"""LoRA on the UNet's attention and GEGLU projections, as the official training injects it.

Official (``lora_diffusion.inject_trainable_lora(unet, r)``): every Linear inside the UNet's
attention layers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and the GEGLU input projection
(``ff.net.0.proj``), not the ControlNet; ``W_eff = W + up @ down`` (scale 1, no alpha/r),
``up`` zero-initialised, base weights frozen.

Implemented as a ``torch.nn.utils.parametrize`` parametrisation of ``weight``, so the module
tree and forward code stay those of the served network, and merging is exact:
:func:`merge_lora` bakes ``W + up @ down`` into a plain ``weight``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

TARGET_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj")


class LoRADelta(nn.Module):
    """weight -> weight + up @ down, with down [r, in] ~ N(0, 1/r) and up [out, r] = 0."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(rank))
        self.up = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.up @ self.down


def lora_targets(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, mod) for name, mod in unet.named_modules()
            if isinstance(mod, nn.Linear) and name.endswith(TARGET_SUFFIXES)]


def inject_lora(unet: nn.Module, rank: int, seed: int = 0) -> list[nn.Parameter]:
    """Freeze ``unet`` and add rank-``rank`` LoRA factors; returns the trainable factors."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    unet.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    factors: list[nn.Parameter] = []
    targets = lora_targets(unet)
    if not targets:
        raise ValueError("no attention / GEGLU Linear layers found to put LoRA on")
    for _, linear in targets:
        delta = LoRADelta(linear.out_features, linear.in_features, rank, generator)
        parametrize.register_parametrization(linear, "weight", delta)
        factors += [delta.down, delta.up]
    return factors


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every LoRA-parametrised weight replaced by W + up @ down.

    The module itself is left as it is (training can go on); the keys are those of the plain,
    un-parametrised network, so the result loads into the served model.
    """
    state = {}
    for key, value in module.state_dict().items():
        if ".parametrizations.weight." not in key:
            state[key] = value
    for name, sub in module.named_modules():
        if parametrize.is_parametrized(sub, "weight"):
            with torch.no_grad():
                state[f"{name}.weight" if name else "weight"] = sub.weight.detach().clone()
    return state


def merge_lora(unet: nn.Module) -> int:
    """Replace every LoRA parametrisation by its merged weight; returns how many were merged."""
    merged = 0
    for _, module in list(unet.named_modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            merged += 1
    return merged
