"""The training objectives of the FlowIE stack (as the official training uses them).

Shapes: images [B,3,H,W] in [0,1]; latents [B,4,h,w]; time ``t`` in (0,1] with 1 = noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The network sees t * T_SCALE, unnormalised (official: timesteps 1..999 as float32).
T_SCALE = 999.0


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Losses are taken in float32 also under bf16 autocast (the networks' outputs are bf16 there).
    return (pred.float() - target.float()).abs().mean()


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, window: int = 7) -> torch.Tensor:
    """1 - mean SSIM with a uniform ``window`` (cheap, differentiable; for the optional SSIM term)."""
    c1, c2 = 0.01**2, 0.03**2
    pred, target = pred.float(), target.float()
    pool = lambda x: F.avg_pool2d(x, window, stride=1)  # noqa: E731
    mu_p, mu_t = pool(pred), pool(target)
    var_p = pool(pred * pred) - mu_p**2
    var_t = pool(target * target) - mu_t**2
    cov = pool(pred * target) - mu_p * mu_t
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return 1 - ssim_map.mean()


def split_moments(moments: torch.Tensor, embed_dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output [B,2E,h,w] -> (mean, logvar) with the logvar clamped like ldm's DiagonalGaussian."""
    return moments[:, :embed_dim], moments[:, embed_dim:].clamp(-30.0, 20.0)


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    # Drawn on the CPU (where the seeded generator lives), so a seed means the same noise on any device.
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over the latent and averaged over the batch (ldm)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()


def rectified_flow_inputs(x_0: torch.Tensor, x_T: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = t x_T + (1 - t) x_0 and the velocity target v = x_0 - x_T (t in (0,1], shape [B])."""
    tb = t.view(-1, 1, 1, 1)
    return tb * x_T + (1.0 - tb) * x_0, x_0 - x_T


def sample_time(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U(0, 1], drawn so that t * 999 lies in [1, 999]: t = 1/999 + u (1 - 1/999), u ~ U[0, 1)."""
    u = torch.rand(batch, generator=generator)
    lo = 1.0 / T_SCALE
    return lo + u * (1.0 - lo)


def flow_loss(velocity_fn, x_0: torch.Tensor, x_T: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MSE between ``velocity_fn(x_t, t * 999)`` and x_0 - x_T."""
    x_t, target = rectified_flow_inputs(x_0, x_T, t)
    v = velocity_fn(x_t, t * T_SCALE)
    return F.mse_loss(v.float(), target.float())
