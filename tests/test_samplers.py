"""Sampler maths on analytic velocity fields (no networks)."""

from __future__ import annotations

import pytest
import torch

from flowie import samplers


def constant_field(x_0: torch.Tensor, x_T: torch.Tensor):
    """The exact rectified-flow velocity of a straight path: v = x_0 - x_T everywhere."""
    return lambda x, t: (x_0 - x_T).expand_as(x)


@pytest.fixture
def endpoints():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)


def test_official_timesteps():
    assert samplers.euler_timesteps(5) == [999.0, 799.0, 599.0, 399.0, 199.0]
    assert samplers.euler_timesteps(1) == [999.0]
    assert samplers.default_midpoint_index(5) == 3


@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_euler_on_a_straight_path_lands_on_the_data(endpoints, steps):
    x_0, x_T = endpoints
    out = samplers.euler(constant_field(x_0, x_T), x_T, samplers.euler_timesteps(steps))
    torch.testing.assert_close(out, x_0, rtol=0, atol=1e-5)


def test_euler_intermediate_points_lie_on_the_line(endpoints):
    x_0, x_T = endpoints
    seen = []
    field = constant_field(x_0, x_T)

    def recording(x, t):
        seen.append((x.clone(), float(t[0])))
        return field(x, t)

    samplers.euler(recording, x_T, samplers.euler_timesteps(5))
    for x, t in seen:
        expected = x_T * ((t + 1) / 1000) + x_0 * (1 - (t + 1) / 1000)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


def test_mean_value_returns_x_T_plus_v_at_the_midpoint(endpoints):
    x_0, x_T = endpoints
    calls = []

    def field(x, t):
        calls.append(float(t[0]))
        return torch.full_like(x, float(t[0]))  # v depends on t: identifies which step was used

    out = samplers.mean_value(field, x_T, [999.0, 799.0, 599.0, 399.0, 199.0], midpoint_index=3)
    assert calls == [999.0, 799.0, 599.0, 399.0]  # 4 evaluations, the 5th never runs
    torch.testing.assert_close(out, x_T + 399.0)


def test_mean_value_on_a_straight_path_is_exact(endpoints):
    x_0, x_T = endpoints
    out = samplers.mean_value(constant_field(x_0, x_T), x_T, samplers.euler_timesteps(5), 3)
    torch.testing.assert_close(out, x_0, rtol=0, atol=1e-5)


def test_one_step_outputs(endpoints):
    x_0, x_T = endpoints
    field = constant_field(x_0, x_T)
    torch.testing.assert_close(samplers.one_step(field, x_T, 999.0, "x_plus_v"), x_0, rtol=0, atol=1e-5)
    torch.testing.assert_close(samplers.one_step(field, x_T, 400.0, "v"), x_0 - x_T)
    with pytest.raises(ValueError):
        samplers.one_step(field, x_T, 400.0, "bogus")


def test_timesteps_reach_the_network_unnormalised_float32(endpoints):
    _, x_T = endpoints
    seen = []
    samplers.one_step(lambda x, t: seen.append(t) or torch.zeros_like(x), x_T, 400.0, "v")
    assert seen[0].dtype == torch.float32 and seen[0].shape == (2,) and float(seen[0][0]) == 400.0


def test_seeded_noise_is_reproducible_and_per_image():
    a = samplers.initial_noise((2, 4, 8, 8), [1, 2])
    b = samplers.initial_noise((2, 4, 8, 8), [1, 2])
    c = samplers.initial_noise((1, 4, 8, 8), [2])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[1:], c)  # an image's noise does not depend on its batch mates
    torch.manual_seed(1)
    torch.testing.assert_close(a[:1], torch.randn(1, 4, 8, 8))


def test_bad_midpoint_is_refused(endpoints):
    _, x_T = endpoints
    with pytest.raises(ValueError):
        samplers.mean_value(lambda x, t: x, x_T, [999.0, 499.0], midpoint_index=2)
