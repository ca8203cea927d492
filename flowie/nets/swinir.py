"""SwinIR, the DiffBIR variant FlowIE uses as its restoration stage.

Parameter names follow the official checkpoint (``preprocess_model.*`` with the prefix
removed), so converted weights load with ``strict=True``. The official details that matter
for exact parity are kept and marked: the window shift is decided from the *configured*
``img_size``; ``conv_before_upsample`` uses LeakyReLU's default slope 0.01 while the
up-sampler uses 0.2; the output is not clamped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet-ish RGB mean the official SwinIR subtracts (only for 3-channel input).
RGB_MEAN = (0.4488, 0.4371, 0.4040)


@dataclass(frozen=True)
class SwinIRConfig:
    img_size: int = 64  # feature-map size after pixel-unshuffle (512 px / 8)
    in_chans: int = 3
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    sf: int = 8
    img_range: float = 1.0
    unshuffle_scale: int = 8
    num_feat: int = 64
    upsampler: str = "nearest+conv"
    resi_connection: str = "1conv"
    # Not in the official SwinIR: add the (padded) input to the output, so the network learns only
    # the correction. Official checkpoints leave it off; the small demo model turns it on, because a
    # network this small cannot first learn to reproduce the image through pixel-unshuffle x8.
    input_skip: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SwinIRConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "extra"}
        for key in ("depths", "num_heads"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, ws * ws, C] in row-major window order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """[B * nW, ws * ws, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """[ws*ws, ws*ws] index into the (2ws-1)^2 bias table, as in the Swin paper."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def shifted_window_mask(h: int, w: int, ws: int, shift: int, device=None) -> torch.Tensor:
    """[nW, ws*ws, ws*ws] additive mask: -100 between tokens of different shift regions."""
    region = torch.zeros(1, h, w, 1, device=device)
    label = 0
    bounds = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for hs in bounds:
        for wsl in bounds:
            region[:, hs, wsl, :] = label
            label += 1
    windows = window_partition(region, ws).squeeze(-1)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.ne(0).to(torch.float32) * -100.0


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Deterministic; recomputed here instead of trusting the checkpoint's copy.
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B*nW, N, C]; mask: [nW, N, N] additive or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).to(q.dtype)  # [heads, N, N]
        if mask is None:
            attn_bias = bias.unsqueeze(0)
        else:
            nw = mask.shape[0]
            # [B, nW, heads, N, N] -> [B*nW, heads, N, N]
            attn_bias = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).unsqueeze(0)
            attn_bias = attn_bias.expand(bw // nw, -1, -1, -1, -1).reshape(bw, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, img_size: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float):
        super().__init__()
        # Official rule: tiny configured sizes disable shifting and shrink the window.
        if img_size <= window_size:
            shift, window_size = 0, img_size
        self.img_size = img_size
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift > 0:
            mask = shifted_window_mask(img_size, img_size, window_size, shift)
            self.register_buffer("attn_mask", mask, persistent=False)
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        b, _, c = x.shape
        ws, s = self.window_size, self.shift
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
            if (h, w) == (self.img_size, self.img_size):
                mask = self.attn_mask
            else:
                mask = shifted_window_mask(h, w, ws, s, device=x.device)
        else:
            mask = None
        windows = self.attn(window_partition(x, ws), mask)
        x = window_reverse(windows, ws, h, w)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = shortcut + x.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class ResidualGroup(nn.Module):
    def __init__(self, dim, img_size, depth, num_heads, window_size, mlp_ratio):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, img_size, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio)
            for i in range(depth)
        )

    def forward(self, x, hw):
        for block in self.blocks:
            x = block(x, hw)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, a 3x3 conv, and a skip."""

    def __init__(self, dim, img_size, depth, num_heads, window_size, mlp_ratio):
        super().__init__()
        self.residual_group = ResidualGroup(dim, img_size, depth, num_heads, window_size, mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        b, _, c = x.shape
        y = self.residual_group(x, hw)
        y = self.conv(y.transpose(1, 2).reshape(b, c, h, w))
        return y.flatten(2).transpose(1, 2) + x


class PatchNorm(nn.Module):
    """The official patch_embed with patch size 1: just a LayerNorm (key ``patch_embed.norm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x)


class SwinIR(nn.Module):
    """lq [B,3,H,W] in [0,1] -> restored [B,3,H,W] (unclamped). H, W multiples of 64."""

    def __init__(self, cfg: SwinIRConfig):
        super().__init__()
        if cfg.upsampler != "nearest+conv" or cfg.resi_connection != "1conv":
            raise ValueError(
                f"only the DiffBIR SwinIR (upsampler 'nearest+conv', resi_connection '1conv') is supported, "
                f"got {cfg.upsampler!r}/{cfg.resi_connection!r}"
            )
        if cfg.sf != cfg.unshuffle_scale or cfg.sf != 8:
            raise ValueError("only pixel-unshuffle x8 followed by an x8 upsampler is supported (sf = unshuffle_scale = 8)")
        self.cfg = cfg
        dim = cfg.embed_dim
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Sequential(
            nn.PixelUnshuffle(cfg.unshuffle_scale),
            nn.Conv2d(cfg.in_chans * cfg.unshuffle_scale**2, dim, 3, 1, 1),
        )
        self.patch_embed = PatchNorm(dim)
        self.layers = nn.ModuleList(
            RSTB(dim, cfg.img_size, d, h, cfg.window_size, cfg.mlp_ratio) for d, h in zip(cfg.depths, cfg.num_heads, strict=True)
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1)
        # Official quirk: nn.LeakyReLU() here has the default slope 0.01, not 0.2.
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, cfg.num_feat, 3, 1, 1), nn.LeakyReLU(0.01))
        self.conv_up1 = nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1)
        self.conv_up3 = nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(cfg.num_feat, cfg.num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(cfg.num_feat, 3, 3, 1, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.patch_embed(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            tokens = layer(tokens, (h, w))
        tokens = self.norm(tokens)
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        h, w = lq.shape[-2:]
        multiple = self.cfg.window_size * self.cfg.unshuffle_scale
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        x = lq
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        padded = x
        x = (x - self.mean.to(x.dtype)) * self.cfg.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_before_upsample(x)
        for conv in (self.conv_up1, self.conv_up2, self.conv_up3):
            x = F.leaky_relu(conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), 0.2)
        x = self.conv_last(F.leaky_relu(self.conv_hr(x), 0.2)) / self.cfg.img_range
        x = x + (padded if self.cfg.input_skip else self.mean.to(x.dtype))
        return x[:, :, :h, :w]
