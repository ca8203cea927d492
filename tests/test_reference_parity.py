"""Our conversion + networks + samplers reproduce the official FlowIE outputs of the fixture.

The fixture (FLOWIE_REFERENCE_FIXTURE, default ../shared/reference/tiny_bfr) was produced by
running the official code; nothing expected here is computed by our code. Per-stage relative
error ||ours - ref|| / ||ref|| <= 1e-4 in float32; final uint8 images within 1 level on at
most 0.1 % of values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engines import build_pipeline
from flowie import colorfix, samplers
from flowie.model import load_null_context, load_stage
from flowie.modeldir import read_model_dir
from flowie.params import EnhanceParams

REL_TOL = 1e-4
MAX_OFF_FRACTION = 0.001


@pytest.fixture(autouse=True, scope="module")
def _exact_float32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = rel_err(ours, ref)
    assert err <= REL_TOL, f"{name}: relative error {err:.3g} > {REL_TOL}"


def assert_uint8_match(name: str, ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1, f"{name}: max difference {diff.max()} levels"
    off = float((diff > 0).mean())
    assert off <= MAX_OFF_FRACTION, f"{name}: {off:.4%} of values differ (allowed {MAX_OFF_FRACTION:.1%})"


@pytest.fixture(scope="module")
def golden(fixture_dir):
    return load_file(str(fixture_dir / "golden_pipeline.safetensors"))


@pytest.fixture(scope="module")
def golden_modules(fixture_dir):
    return load_file(str(fixture_dir / "golden_modules.safetensors"))


@pytest.fixture(scope="module")
def constants(fixture_dir):
    return json.loads((fixture_dir / "config.json").read_text())["pipeline"]


@pytest.fixture(scope="module")
def lq(fixture_dir) -> np.ndarray:
    return np.load(fixture_dir / "inputs" / "lq.npy")


@pytest.fixture(scope="module")
def x_T(fixture_dir) -> torch.Tensor:
    return torch.from_numpy(np.load(fixture_dir / "inputs" / "x_T.npy"))


@pytest.fixture(scope="module")
def info(tiny_model_dir):
    return read_model_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def nets(info):
    return {name: load_stage(info, name) for name in ("swinir", "cond_encoder", "flow_unet", "vae_decoder")}


@pytest.fixture(scope="module")
def context(info, golden):
    return load_null_context(info).expand(golden["x_T"].shape[0], -1, -1)


def lq_tensor(lq: np.ndarray) -> torch.Tensor:
    # Official conversion: float64 division, then float32.
    return torch.tensor(lq / 255.0, dtype=torch.float32).clamp_(0, 1).permute(0, 3, 1, 2)


def test_model_json_records_the_official_sampler_constants(info, constants):
    mv = info.meta["sampler_config"]["mean_value"]
    assert mv["timesteps"] == constants["euler_steps"]
    assert mv["midpoint_index"] == constants["midpoint_idx"]
    assert info.scale_factor == pytest.approx(constants["scale_factor"])
    assert info.meta["stages"]["flow_unet"]["control_scales"] == constants["control_scales"]


@torch.no_grad()
def test_swinir_matches_official(nets, lq, golden, golden_modules):
    swin = nets["swinir"]
    x = lq_tensor(lq)
    assert_close("swinir", swin(x), golden["control"])
    # An internal golden: mean subtraction + pixel-unshuffle + first conv.
    first = swin.conv_first((x - swin.mean) * swin.cfg.img_range)
    assert_close("swinir conv_first", first, golden_modules["swinir_conv_first_out"])
    body = swin.conv_after_body(swin.forward_features(first))
    assert_close("swinir conv_after_body", body, golden_modules["swinir_conv_after_body_out"])


@torch.no_grad()
def test_cond_encoder_matches_official(nets, golden):
    enc = nets["cond_encoder"]
    assert_close("cond_encoder moments", enc.moments(golden["control"]), golden["cond_encoder_moments"])
    assert_close("c_latent", enc(golden["control"]), golden["c_latent"])


@torch.no_grad()
def test_timestep_embedding_matches_official(nets, golden_modules):
    t = golden_modules["timestep_embedding_in"]
    ours = nets["flow_unet"].unet.time_proj(t)
    assert_close("timestep embedding", ours, golden_modules["timestep_embedding_out"])


@torch.no_grad()
@pytest.mark.parametrize("step", [0, 3])
def test_controlnet_outputs_match_official(nets, golden, context, step):
    controls = nets["flow_unet"].controls(golden[f"step{step}_x_in"], golden[f"step{step}_t"], golden["c_latent"], context)
    expected = sorted(k for k in golden if k.startswith(f"step{step}_control_"))
    assert len(controls) == len(expected)
    for k, key in enumerate(expected):
        assert_close(key, controls[k], golden[key])


@torch.no_grad()
def test_unet_without_control_matches_official(nets, golden, golden_modules, context):
    unet = nets["flow_unet"].unet
    v = unet(golden["step0_x_in"], golden["step0_t"], encoder_hidden_states=context, return_dict=False)[0]
    assert_close("unet_out_nocontrol", v, golden_modules["unet_out_nocontrol"])


@torch.no_grad()
def test_every_euler_step_matches_official(nets, golden, context):
    flow = nets["flow_unet"]
    steps = sorted({int(k[4:].split("_")[0]) for k in golden if k.startswith("step") and k.endswith("_v")})
    for i in steps:
        v = flow(golden[f"step{i}_x_in"], golden[f"step{i}_t"], golden["c_latent"], context)
        assert_close(f"step{i}_v", v, golden[f"step{i}_v"])


@torch.no_grad()
def test_mean_value_and_euler_latents_match_official(nets, golden, context, constants, x_T):
    flow = nets["flow_unet"]

    def velocity(x, t):
        return flow(x, t, golden["c_latent"], context)

    ts = [float(t) for t in constants["euler_steps"]]
    mv = samplers.mean_value(velocity, x_T, ts, constants["midpoint_idx"], dt=constants["dt"])
    assert_close("meanvalue_latent", mv, golden["meanvalue_latent"])
    eu = samplers.euler(velocity, x_T, ts, dt=constants["dt"])
    assert_close("euler5_latent", eu, golden["euler5_latent"])


@torch.no_grad()
def test_vae_decoder_matches_official(nets, golden, golden_modules):
    dec = nets["vae_decoder"]
    assert_close("meanvalue_decoded", dec(golden["meanvalue_latent"]), golden["meanvalue_decoded"])
    assert_close("euler5_decoded", dec(golden["euler5_latent"]), golden["euler5_decoded"])
    raw = dec.decode_raw(golden_modules["vae_decode_small_in"])
    assert_close("vae_decode_small", raw, golden_modules["vae_decode_small_out"])


def test_colour_fixes_match_official(golden):
    wavelet = colorfix.wavelet_color_fix(golden["meanvalue_decoded"], golden["control"])
    assert_close("out_wavelet_float", wavelet, golden["out_wavelet_float"])
    adain = colorfix.adain_color_fix(golden["meanvalue_decoded"], golden["control"])
    assert_close("out_adain_float", adain, golden["out_adain_float"])


@torch.no_grad()
def test_bsr_recipe_matches_official(tiny_bsr_model_dir, golden, x_T):
    info = read_model_dir(tiny_bsr_model_dir)
    enc = load_stage(info, "cond_encoder")
    assert_close("bsr_c_latent", enc(golden["control"]), golden["bsr_c_latent"])
    flow = load_stage(info, "flow_unet")
    ctx = load_null_context(info).expand(x_T.shape[0], -1, -1)
    controls = flow.controls(x_T, golden["bsr_t"], golden["bsr_c_latent"], ctx)
    for k in range(len(controls)):
        assert_close(f"bsr_control_{k:02d}", controls[k], golden[f"bsr_control_{k:02d}"])
    v = flow(x_T, golden["bsr_t"], golden["bsr_c_latent"], ctx)
    assert_close("bsr_v", v, golden["bsr_v"])
    assert_close("bsr_decoded", load_stage(info, "vae_decoder")(v), golden["bsr_decoded"])


# ------------------------------------------------------------------ final uint8 images


@pytest.fixture(scope="module")
def bfr_pipeline(tiny_model_dir):
    return build_pipeline(tiny_model_dir)


def _run(pipe, lq, x_T, **params):
    results = pipe.enhance(list(lq), EnhanceParams(upscale=1.0, min_side=0, tile="off", **params), noise=x_T)
    return np.stack([r.image for r in results]), np.stack([r.restored for r in results])


@pytest.mark.parametrize(
    "expected_name, params",
    [
        ("meanvalue_wavelet", dict(sampler="mean_value", steps=5, color_fix="wavelet")),
        ("meanvalue_adain", dict(sampler="mean_value", steps=5, color_fix="adain")),
        ("meanvalue_none", dict(sampler="mean_value", steps=5, color_fix="none")),
        ("euler5_wavelet", dict(sampler="euler", steps=5, color_fix="wavelet")),
        ("euler5_none", dict(sampler="euler", steps=5, color_fix="none")),
    ],
)
def test_final_bfr_images_match_official(bfr_pipeline, fixture_dir, lq, x_T, expected_name, params):
    expected_path = fixture_dir / "expected" / f"{expected_name}_uint8.npy"
    ours, _ = _run(bfr_pipeline, lq, x_T, **params)
    assert_uint8_match(expected_name, ours, np.load(expected_path))


def test_stage1_image_matches_official(bfr_pipeline, fixture_dir, lq, x_T):
    _, restored = _run(bfr_pipeline, lq, x_T, sampler="restore_only")
    assert_uint8_match("control", restored, np.load(fixture_dir / "expected" / "control_uint8.npy"))
    only, _ = _run(bfr_pipeline, lq, x_T, sampler="restore_only")
    assert_uint8_match("restore_only output", only, np.load(fixture_dir / "expected" / "control_uint8.npy"))


def test_final_bsr_image_matches_official(tiny_bsr_model_dir, fixture_dir, lq, x_T):
    pipe = build_pipeline(tiny_bsr_model_dir)
    ours, _ = _run(pipe, lq, x_T, sampler="one_step")  # model default colour fix for BSR: none
    assert_uint8_match("bsr_onestep", ours, np.load(fixture_dir / "expected" / "bsr_onestep_uint8.npy"))


def test_the_services_engines_with_their_cpu_defaults_match_official(tiny_model_dir, tiny_bsr_model_dir, fixture_dir,
                                                                      golden, lq, x_T):
    """What `flowie serve` and `flowie enhance` run on the CPU: TorchEngine stages, three of them in
    channels-last memory format (the CPU default of EngineConfig). Its rounding differs from NCHW's, and
    the images must still be the official ones."""
    from engines import build_pipeline

    pipe = build_pipeline(tiny_model_dir)
    nhwc = {name for name, engine in pipe.stages.items() if engine.describe()["channels_last"]}
    assert nhwc == {"swinir", "cond_encoder", "vae_decoder"}  # the setting under test is in force
    stages = pipe.stages  # each stage alone, at the per-stage tolerance
    assert_close("swinir (engine)", stages["swinir"](lq_tensor(lq)), golden["control"])
    assert_close("c_latent (engine)", stages["cond_encoder"](golden["control"]), golden["c_latent"])
    assert_close("meanvalue_decoded (engine)", stages["vae_decoder"](golden["meanvalue_latent"]),
                 golden["meanvalue_decoded"])
    ours, restored = _run(pipe, lq, x_T, sampler="mean_value", steps=5, color_fix="wavelet")
    assert_uint8_match("meanvalue_wavelet (engines)", ours, np.load(fixture_dir / "expected" / "meanvalue_wavelet_uint8.npy"))
    assert_uint8_match("control (engines)", restored, np.load(fixture_dir / "expected" / "control_uint8.npy"))
    bsr, _ = _run(build_pipeline(tiny_bsr_model_dir), lq, x_T, sampler="one_step")
    assert_uint8_match("bsr_onestep (engines)", bsr, np.load(fixture_dir / "expected" / "bsr_onestep_uint8.npy"))


def test_sensitivity_dropping_lora_is_detected(fixture_dir, golden, context):
    """The tolerance is tight enough to see a real mistake: an UNet without LoRA fails it."""
    from flowie.convert import load_checkpoint, load_config, map_checkpoint, parse_config

    spec = parse_config(load_config(fixture_dir / "model_config.yaml"))
    sd = {k: v for k, v in load_checkpoint(next(fixture_dir.glob("*.ckpt"))).items() if ".lora_" not in k}
    sd = {k.replace(".linear.", "."): v for k, v in sd.items()}
    stages = map_checkpoint(sd, spec)
    from flowie.convert import _stage_configs
    from flowie.model import build_stage

    flow = build_stage("flow_unet", _stage_configs(spec)["flow_unet"])
    flow.load_state_dict(stages["flow_unet"])
    with torch.no_grad():
        v = flow.eval()(golden["step0_x_in"], golden["step0_t"], golden["c_latent"], context)
    assert rel_err(v, golden["step0_v"]) > 100 * REL_TOL
