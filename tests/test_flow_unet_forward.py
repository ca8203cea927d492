"""The flow UNet's written-out forward (flowie.nets.flow_unet.FlowUNet), checked against diffusers'
own ``UNet2DConditionModel.forward`` with ControlNet residuals, and its control-stream option off
CUDA. The official-fixture parity tests check the same path against the official code."""

from __future__ import annotations

import pytest
import torch

from engines import EngineConfig, EngineError
from engines.torch_engine import TorchEngine
from flowie.nets.flow_unet import FlowUNet, UNetConfig
from flowie.stages import FLOW_UNET

# Attention at levels 2 and 3 but not 1, so both kinds of down and up block run.
CFG = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                 num_head_channels=16, context_dim=24, norm_groups=8)


@pytest.fixture(scope="module")
def unet() -> FlowUNet:
    torch.manual_seed(0)
    scales = [0.5 + 0.1 * i for i in range(CFG.num_controls)]  # not all 1: the scaled residuals too
    return FlowUNet(CFG, control_scales=scales).eval()


def _inputs(b: int, h: int, w: int):
    g = torch.Generator().manual_seed(h * 100 + w)
    return (torch.randn(b, 4, h, w, generator=g), torch.tensor([999.0, 399.0][:b]),
            torch.randn(b, 4, h, w, generator=g), torch.randn(b, 5, CFG.context_dim, generator=g))


# 16x16 divides by the overall upsampling factor (4 here); 12x20 and 9x14 make diffusers pass
# explicit upsample sizes, and 9x14 has odd sizes at two levels.
@pytest.mark.parametrize("h, w", [(16, 16), (12, 20), (9, 14)])
def test_forward_gives_the_bits_of_diffusers_unet_forward_with_controlnet_residuals(unet, h, w):
    x_t, t, c_latent, context = _inputs(2, h, w)
    with torch.no_grad():
        ctrl = unet.controls(x_t, t, c_latent, context)
        expected = unet.unet(x_t, t, encoder_hidden_states=context, down_block_additional_residuals=tuple(ctrl[:-1]),
                             mid_block_additional_residual=ctrl[-1], return_dict=False)[0]
        ours = unet(x_t, t, c_latent, context)
    assert ours.shape == (2, 4, h, w)
    assert torch.equal(ours, expected)


def test_the_control_stream_flag_is_inert_off_cuda(unet):
    x_t, t, c_latent, context = _inputs(1, 16, 16)
    with torch.no_grad():
        one = unet(x_t, t, c_latent, context)
        unet.control_stream = True
        try:
            two = unet(x_t, t, c_latent, context)
        finally:
            unet.control_stream = False
    assert torch.equal(one, two)


def test_the_torch_engine_refuses_the_control_stream_on_the_cpu(unet):
    with pytest.raises(EngineError, match="control_stream=True needs a CUDA device"):
        TorchEngine(unet, FLOW_UNET, "cpu", control_stream=True)


def test_the_engine_configuration_gives_the_control_stream_to_the_flow_unet_only():
    config = EngineConfig.for_device("cuda")  # on by default on CUDA
    assert config.torch_options("flow_unet")["control_stream"] is True
    assert not any(config.torch_options(s)["control_stream"] for s in ("swinir", "cond_encoder", "vae_decoder"))
    off = EngineConfig.for_device("cuda", overrides="control_stream=off")
    assert off.torch_options("flow_unet")["control_stream"] is False
