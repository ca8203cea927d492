"""Diffusion samplers against analytic answers: a network that knows x_0 exactly is denoised to x_0.

For a fixed x_0, the ideal eps-network answers ``(x - sqrt(abar_t) x_0) / sqrt(1 - abar_t)`` and
the ideal v-network ``sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``; every sampler then predicts x_0
at every step and must end on it, whatever the noise (abar from the DDPM definition, computed
here independently in float64).
"""

from __future__ import annotations

import math

import pytest
import torch

from flowie import diffusion


def abar(t: int) -> float:
    start, end, n = 0.00085 ** 0.5, 0.012 ** 0.5, 1000
    return math.prod(1 - (start + (end - start) * k / (n - 1)) ** 2 for k in range(t + 1))


def ideal_model(x0: torch.Tensor, prediction: str):
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar(int(t[0]))
        eps = (x.double() - math.sqrt(a) * x0.double()) / math.sqrt(1 - a)
        out = eps if prediction == "eps" else math.sqrt(a) * eps - math.sqrt(1 - a) * x0.double()
        return out.float()
    return model


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", 10), ("ddpm", 50), ("ddim", 10), ("dpm_solver", 10),
                                            ("dpm_solver", 20)])
def test_an_ideal_network_is_denoised_to_its_x0(sampler, steps, prediction):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    x_T = torch.randn(2, 4, 8, 8, generator=gen)
    model = ideal_model(x0, prediction)
    if sampler == "ddpm":
        out = diffusion.ddpm(model, x_T, steps, diffusion.SeededNoise([1, 2], x_T.shape), prediction)
    else:
        out = getattr(diffusion, sampler)(model, x_T, steps, prediction)
    assert float((out - x0).abs().max()) < 2e-3


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_each_sampler_calls_the_network_once_per_step_at_the_respaced_timesteps(sampler):
    seen = []
    getattr(diffusion, sampler)(lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x),
                                torch.zeros(1, 4, 8, 8), 4)
    assert seen == [999, 666, 333, 0]


def test_seeded_noise_replays_the_official_draws():
    """torch.manual_seed(s); randn(x_T); randn_like per step (README section 9) == one generator per image."""
    shape = (1, 4, 6, 6)
    torch.manual_seed(231)
    official = [torch.randn(shape) for _ in range(4)]
    seeded = diffusion.SeededNoise([231], shape)
    ours = [seeded.draw()] + [seeded(i) for i in range(3)]
    for a, b in zip(official, ours, strict=True):
        assert torch.equal(a, b)


def test_given_noise_refuses_to_run_out():
    noise = diffusion.given_noise(torch.zeros(2, 1, 4, 2, 2))
    assert noise(1).shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match="2 steps"):
        noise(2)
