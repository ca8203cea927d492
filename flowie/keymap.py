"""Key mapping from the official (ldm / Lightning) checkpoint layout to our modules.

Our UNet, ControlNet and VAE are built from diffusers blocks, so their parameter names are
diffusers names. These functions produce *module-prefix* maps (official module path ->
our module path); a parameter key is mapped by its longest matching module prefix, the
parameter leaf (``weight``/``bias``) is kept.
"""

from __future__ import annotations

from flowie.nets.flow_unet import UNetConfig
from flowie.nets.vae import VaeConfig

RESBLOCK_INNER = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

VAE_RESNET_INNER = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}

VAE_ATTN_INNER = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# Pre-0.14 diffusers attention names, still found in some VAE files.
DIFFUSERS_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _resblock(src: str, dst: str, out: dict[str, str]) -> None:
    for a, b in RESBLOCK_INNER.items():
        out[f"{src}.{a}"] = f"{dst}.{b}"


def unet_encoder_map(cfg: UNetConfig) -> dict[str, str]:
    """The half shared by the UNet and the ControlNet: time embedding, input blocks, middle."""
    m: dict[str, str] = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
    }
    nrb = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    for i in range(levels):
        for j in range(nrb):
            n = 1 + i * (nrb + 1) + j
            _resblock(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", m)
            if cfg.has_attention[i]:
                m[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            n = 1 + i * (nrb + 1) + nrb
            m[f"input_blocks.{n}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    _resblock("middle_block.0", "mid_block.resnets.0", m)
    m["middle_block.1"] = "mid_block.attentions.0"
    _resblock("middle_block.2", "mid_block.resnets.1", m)
    return m


def unet_map(cfg: UNetConfig) -> dict[str, str]:
    """Official ``model.diffusion_model.*`` (prefix removed) -> diffusers UNet2DConditionModel."""
    m = unet_encoder_map(cfg)
    nrb = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    for i in range(levels):  # diffusers up_blocks.i works at official level (levels-1-i)
        attn = cfg.has_attention[levels - 1 - i]
        for j in range(nrb + 1):
            n = i * (nrb + 1) + j
            _resblock(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", m)
            if attn:
                m[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
            if j == nrb and i < levels - 1:
                m[f"output_blocks.{n}.{2 if attn else 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    m["out.0"] = "conv_norm_out"
    m["out.2"] = "conv_out"
    return m


def controlnet_map(cfg: UNetConfig) -> dict[str, str]:
    """Official ``control_model.*`` (prefix removed) -> FlowControlNet."""
    m = unet_encoder_map(cfg)
    for k in range(cfg.num_controls - 1):
        m[f"zero_convs.{k}.0"] = f"controlnet_down_blocks.{k}"
    m["middle_block_out.0"] = "controlnet_mid_block"
    return m


def _vae_mid(side: str, m: dict[str, str]) -> None:
    for blk, dst in (("block_1", "resnets.0"), ("block_2", "resnets.1")):
        for a, b in VAE_RESNET_INNER.items():
            m[f"{side}.mid.{blk}.{a}"] = f"{side}.mid_block.{dst}.{b}"
    for a, b in VAE_ATTN_INNER.items():
        m[f"{side}.mid.attn_1.{a}"] = f"{side}.mid_block.attentions.0.{b}"
    m[f"{side}.norm_out"] = f"{side}.conv_norm_out"
    m[f"{side}.conv_in"] = f"{side}.conv_in"
    m[f"{side}.conv_out"] = f"{side}.conv_out"


def vae_encoder_map(cfg: VaeConfig) -> dict[str, str]:
    """Official ldm ``encoder.*`` / ``quant_conv`` -> diffusers Encoder (+ quant_conv)."""
    m: dict[str, str] = {"quant_conv": "quant_conv"}
    levels = len(cfg.ch_mult)
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            for a, b in VAE_RESNET_INNER.items():
                m[f"encoder.down.{i}.block.{j}.{a}"] = f"encoder.down_blocks.{i}.resnets.{j}.{b}"
        if i < levels - 1:
            m[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
    _vae_mid("encoder", m)
    return m


def vae_decoder_map(cfg: VaeConfig) -> dict[str, str]:
    """Official ldm ``decoder.*`` / ``post_quant_conv`` -> diffusers Decoder (+ post_quant_conv)."""
    m: dict[str, str] = {"post_quant_conv": "post_quant_conv"}
    levels = len(cfg.ch_mult)
    for k in range(levels):  # ldm decoder.up.k <-> diffusers up_blocks.(levels-1-k)
        i = levels - 1 - k
        for j in range(cfg.num_res_blocks + 1):
            for a, b in VAE_RESNET_INNER.items():
                m[f"decoder.up.{k}.block.{j}.{a}"] = f"decoder.up_blocks.{i}.resnets.{j}.{b}"
        if k > 0:
            m[f"decoder.up.{k}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    _vae_mid("decoder", m)
    return m


def map_key(key: str, prefix_map: dict[str, str]) -> str | None:
    """Map one parameter key by its longest module prefix in ``prefix_map``; None if unmapped."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefix_map:
            return ".".join([prefix_map[head], *parts[cut:]])
    return None


def diffusers_vae_key(key: str) -> str:
    """Normalise a diffusers-named VAE key (old attention names -> current ones)."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in DIFFUSERS_OLD_ATTN:
        return ".".join([*parts[:-2], DIFFUSERS_OLD_ATTN[parts[-2]], parts[-1]])
    return key
