"""Rectified-flow samplers as pure functions over a velocity function.

Conventions (official FlowIE): time runs from noise (t = 999, x = x_T) to data (t = 0);
``x_t = t/999 * x_T + (1 - t/999) * x_0``; the network predicts ``v ~ x_0 - x_T``, so an
Euler step towards the data is ``x <- x + v * dt``. Timesteps reach the network as
unnormalised float32 values (999., 799., ...).

A velocity function has the signature ``velocity(x_t [B,4,h,w], t [B] float32) -> v``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OnStep = Callable[[int, int], None]


def euler_timesteps(steps: int, t_start: float = 999.0) -> list[float]:
    """N equal steps from t_start: 999, 999 - 1000/N, ... (N = 5 gives 999, 799, 599, 399, 199)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    stride = (t_start + 1.0) / steps
    return [t_start - i * stride for i in range(steps)]


def default_midpoint_index(steps: int) -> int:
    """Mid-point index for N steps: the official face model uses k = 3 of 5 (t = 399)."""
    return min(steps - 1, max(0, round(0.6 * steps)))


def _t(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), dtype=torch.float32, device=x.device)


def euler(velocity: Velocity, x_T: torch.Tensor, timesteps: Sequence[float], dt: float | None = None,
          on_step: OnStep | None = None) -> torch.Tensor:
    """Plain Euler over ``timesteps`` with step ``dt`` (default 1/len(timesteps)); returns x after the last step."""
    dt = 1.0 / len(timesteps) if dt is None else dt
    x = x_T
    for i, t in enumerate(timesteps):
        x = x + velocity(x, _t(x, t)) * dt
        if on_step:
            on_step(i + 1, len(timesteps))
    return x


def mean_value(velocity: Velocity, x_T: torch.Tensor, timesteps: Sequence[float], midpoint_index: int,
               dt: float | None = None, on_step: OnStep | None = None) -> torch.Tensor:
    """FlowIE's mean-value sampling: Euler until ``midpoint_index`` k, then return ``x_T + v_k``.

    By Lagrange's mean value theorem the velocity at a well-chosen interior point equals the
    average velocity of the whole path, so one jump from x_T lands on x_0. k + 1 evaluations
    (4 for the official 999, 799, 599, 399, 199 with k = 3).
    """
    if not 0 <= midpoint_index < len(timesteps):
        raise ValueError(f"midpoint_index {midpoint_index} outside 0..{len(timesteps) - 1}")
    dt = 1.0 / len(timesteps) if dt is None else dt
    x = x_T
    for i, t in enumerate(timesteps[: midpoint_index + 1]):
        v = velocity(x, _t(x, t))
        if on_step:
            on_step(i + 1, midpoint_index + 1)
        if i == midpoint_index:
            return x_T + v
        x = x + v * dt
    raise AssertionError("unreachable")


def one_step(velocity: Velocity, x_T: torch.Tensor, t: float, output: str = "x_plus_v",
             on_step: OnStep | None = None) -> torch.Tensor:
    """One evaluation at time ``t`` on x_T.

    ``output="x_plus_v"``: one full Euler step to the data, ``x_T + v`` (rectified-flow one-step).
    ``output="v"``: the official BSR recipe (t = 400), which decodes the network output itself.
    """
    v = velocity(x_T, _t(x_T, t))
    if on_step:
        on_step(1, 1)
    if output == "v":
        return v
    if output == "x_plus_v":
        return x_T + v
    raise ValueError(f"one_step output must be 'v' or 'x_plus_v', got {output!r}")


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I), one CPU generator per image so a seed gives the same noise on any device.

    ``torch.manual_seed(s); torch.randn(shape)`` equals the row of this function for seed s
    when the batch is 1, which is how the official fixtures draw noise.
    """
    rows = []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        rows.append(torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float32))
    return torch.cat(rows).to(device=device, dtype=dtype)
