"""Our conversion + networks + DDPM sampler reproduce the official DiffBIR v1 outputs of the fixture.

The fixture (FLOWIE_DIFFBIR_FIXTURE, default ../shared/reference/tiny_diffbir_v1) was made by
running the official DiffBIR v1 code; files are found by layout (one ``*.ckpt``,
``model_config.yaml``, ``inputs/``, ``expected/``, ``golden_pipeline.safetensors``), so any
fixture of that layout runs. Nothing expected here is computed by our code. Tolerances:
eps / controls atol 1e-3; latents |d| <= 1e-3 + 1e-4 |ref|; float images atol 1e-3; uint8
within 1 level on >= 99.9 % of values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from engines import build_pipeline
from flowie import colorfix, diffusion, imageops
from flowie.modeldir import read_model_dir
from flowie.params import EnhanceParams, ParamError
from flowie.pipeline import Pipeline

MAX_OFF_FRACTION = 0.001
STEP_TENSORS = ("x_in", "eps", "pred_x0", "mean", "noise", "x_out")


@pytest.fixture(scope="module")
def fixture(diffbir_fixture_dir) -> Path:
    return diffbir_fixture_dir


@pytest.fixture(autouse=True, scope="module")
def _exact_float32_one_thread():
    # One thread: the tiny networks' small ops lose more to thread hand-offs than they gain.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tiny_diffbir_model_dir) -> Path:
    return tiny_diffbir_model_dir


@pytest.fixture(scope="module")
def golden(fixture) -> dict[str, torch.Tensor]:
    return load_file(str(fixture / "golden_pipeline.safetensors"))


@pytest.fixture(scope="module")
def pipe(model_dir) -> Pipeline:
    return build_pipeline(model_dir)


def npy(fixture: Path, name: str) -> np.ndarray:
    return np.load(fixture / "inputs" / f"{name}.npy")


def expected(fixture: Path, name: str) -> np.ndarray:
    return np.load(fixture / "expected" / f"{name}_uint8.npy")


def assert_latent(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    excess = (ours.double() - ref.double()).abs() - (1e-3 + 1e-4 * ref.double().abs())
    assert float(excess.max()) <= 0, f"{name}: max |d| {float((ours - ref).abs().max()):.3g} past 1e-3 + 1e-4|ref|"


def assert_atol(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-3) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = float((ours.double() - ref.double()).abs().max())
    assert err <= atol, f"{name}: max |d| {err:.3g} > {atol}"


def assert_uint8_match(name: str, ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 2, f"{name}: max difference {diff.max()} levels"
    off = float((diff > 1).mean())
    assert off <= MAX_OFF_FRACTION, f"{name}: {off:.4%} of values differ by more than 1"


def conditions(pipe: Pipeline, fixture: Path):
    lq = imageops.images_to_tensor(list(npy(fixture, "lq")))
    control = pipe.stages["swinir"](lq)
    c_latent = pipe.stages["cond_encoder"](control)
    return control, c_latent, pipe.null_context.expand(lq.shape[0], -1, -1)


def run_params(sampler: str, steps: int, color_fix: str) -> EnhanceParams:
    return EnhanceParams(sampler=sampler, steps=steps, color_fix=color_fix, tile="off")


# ---------------------------------------------------------------- conversion


def test_conversion_records_family_prediction_and_the_yaml_schedule(model_dir, fixture):
    params = yaml.safe_load((fixture / "model_config.yaml").read_text())["params"]
    info = read_model_dir(model_dir)
    assert info.family == "diffbir"
    assert info.prediction == params.get("parameterization", "eps")
    assert info.defaults["sampler"] == "ddpm" and info.defaults["steps"] == 50
    assert info.meta["schedule"]["linear_start"] == params["linear_start"]
    assert info.meta["schedule"]["linear_end"] == params["linear_end"]
    assert info.meta["schedule"]["num_timesteps"] == params["timesteps"]
    unet = params["unet_config"]["params"]
    ours = info.stages["flow_unet"]["unet"]
    assert ours["model_channels"] == unet["model_channels"]
    assert list(ours["channel_mult"]) == list(unet["channel_mult"])
    assert ours["context_dim"] == unet["context_dim"]
    assert info.stages["swinir"]["embed_dim"] == params["preprocess_config"]["params"]["embed_dim"]


def test_parameterization_v_in_the_yaml_makes_a_v_model(fixture):
    from flowie.convert import load_config, parse_config

    config = load_config(fixture / "model_config.yaml")
    config["params"]["parameterization"] = "v"
    spec = parse_config(config)
    assert (spec.family, spec.prediction) == ("diffbir", "v")


# ---------------------------------------------------------------- schedule and stages


@pytest.mark.parametrize("run", ["short", "long"])
def test_spaced_schedule_matches_the_official_tables(golden, run):
    timesteps = golden[f"{run}_timesteps"]
    tables = diffusion.spaced_tables(diffusion.Schedule(), len(timesteps))
    assert tables.timesteps[::-1].tolist() == timesteps.tolist()
    for name in ("timesteps", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        ref = golden[f"{run}_sched_{name}"].numpy()
        np.testing.assert_array_equal(getattr(tables, name), ref, err_msg=name)


def test_respacing_of_three_and_one_steps():
    # Official space_timesteps(1000, "3") and ("1"): README section 9, the one-step quirk included.
    assert diffusion.space_timesteps(1000, 3) == [0, 500, 999]
    assert diffusion.space_timesteps(1000, 1) == [0]


def test_stage_one_and_hint_match(pipe, fixture, golden):
    control, c_latent, _ = conditions(pipe, fixture)
    assert_atol("control", control, golden["control"])
    assert_atol("c_latent", c_latent, golden["c_latent"])
    stage1 = imageops.tensor_to_uint8(control)
    assert_uint8_match("control_uint8", stage1, expected(fixture, "control"))


def test_controlnet_outputs_at_the_first_step(pipe, fixture, golden):
    _, c_latent, context = conditions(pipe, fixture)
    unet = pipe.stages["flow_unet"].module
    t = golden["short_step00_t"].to(torch.float32)  # int64 999 -> the embedding's float
    with torch.inference_mode():
        controls = unet.controls(golden["x_T"], t, c_latent, context)
    assert len(controls) == 13
    for k, ours in enumerate(controls):
        assert_atol(f"control_{k:02d}", ours, golden[f"short_step00_control_{k:02d}"])


# ---------------------------------------------------------------- sampler runs


def test_every_step_of_the_short_run(pipe, fixture, golden):
    _, c_latent, context = conditions(pipe, fixture)
    unet = pipe.stages["flow_unet"]
    seen: dict[int, dict] = {}
    steps = len(golden["short_timesteps"])
    timesteps_used = []

    def model(x, t):
        timesteps_used.append(int(t[0]))
        return unet(x, t, c_latent, context)

    latent = diffusion.ddpm(model, golden["x_T"], steps, diffusion.given_noise(torch.from_numpy(npy(fixture, "noise_short"))),
                            trace=lambda i, d: seen.setdefault(i, d))
    assert timesteps_used == golden["short_timesteps"].tolist()
    for i in range(steps):
        assert timesteps_used[i] == int(golden[f"short_step{i:02d}_t"][0])
        for name in STEP_TENSORS:
            ref = golden[f"short_step{i:02d}_{name}"]
            check = assert_atol if name == "eps" else assert_latent
            check(f"step {i:02d} {name}", seen[i][name], ref)
    assert_latent("short_latent", latent, golden["short_latent"])
    decoded = pipe.stages["vae_decoder"](latent)
    assert_atol("short_decoded", decoded, golden["short_decoded"])
    control = golden["control"]
    assert_atol("short_wavelet_float", colorfix.color_fix("wavelet", decoded, control), golden["short_wavelet_float"])
    assert_atol("short_adain_float", colorfix.color_fix("adain", decoded, control), golden["short_adain_float"])


@pytest.mark.parametrize("color_fix", ["wavelet", "adain", "none"])
def test_short_run_images(pipe, fixture, color_fix):
    lq = imageops.images_to_tensor(list(npy(fixture, "lq")))
    out = pipe.run_batch(lq, run_params("ddpm", 10, color_fix), noise=torch.from_numpy(npy(fixture, "x_T")),
                         step_noise=torch.from_numpy(npy(fixture, "noise_short")))
    assert_uint8_match(f"short_{color_fix}", imageops.tensor_to_uint8(out.image), expected(fixture, f"short_{color_fix}"))


def test_vpred_run(model_dir, fixture, golden, tmp_path):
    v_dir = tmp_path / "vpred"
    shutil.copytree(model_dir, v_dir)
    meta = json.loads((v_dir / "model.json").read_text())
    meta["prediction"] = "v"
    (v_dir / "model.json").write_text(json.dumps(meta))
    pipe = build_pipeline(v_dir)
    lq = imageops.images_to_tensor(list(npy(fixture, "lq")))
    out = pipe.run_batch(lq, run_params("ddpm", 10, "wavelet"), noise=torch.from_numpy(npy(fixture, "x_T")),
                         step_noise=torch.from_numpy(npy(fixture, "noise_short")))
    assert_latent("vpred_latent", out.latent, golden["vpred_latent"])
    assert_uint8_match("vpred_wavelet", imageops.tensor_to_uint8(out.image), expected(fixture, "vpred_wavelet"))


def test_long_run_through_flowie_enhance(model_dir, fixture, tmp_path):
    """The reproducibility recipe a user runs: x_T and every step's noise replayed from files."""
    from service.cli import main

    out = tmp_path / "out"
    inputs = fixture / "inputs"
    argv = ["enhance", str(inputs / "lq.npy"), "-o", str(out), "--model", str(model_dir), "--sampler", "ddpm",
            "--steps", "50", "--min-side", "0", "--color-fix", "wavelet", "--noise", str(inputs / "x_T.npy"),
            "--step-noise", str(inputs / "noise_long.npy")]
    assert main(argv) == 0
    ours = np.stack([np.asarray(Image.open(out / f"lq_{i}.png")) for i in range(2)])
    assert_uint8_match("long_wavelet", ours, expected(fixture, "long_wavelet"))


def test_whole_script_run(pipe, fixture, golden):
    """inference.main(): auto_resize to 512, pad to 64, 3 steps, crop, Lanczos back to the input size."""
    with Image.open(fixture / "inputs" / "script_lq.png") as im:
        image = np.asarray(im.convert("RGB"))
    steps = len(golden["script_timesteps"])
    params = EnhanceParams(sampler="ddpm", steps=steps, color_fix="wavelet", upscale=1.0, min_side=512, tile="off")
    assert pipe.padded_shape(*image.shape[:2], params) == tuple(8 * d for d in golden["script_latent"].shape[2:])
    result = pipe.enhance([image], params, noise=torch.from_numpy(npy(fixture, "x_T_script")),
                          step_noise=torch.from_numpy(npy(fixture, "noise_script")), keep_restored=False)[0]
    assert_uint8_match("script_wavelet", result.image[None], expected(fixture, "script_wavelet"))


# ---------------------------------------------------------------- samplers of the other family


def test_flow_samplers_are_refused_by_a_diffusion_model(pipe):
    with pytest.raises(ParamError, match="ddpm, ddim, dpm_solver"):
        pipe.resolve(EnhanceParams(sampler="mean_value"))


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_fast_samplers_run_on_the_converted_model(pipe, fixture, sampler):
    lq = imageops.images_to_tensor(list(npy(fixture, "lq")))
    out = pipe.run_batch(lq, run_params(sampler, 4, "none"), seeds=[1, 2])
    assert out.image.shape == (2, 3, 128, 128) and torch.isfinite(out.image).all()
