"""The flow network: an SD2.1-style UNet plus FlowIE's latent-hint ControlNet.

Both are assembled from diffusers' blocks (UNet2DConditionModel, its down/mid blocks), so
speed-ups that land in diffusers (SDPA, fused kernels) reach us too. FlowIE's ControlNet
differs from diffusers' ControlNetModel: it has no pixel-space hint embedding; its first
conv takes concat(x_t, c_latent) (8 channels).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """The official ``unet_config``/``control_stage_config`` params (SD2.1-base sizes by default)."""

    in_channels: int = 4
    out_channels: int = 4
    hint_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    num_heads: int = -1
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear_in_transformer: bool = True
    # GroupNorm groups of every block (official: 32); fewer for narrow models, as for the VAE.
    norm_groups: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("channel_mult", "attention_resolutions"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def has_attention(self) -> tuple[bool, ...]:
        # Level i works at downsampling factor 2**i; attention where that factor is listed.
        return tuple(2**i in self.attention_resolutions for i in range(len(self.channel_mult)))

    @property
    def heads(self) -> tuple[int, ...]:
        if self.num_head_channels > 0:
            return tuple(c // self.num_head_channels for c in self.block_out_channels)
        return (self.num_heads,) * len(self.channel_mult)

    @property
    def num_controls(self) -> int:
        """Residuals the ControlNet emits: input conv + (res blocks + downsampler) per level + middle."""
        levels = len(self.channel_mult)
        return 1 + levels * self.num_res_blocks + (levels - 1) + 1


def build_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.has_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.has_attention))
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.num_res_blocks,
        # diffusers' historical naming: for SD2 this argument holds the number of heads per level.
        attention_head_dim=cfg.heads,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth,
        use_linear_projection=cfg.use_linear_in_transformer,
        norm_num_groups=cfg.norm_groups,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


class FlowControlNet(nn.Module):
    """(x_t, hint, t, context) -> the residuals added to the UNet skips and middle.

    Parameter names mirror diffusers' ControlNetModel (conv_in, down_blocks,
    controlnet_down_blocks, mid_block, controlnet_mid_block).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c0 = cfg.model_channels
        temb = 4 * c0
        self.cfg = cfg
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.hint_channels, c0, 3, padding=1)
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c0, temb)
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c0, c0, 1)])
        channels = cfg.block_out_channels
        prev = c0
        for i, out_ch in enumerate(channels):
            last = i == len(channels) - 1
            self.down_blocks.append(
                get_down_block(
                    "CrossAttnDownBlock2D" if cfg.has_attention[i] else "DownBlock2D",
                    num_layers=cfg.num_res_blocks,
                    transformer_layers_per_block=cfg.transformer_depth,
                    in_channels=prev,
                    out_channels=out_ch,
                    temb_channels=temb,
                    add_downsample=not last,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=cfg.norm_groups,
                    cross_attention_dim=cfg.context_dim,
                    num_attention_heads=cfg.heads[i],
                    attention_head_dim=out_ch // cfg.heads[i],
                    downsample_padding=1,
                    use_linear_projection=cfg.use_linear_in_transformer,
                )
            )
            for _ in range(cfg.num_res_blocks + (0 if last else 1)):
                self.controlnet_down_blocks.append(nn.Conv2d(out_ch, out_ch, 1))
            prev = out_ch
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=channels[-1],
            temb_channels=temb,
            transformer_layers_per_block=cfg.transformer_depth,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            resnet_groups=cfg.norm_groups,
            cross_attention_dim=cfg.context_dim,
            num_attention_heads=cfg.heads[-1],
            use_linear_projection=cfg.use_linear_in_transformer,
        )
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], 1)

    def forward(self, x_t, hint, t, context) -> list[torch.Tensor]:
        emb = self.time_embedding(self.time_proj(t).to(x_t.dtype))
        h = self.conv_in(torch.cat([x_t, hint], dim=1))
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
        h = self.mid_block(h, emb, encoder_hidden_states=context)
        outs = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        outs.append(self.controlnet_mid_block(h))
        return outs


class FlowUNet(nn.Module):
    """x_t [B,4,h,w], t [B] (0..999, 999 = noise), c_latent [B,4,h,w], context [B,T,C] -> v [B,4,h,w].

    The UNet's own forward is written out here (over diffusers' blocks, in diffusers' order of
    operations) instead of calling ``UNet2DConditionModel.forward``, because of what the official
    ControlledUnetModel implies: the ControlNet's residuals are only used by the UNet's up path,
    so the ControlNet and the UNet's down path and middle are independent. With
    ``control_stream`` set and the tensors on CUDA, the ControlNet runs on a second CUDA stream
    while the down path runs on the current one (batch 1 leaves most of a large GPU idle; a
    CUDA graph captures the fork and the join). Every operation is the same either way, so the
    numbers are too.
    """

    def __init__(self, cfg: UNetConfig, control_scales: list[float] | None = None):
        super().__init__()
        self.cfg = cfg
        self.unet = build_unet(cfg)
        self.controlnet = FlowControlNet(cfg)
        scales = control_scales if control_scales is not None else [1.0] * cfg.num_controls
        if len(scales) != cfg.num_controls:
            raise ValueError(f"control_scales needs {cfg.num_controls} values, got {len(scales)}")
        # Kept as a Python tuple so the all-ones case costs nothing and exports cleanly.
        self.control_scales = tuple(float(s) for s in scales)
        # The torch engine's ``control_stream`` option (engines.EngineConfig); inert off CUDA.
        self.control_stream = False

    def controls(self, x_t, t, c_latent, context) -> list[torch.Tensor]:
        outs = self.controlnet(x_t, c_latent, t, context)
        return [o if s == 1.0 else o * s for o, s in zip(outs, self.control_scales, strict=True)]

    def forward(self, x_t, t, c_latent, context) -> torch.Tensor:
        side = self._side_stream(x_t)
        if side is None:
            ctrl = self.controls(x_t, t, c_latent, context)
            h, skips, emb = self._unet_down(x_t, t, context)
        else:
            main = torch.cuda.current_stream(x_t.device)
            # Fork: the side stream starts once the inputs are written. Joining at the end also
            # keeps the caching allocator safe: the residuals are allocated on the side stream and
            # read on this one, and the side stream's next use (the next call) begins with this
            # wait, after every read of this call.
            side.wait_stream(main)
            with torch.cuda.stream(side):
                ctrl = self.controls(x_t, t, c_latent, context)
            h, skips, emb = self._unet_down(x_t, t, context)
            main.wait_stream(side)
        return self._unet_up(h, skips, emb, context, ctrl)

    def _side_stream(self, x_t: torch.Tensor):
        if not (self.control_stream and x_t.is_cuda) or torch.compiler.is_compiling():
            return None  # compiled graphs and exports see the one-stream order
        return _control_side_stream(x_t.device)

    def _unet_down(self, x_t, t, context):
        """UNet2DConditionModel.forward steps 1-4 (time, conv_in, down blocks, middle) for our configs:
        no class/added embeddings, no masks, no adapters."""
        unet = self.unet
        emb = unet.time_embedding(unet.time_proj(t).to(x_t.dtype))
        h = unet.conv_in(x_t)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips += res
        h = unet.mid_block(h, emb, encoder_hidden_states=context)
        return h, skips, emb

    def _unet_up(self, h, skips, emb, context, ctrl):
        """The control residuals added (skips, then middle) and UNet2DConditionModel.forward steps 5-6."""
        unet = self.unet
        # diffusers passes the up blocks an explicit output size when the latent is not a multiple
        # of the overall upsampling factor, so that odd sizes come back to the skips' sizes.
        odd = any(d % 2**unet.num_upsamplers for d in skips[0].shape[-2:])  # skips[0]: the input's size
        skips = tuple(s + c for s, c in zip(skips, ctrl[:-1], strict=True))
        h = h + ctrl[-1]
        for i, block in enumerate(unet.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if odd and i < len(unet.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context,
                          upsample_size=size)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_SIDE_STREAMS_LOCK = threading.Lock()


def _control_side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every FlowUNet of the process (kept off the module, which is
    deep-copied and exported)."""
    key = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    with _SIDE_STREAMS_LOCK:
        if key not in _SIDE_STREAMS:
            _SIDE_STREAMS[key] = torch.cuda.Stream(key)
        return _SIDE_STREAMS[key]
