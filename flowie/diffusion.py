"""Diffusion samplers (DiffBIR v1) as pure functions over a model-output function.

Conventions (official DiffBIR v1 / ldm DDPM): time runs from noise (t = 999) to data (t = 0)
over 1000 training steps; ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; the network
predicts eps (``prediction="eps"``) or v (``"v"``, ``v = sqrt(abar) eps - sqrt(1 - abar) x_0``).
The network gets the original timestep t (999, 888, ...), never the respaced index; it casts
t to float in its sinusoidal embedding, so the float32 value t. gives the same embedding.

Tables are float64 numpy arrays, gathered per step and cast to float32 before float32
arithmetic, as the official ``SpacedSampler`` does, so given the same noise ``ddpm``
reproduces it bit for bit.

A model function has the signature ``model(x_t [B,4,h,w], t [B] float32) -> output``;
a noise function ``noise(i) -> [B,4,h,w]`` gives the tensor drawn after network call i.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]
OnStep = Callable[[int, int], None]

SAMPLERS = ("ddpm", "ddim", "dpm_solver")


@dataclass(frozen=True)
class Schedule:
    """The training schedule: ``betas = linspace(sqrt(start), sqrt(end), n, float64) ** 2``."""

    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012

    def alphas_cumprod(self) -> np.ndarray:
        """abar_t for t = 0 .. n-1, float64 (torch's linspace, as ldm's make_beta_schedule)."""
        betas = (torch.linspace(self.linear_start ** 0.5, self.linear_end ** 0.5, self.num_timesteps,
                                dtype=torch.float64) ** 2).numpy()
        return np.cumprod(1.0 - betas, axis=0)

    def to_dict(self) -> dict:
        return {"num_timesteps": self.num_timesteps, "linear_start": self.linear_start,
                "linear_end": self.linear_end, "beta_schedule": "linear"}

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        if data.get("beta_schedule", "linear") != "linear":
            raise ValueError(f"only the linear beta schedule is supported, got {data.get('beta_schedule')!r}")
        return cls(int(data.get("num_timesteps", 1000)), float(data.get("linear_start", 0.00085)),
                   float(data.get("linear_end", 0.012)))


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The used timesteps, ascending: guided-diffusion respacing with one section.

    ``round(k * (n - 1) / (steps - 1))`` accumulated in float, Python's round (half to even):
    10 of 1000 gives 0, 111, ..., 999; one step gives only t = 0 (the official quirk).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    stride = 1 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    taken, cur = set(), 0.0
    for _ in range(steps):
        taken.add(round(cur))
        cur += stride
    return sorted(taken)


@dataclass(frozen=True)
class SpacedTables:
    """float64 tables of a respaced schedule, indexed by the spaced index i (ascending t)."""

    timesteps: np.ndarray  # int64 [N]
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray


def spaced_tables(schedule: Schedule, steps: int) -> SpacedTables:
    """``SpacedSampler.make_schedule(steps)``: betas of the kept timesteps, then the DDPM tables."""
    abar_full = schedule.alphas_cumprod()
    used = set(space_timesteps(schedule.num_timesteps, steps))
    betas_list, last = [], 1.0
    for t, abar in enumerate(abar_full):
        if t in used:
            betas_list.append(1 - abar / last)
            last = abar
    betas = np.array(betas_list, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas, axis=0)
    abar_prev = np.append(1.0, abar[:-1])
    variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    return SpacedTables(
        timesteps=np.array(sorted(used), dtype=np.int64),
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1),
        posterior_variance=variance,
        posterior_log_variance_clipped=np.log(np.append(variance[1], variance[1:])) if len(variance) > 1
        else np.log(variance),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )


def _gather(table: np.ndarray, index: int, like: torch.Tensor) -> torch.Tensor:
    # float64 entry -> float32 scalar, broadcast (the official _extract_into_tensor)
    return torch.tensor(table[index], dtype=torch.float64).float().to(like.device)


def _timestep(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)


def eps_from_output(output: torch.Tensor, x: torch.Tensor, t: int, prediction: str, schedule: Schedule
                    ) -> torch.Tensor:
    """The network output as eps. v: ``sqrt(abar_t) v + sqrt(1 - abar_t) x`` with the model's float32 buffers."""
    if prediction == "eps":
        return output
    if prediction == "v":
        abar = schedule.alphas_cumprod()
        a = torch.tensor(np.sqrt(abar)[t], dtype=torch.float64).float().to(x.device)
        s = torch.tensor(np.sqrt(1.0 - abar)[t], dtype=torch.float64).float().to(x.device)
        return a * output + s * x
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def ddpm(model: ModelFn, x_T: torch.Tensor, steps: int, noise: NoiseFn, prediction: str = "eps",
         schedule: Schedule = Schedule(), on_step: OnStep | None = None,
         trace: Callable[[int, dict], None] | None = None) -> torch.Tensor:
    """DiffBIR's ``SpacedSampler.sample``: respaced ancestral DDPM, fixed_small variance.

    Per step (index i descending, t = timesteps[i]): eps at (x, t); ``pred_x0 = sr[i] x - srm1[i] eps``;
    ``mean = c1[i] pred_x0 + c2[i] x``; then ``noise(step)`` (drawn at every step, the last
    included, where it is multiplied by 0) and ``x = mean + (mask * sqrt(var[i])) * noise``.
    ``trace(step, tensors)`` sees every intermediate (for checks).
    """
    tables = spaced_tables(schedule, steps)
    x = x_T
    for step, index in enumerate(reversed(range(len(tables.timesteps)))):
        t = int(tables.timesteps[index])
        eps = eps_from_output(model(x, _timestep(x, t)), x, t, prediction, schedule)
        pred_x0 = _gather(tables.sqrt_recip_alphas_cumprod, index, x) * x \
            - _gather(tables.sqrt_recipm1_alphas_cumprod, index, x) * eps
        mean = _gather(tables.posterior_mean_coef1, index, x) * pred_x0 \
            + _gather(tables.posterior_mean_coef2, index, x) * x
        drawn = noise(step)
        mask = torch.tensor(float(index != 0), dtype=torch.float32, device=x.device)
        x_out = mean + (mask * torch.sqrt(_gather(tables.posterior_variance, index, x))) * drawn
        if trace:
            trace(step, {"x_in": x, "eps": eps, "pred_x0": pred_x0, "mean": mean, "noise": drawn, "x_out": x_out})
        x = x_out
        if on_step:
            on_step(step + 1, steps)
    return x


def _alphas_sigmas(schedule: Schedule, timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    abar = schedule.alphas_cumprod()[np.asarray(timesteps)]
    return np.sqrt(abar), np.sqrt(1.0 - abar)


def _x0_from_output(output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction: str
                    ) -> torch.Tensor:
    if prediction == "eps":
        return (x - sigma * output) / alpha
    if prediction == "v":
        return alpha * x - sigma * output
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def ddim(model: ModelFn, x_T: torch.Tensor, steps: int, prediction: str = "eps", schedule: Schedule = Schedule(),
         on_step: OnStep | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) over the respaced timesteps (as ``ddpm``), ending on x_0.

    ``x_prev = alpha_prev x0 + sigma_prev eps``, alpha = sqrt(abar), sigma = sqrt(1 - abar); after the
    last timestep (t = 0 for 2+ steps) the prediction of x_0 is returned. One network call per step.
    """
    ts = space_timesteps(schedule.num_timesteps, steps)[::-1]
    alphas, sigmas = _alphas_sigmas(schedule, ts)
    x = x_T
    for i, t in enumerate(ts):
        a, s = float(alphas[i]), float(sigmas[i])
        x0 = _x0_from_output(model(x, _timestep(x, t)), x, a, s, prediction)
        if i == len(ts) - 1:
            x = x0
        else:
            eps = (x - a * x0) / s
            x = float(alphas[i + 1]) * x0 + float(sigmas[i + 1]) * eps
        if on_step:
            on_step(i + 1, steps)
    return x


def dpm_solver(model: ModelFn, x_T: torch.Tensor, steps: int, prediction: str = "eps",
               schedule: Schedule = Schedule(), on_step: OnStep | None = None) -> torch.Tensor:
    """DPM-Solver++ 2M (Lu et al. 2022, multistep, data prediction) over the respaced timesteps.

    lambda = log(alpha / sigma); step i -> i+1 with h = lambda_{i+1} - lambda_i:
    ``x = (sigma_{i+1} / sigma_i) x - alpha_{i+1} (exp(-h) - 1) D``, D = x0_i for the first step,
    else ``(1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}``, r = h_{i-1} / h. The last evaluation (t = 0)
    jumps to its x_0 prediction (sigma = 0, first order). One network call per step.
    """
    ts = space_timesteps(schedule.num_timesteps, steps)[::-1]
    alphas, sigmas = _alphas_sigmas(schedule, ts)
    lambdas = np.log(alphas) - np.log(sigmas)
    x = x_T
    prev_x0, prev_h = None, None
    for i, t in enumerate(ts):
        a, s = float(alphas[i]), float(sigmas[i])
        x0 = _x0_from_output(model(x, _timestep(x, t)), x, a, s, prediction)
        if i == len(ts) - 1:
            x = x0
        else:
            h = float(lambdas[i + 1] - lambdas[i])
            if prev_x0 is None:
                d = x0
            else:
                r = prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            x = (float(sigmas[i + 1]) / s) * x - float(alphas[i + 1]) * float(np.expm1(-h)) * d
            prev_x0, prev_h = x0, h
        if on_step:
            on_step(i + 1, steps)
    return x


class SeededNoise:
    """Noise from one CPU generator per image: x_T first, then one tensor per ddpm step.

    For one image this is the official ``torch.manual_seed(seed)`` followed by ``randn`` of x_T
    and a ``randn_like`` per step, so a seed replays the official CPU run; any device gets the same.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device="cpu"):
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        self.row_shape = (1, *shape[1:])
        self.device = device

    def draw(self) -> torch.Tensor:
        rows = [torch.randn(self.row_shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.cat(rows).to(self.device)

    def __call__(self, step: int) -> torch.Tensor:
        return self.draw()


def given_noise(step_noise: torch.Tensor, device="cpu") -> NoiseFn:
    """Replay per-step noise [steps, B, 4, h, w] (the fixture's layout): step i uses row i."""
    def noise(step: int) -> torch.Tensor:
        if step >= step_noise.shape[0]:
            raise ValueError(f"step noise has {step_noise.shape[0]} steps; step {step + 1} needs more")
        return step_noise[step].to(device, torch.float32)
    return noise
