"""The Stable Diffusion VAE halves FlowIE uses, built from diffusers' Encoder/Decoder blocks.

`CondEncoder`: image [0,1] -> condition latent (posterior mode, optionally x scale factor).
`VaeDecoder`:  scaled latent -> image in [0,1] (unclamped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import nn


@dataclass(frozen=True)
class VaeConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    # GroupNorm groups (official: 32). With 32 channels, 32 groups is one channel per group, an
    # instance norm that erases absolute contrast; small models (the demo) use fewer groups.
    norm_groups: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VaeConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "ch_mult" in known:
            known["ch_mult"] = tuple(known["ch_mult"])
        return cls(**known)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)


class CondEncoder(nn.Module):
    """restored [B,3,H,W] in [0,1] -> c_latent [B,4,H/8,W/8].

    ``latent_scale`` is the factor the mode is multiplied by: the scale factor (0.18215) for
    the official BFR model's cond_encoder, 1.0 for the official BSR recipe (first-stage
    encoder, unscaled).
    """

    def __init__(self, cfg: VaeConfig, latent_scale: float):
        super().__init__()
        self.cfg = cfg
        self.latent_scale = float(latent_scale)
        self.encoder = Encoder(
            in_channels=cfg.in_channels,
            out_channels=cfg.z_channels,
            down_block_types=("DownEncoderBlock2D",) * len(cfg.ch_mult),
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.num_res_blocks,
            norm_num_groups=cfg.norm_groups,
            act_fn="silu",
            double_z=True,
        )
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)

    def forward(self, restored: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(restored * 2 - 1))
        mode = moments[:, : self.cfg.embed_dim]  # posterior mean; the log-variance half is unused
        return mode * self.latent_scale if self.latent_scale != 1.0 else mode

    def moments(self, restored: torch.Tensor) -> torch.Tensor:
        """Both posterior halves [B, 2*embed_dim, h, w] (mean, logvar); for checks and training."""
        return self.quant_conv(self.encoder(restored * 2 - 1))


class VaeDecoder(nn.Module):
    """latent [B,4,h,w] (scaled, as the sampler produces it) -> image [B,3,8h,8w] in [0,1]."""

    def __init__(self, cfg: VaeConfig, scale_factor: float):
        super().__init__()
        self.cfg = cfg
        self.scale_factor = float(scale_factor)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(
            in_channels=cfg.z_channels,
            out_channels=cfg.out_ch,
            up_block_types=("UpDecoderBlock2D",) * len(cfg.ch_mult),
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.num_res_blocks,
            norm_num_groups=cfg.norm_groups,
            act_fn="silu",
        )

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image in [-1, 1] (the ldm ``decode``)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        # The official code multiplies by 1/scale_factor rather than dividing.
        return (self.decode_raw(latent * (1.0 / self.scale_factor)) + 1) / 2
