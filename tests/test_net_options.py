"""Options for small models that the official configurations leave off: SwinIR's input skip,
GroupNorm groups, and float16 weight files. Official configs must keep the official behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from flowie.nets.flow_unet import FlowUNet, UNetConfig
from flowie.nets.swinir import SwinIR, SwinIRConfig
from flowie.nets.vae import CondEncoder, VaeConfig, VaeDecoder
from flowie.presets import PRESETS
from flowie.train.trainer import (
    ARCHS,
    DEMO_SWINIR,
    DEMO_UNET,
    DEMO_VAE,
    PHASES,
    PhaseConfig,
    TrainConfig,
    Trainer,
)

TINY_SWINIR = SwinIRConfig(img_size=8, embed_dim=16, depths=(1,), num_heads=(2,), window_size=8, num_feat=16)


def _group_counts(module: nn.Module) -> set[int]:
    return {m.num_groups for m in module.modules() if isinstance(m, nn.GroupNorm)}


def test_swinir_input_skip_with_a_zero_last_conv_returns_the_input_exactly():
    torch.manual_seed(0)
    net = SwinIR(SwinIRConfig(**{**TINY_SWINIR.to_dict(), "input_skip": True}))
    nn.init.zeros_(net.conv_last.weight)
    nn.init.zeros_(net.conv_last.bias)
    lq = torch.rand(2, 3, 72, 40)  # not multiples of 64: padded inside, cropped back
    with torch.no_grad():
        out = net(lq)
    assert out.shape == lq.shape
    assert torch.equal(out, lq)


def test_swinir_without_input_skip_adds_the_rgb_mean_as_the_official_code_does():
    torch.manual_seed(0)
    net = SwinIR(TINY_SWINIR)
    nn.init.zeros_(net.conv_last.weight)
    nn.init.zeros_(net.conv_last.bias)
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 64))
    expected = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    assert torch.allclose(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_official_presets_keep_32_groups_and_no_input_skip(preset):
    from flowie.convert import parse_config

    spec = parse_config(PRESETS[preset])
    assert spec.swinir.input_skip is False
    assert spec.vae.norm_groups == 32
    assert spec.unet.norm_groups == 32


def test_norm_groups_reach_every_groupnorm():
    vae = VaeConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    assert _group_counts(VaeDecoder(vae, scale_factor=1.0)) == {8}
    assert _group_counts(CondEncoder(vae, latent_scale=1.0)) == {8}
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                      num_head_channels=32, context_dim=32, norm_groups=8)
    assert _group_counts(FlowUNet(unet)) == {8}
    default = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                         num_head_channels=32, context_dim=32)
    assert _group_counts(FlowUNet(default)) == {32}


def test_new_fields_round_trip_through_model_json_dicts():
    assert SwinIRConfig.from_dict(DEMO_SWINIR.to_dict()) == DEMO_SWINIR
    assert VaeConfig.from_dict(DEMO_VAE.to_dict()) == DEMO_VAE
    assert UNetConfig.from_dict(DEMO_UNET.to_dict()) == DEMO_UNET
    assert DEMO_SWINIR.input_skip and DEMO_VAE.norm_groups == 8 and DEMO_UNET.norm_groups == 8


def test_float16_weight_files_load_as_the_serving_dtype(tmp_path):
    from flowie.model import load_stage
    from flowie.modeldir import read_model_dir

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / "a.png")
    swinir, vae, unet = ARCHS["tiny"]
    phases = {p: PhaseConfig(steps=0, batch=1, crop=64) for p in PHASES}
    cfg = TrainConfig(out=str(tmp_path / "m"), images=str(folder), phases=phases, swinir=swinir, vae=vae, unet=unet,
                      threads=1, defaults={"min_side": 0}, weights_dtype="float16")
    trainer = Trainer(cfg)
    out = trainer.write_model()
    stored = load_file(str(out / "swinir.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    module = load_stage(read_model_dir(out), "swinir", dtype="float32")
    for name, param in module.state_dict().items():
        if name in stored:
            assert param.dtype == torch.float32
            assert torch.equal(param, stored[name].float())
    original = trainer.swinir.state_dict()["conv_first.1.weight"]
    assert torch.allclose(module.state_dict()["conv_first.1.weight"], original, rtol=1e-3, atol=1e-4)
