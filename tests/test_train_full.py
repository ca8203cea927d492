"""`flowie init`, `flowie train --arch full` (one process and torchrun/gloo) and `flowie export-model`.

Init is checked against the official code's own numbers (the tiny reference fixture's goldens) and
against diffusers' own networks; the ControlNet start against the official stage-2 rule written
out in the official key names; training against itself across process counts and a kill; export
against `flowie convert` and the unmerged LoRA network.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowie import keymap
from flowie.convert import load_checkpoint, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("FLOWIE_REFERENCE_FIXTURE", ROOT.parent / "shared" / "reference" / "tiny_bfr"))
CONFIG = FIXTURE / "model_config.yaml"
CKPT = FIXTURE / "flowie_tiny_bfr.ckpt"
NULL = FIXTURE / "inputs" / "null_context.npy"

pytestmark = pytest.mark.skipif(not CKPT.is_file(), reason=f"reference fixture not found at {FIXTURE}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process checks run on one thread, as the training subprocesses do (--threads 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWIE_")}
    # gloo on the loopback interface: the test's processes never need another one.
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo")
    return env


def _main(*args: str) -> tuple[int, str]:
    """The `flowie` command in this process (no interpreter start-up); (exit code, stderr)."""
    import contextlib
    import io

    from service.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def _cli(*args: str, torchrun: int = 0, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun),
               "-m", "service.cli", *args]
    else:
        cmd = [sys.executable, "-m", "service.cli", *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # show where it stood
        pytest.fail(f"{' '.join(args[:1])} did not finish in {timeout} s; stderr: {exc.stderr!s:.4000}")


@pytest.fixture(scope="module")
def fixture_sd() -> dict[str, torch.Tensor]:
    return load_checkpoint(CKPT)


@pytest.fixture(scope="module")
def sd_ckpt(tmp_path_factory, fixture_sd) -> Path:
    """An SD-layout ldm checkpoint: the fixture's UNet base without LoRA (the official names), its VAE,
    schedule buffers and a text-encoder tensor, saved as v2-1_512-ema-pruned.ckpt is."""
    out = {}
    for key, value in fixture_sd.items():
        if key.startswith("model.diffusion_model."):
            if ".lora_" in key:
                continue
            out[key.replace(".linear.", ".")] = value
        elif key.startswith("first_stage_model.") or key in ("betas", "alphas_cumprod"):
            out[key] = value
    out["cond_stage_model.model.positional_embedding"] = torch.zeros(77, 64)
    path = tmp_path_factory.mktemp("sd") / "sd_tiny.ckpt"
    torch.save({"state_dict": out}, path)
    return path


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, sd_ckpt) -> Path:
    """`flowie init` from the ldm checkpoint, ControlNet by the stage-2 rule, SwinIR from the DiffBIR-style ckpt."""
    out = tmp_path_factory.mktemp("init") / "init"
    code, log = _main("init", "--config", str(CONFIG), "--sd", str(sd_ckpt), "--swinir", str(CKPT),
                      "--null-context", str(NULL), "-o", str(out))
    assert code == 0, log
    (out / "cli.log").write_text(log)
    return out


def _goldens() -> dict[str, torch.Tensor]:
    return {**load_file(str(FIXTURE / "golden_pipeline.safetensors")), **load_file(str(FIXTURE / "golden_modules.safetensors"))}


# ------------------------------------------------------------------------------------------ init


def test_init_records_every_source_and_accounts_for_every_key(init_dir, sd_ckpt):
    report = json.loads((init_dir / "init.json").read_text())
    assert report["sources"]["sd"]["sha256"] == {sd_ckpt.name: hashlib.sha256(sd_ckpt.read_bytes()).hexdigest()}
    assert report["sources"]["swinir"]["sha256"] == {CKPT.name: hashlib.sha256(CKPT.read_bytes()).hexdigest()}
    log = (init_dir / "cli.log").read_text()
    for reason, count in report["ignored"].items():
        assert f"ignored {count} tensors: {reason}" in log
    assert any("cond_stage_model" in r for r in report["ignored"])
    assert any("schedule" in r for r in report["ignored"])
    sd = load_checkpoint(sd_ckpt)
    n_unet = sum(k.startswith("model.diffusion_model.") for k in sd)
    n_vae = sum(k.startswith("first_stage_model.") for k in sd)
    assert report["mapped"]["sd.model.diffusion_model"] == n_unet
    assert report["mapped"]["sd.vae"] == n_vae
    assert n_unet + n_vae + sum(report["ignored"][r] for r in report["ignored"] if "schedule" in r or "cond_stage" in r) \
        == len(sd)


def test_init_from_ldm_layout_reproduces_the_official_networks(tmp_path, sd_ckpt):
    """With the fixture's ControlNet (--controlnet-from), the UNet base from the SD-layout file gives the
    official code's LoRA-off output; the VAE halves and SwinIR give its goldens."""
    from flowie.model import load_stage
    from flowie.modeldir import read_model_dir
    from flowie.nets.vae import CondEncoder, VaeConfig
    from flowie.train.init import init_model

    out = tmp_path / "init"
    init_model(str(CONFIG), sd_ckpt, NULL, out, controlnet_from=CKPT, swinir=CKPT)
    info = read_model_dir(out)
    g = _goldens()
    context = torch.from_numpy(np.load(NULL)).repeat(2, 1, 1)
    flow = load_stage(info, "flow_unet")
    with torch.no_grad():
        v = flow(g["x_T"], torch.full((2,), 999.0), g["c_latent"], context)
        torch.testing.assert_close(v, g["unet_out_lora_off"], atol=1e-4, rtol=1e-4)
        decoder = load_stage(info, "vae_decoder")
        torch.testing.assert_close(decoder.decode_raw(g["vae_decode_small_in"]), g["vae_decode_small_out"], atol=1e-4, rtol=1e-4)
        encoder = CondEncoder(VaeConfig.from_dict(info.stages["cond_encoder"]["vae"]), 1.0)
        encoder.load_state_dict(load_file(str(out / "vae_encoder.safetensors")))
        hq = torch.from_numpy(np.load(FIXTURE / "inputs" / "hq.npy")).permute(0, 3, 1, 2).float() / 255.0
        torch.testing.assert_close(encoder.moments(hq), g["vae_encode_moments"], atol=1e-4, rtol=1e-4)
        lq = torch.from_numpy(np.load(FIXTURE / "inputs" / "lq.npy")).permute(0, 3, 1, 2).double().div(255.0).float()
        torch.testing.assert_close(load_stage(info, "swinir")(lq), g["control"], atol=1e-4, rtol=1e-4)
    assert load_file(str(out / "cond_encoder.safetensors")).keys() == load_file(str(out / "vae_encoder.safetensors")).keys()


def test_init_controlnet_follows_the_official_stage2_rule_key_by_key(init_dir, sd_ckpt, fixture_sd):
    """In official names: control_model.K = model.diffusion_model.K where that exists with the same shape;
    the first conv's x_t channels copied and its hint channels zero; everything else (zero convs) zero."""
    sd = load_checkpoint(sd_ckpt)
    spec = parse_config(load_config(str(CONFIG)))
    cmap = keymap.controlnet_map(spec.unet)
    ours = load_file(str(init_dir / "flow_unet.safetensors"))
    official_keys = {k[len("control_model."):]: v.shape for k, v in fixture_sd.items() if k.startswith("control_model.")}
    assert len(official_keys) == sum(k.startswith("controlnet.") for k in ours)
    kinds = {"copied": 0, "widened": 0, "zero": 0}
    for key, shape in official_keys.items():
        value = ours["controlnet." + keymap.map_key(key, cmap)]
        assert value.shape == shape
        unet_value = sd.get("model.diffusion_model." + key)
        if unet_value is not None and unet_value.shape == shape:
            assert torch.equal(value, unet_value), key
            kinds["copied"] += 1
        elif unet_value is not None:
            assert key == "input_blocks.0.0.weight"
            assert torch.equal(value[:, : unet_value.shape[1]], unet_value)
            assert not value[:, unet_value.shape[1]:].any()
            kinds["widened"] += 1
        else:
            assert key.startswith(("zero_convs.", "middle_block_out.")), key
            assert not value.any(), key
            kinds["zero"] += 1
    assert kinds == {"copied": len(official_keys) - 27, "widened": 1, "zero": 26}


def test_init_from_diffusers_folder_matches_diffusers_networks(tmp_path):
    """A diffusers layout (UNet2DConditionModel / AutoencoderKL, tiny configs, save_pretrained): our networks
    built from the init directory compute what diffusers computes (the fresh ControlNet adds zeros)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from flowie.model import load_stage
    from flowie.modeldir import read_model_dir
    from flowie.train.init import init_model

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(2, 2, 2, 4),
        cross_attention_dim=64, use_linear_projection=True, norm_eps=1e-5).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 32, 32),
                        layers_per_block=1, latent_channels=4, norm_num_groups=32).eval()
    sd_dir = tmp_path / "sd21"
    unet.save_pretrained(sd_dir / "unet")
    vae.save_pretrained(sd_dir / "vae")
    (sd_dir / "scheduler").mkdir()
    out = tmp_path / "init"
    report = init_model(str(CONFIG), sd_dir, NULL, out, swinir=CKPT)
    assert set(report.sources["sd"]["sha256"]) == {"unet/diffusion_pytorch_model.safetensors",
                                                   "vae/diffusion_pytorch_model.safetensors"}
    assert any("scheduler" in n for n in report.notes)
    info = read_model_dir(out)
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    ctx = torch.randn(2, 77, 64, generator=gen)
    t = torch.tensor([999.0, 321.0])
    image = torch.rand(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(load_stage(info, "flow_unet")(x, t, c, ctx), unet(x, t, ctx).sample, atol=1e-4, rtol=1e-4)
        z = vae.encode(image * 2 - 1).latent_dist.mean
        cond = load_stage(info, "cond_encoder")
        torch.testing.assert_close(cond(image), z * info.stages["cond_encoder"]["latent_scale"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load_stage(info, "vae_decoder").decode_raw(z), vae.decode(z).sample, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ training


TRAIN_ARGS = ["--images", "skimage", "--steps", "3", "--crop", "128", "--threads", "1", "--degradation", "general",
              "--val-images", "skimage-holdout", "--val-every", "3",
              "--checkpoint-every", "1"]


def _state(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "state.pt", map_location="cpu", weights_only=True)


def _assert_same_training(a: dict, b: dict, atol: float) -> None:
    assert a["step"] == b["step"]
    for part in ("lora", "controlnet"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], atol=atol, rtol=0, msg=f"{part} {key}")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, init_dir) -> Path:
    """One process, batch 2, 3 steps: the reference run."""
    out = tmp_path_factory.mktemp("single") / "model"
    code, log = _main("train", "--arch", "full", "--init", str(init_dir), "--out", str(out), "--batch", "2", *TRAIN_ARGS)
    assert code == 0, log
    return out


def test_torchrun_two_processes_train_like_one_with_the_doubled_batch(tmp_path, init_dir, single_run):
    out = tmp_path / "ddp"
    result = _cli("train", "--arch", "full", "--init", str(init_dir), "--out", str(out), "--batch", "1", *TRAIN_ARGS,
                  torchrun=2)
    assert result.returncode == 0, result.stderr
    assert "on 2 process(es)" in result.stderr
    ddp, single = _state(out), _state(single_run)
    _assert_same_training(ddp, single, atol=2e-5)
    # Training moved the weights far more than the tolerance: the LoRA up factors start at zero.
    moved = max(v.abs().max().item() for k, v in single["lora"].items() if ".lora_up." in k)
    assert moved > 1e-4


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, init_dir, single_run):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "service.cli", "train", "--arch", "full", "--init", str(init_dir), "--out", str(out),
           "--batch", "2", *TRAIN_ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints" / "state.pt"
    try:
        deadline = time.monotonic() + 90
        while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _state(out)["step"]
    assert 1 <= killed_at < 3
    assert not (out / "model.json").exists()
    code, log = _main("train", "--arch", "full", "--init", str(init_dir), "--out", str(out), "--batch", "2", *TRAIN_ARGS,
                      "--resume")
    assert code == 0, log
    _assert_same_training(_state(out), _state(single_run), atol=0)


def test_resume_refuses_a_checkpoint_of_other_options(tmp_path, init_dir, single_run):
    from flowie.train.full import FullConfig, FullTrainer

    cfg = FullConfig(init=str(init_dir), images="skimage", out=str(tmp_path), checkpoint_dir=str(single_run / "checkpoints"),
                     steps=3, batch=2, crop=128, degradation="general", lr=3e-4)
    with pytest.raises(ValueError, match="other options"):
        FullTrainer(cfg).load_checkpoint()


# ------------------------------------------------------------------------------------------ export


def test_exported_model_serves_and_its_merged_unet_equals_the_lora_network(init_dir, single_run):
    from engines import build_pipeline
    from flowie.model import load_stage
    from flowie.modeldir import read_model_dir
    from flowie.params import EnhanceParams
    from flowie.train.full import FullConfig, FullTrainer

    logged = [json.loads(line) for line in (single_run / "checkpoints" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "val_loss" in r] == [3] and np.isfinite([r["val_loss"] for r in logged if "val_loss" in r]).all()
    info = read_model_dir(single_run)
    assert info.meta["source"]["lora_merged"] > 0 and info.meta["source"]["steps"] == 3
    pipe = build_pipeline(single_run)
    lq = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    result = pipe.enhance([lq], EnhanceParams(upscale=2.0, min_side=0), seeds=[0])[0]
    assert result.image.shape == (128, 96, 3)

    cfg = FullConfig(init=str(init_dir), images="skimage", out=str(single_run), steps=3, batch=2, crop=128,
                     degradation="general")
    trainer = FullTrainer(cfg)
    assert trainer.load_checkpoint() and trainer.step == 3
    trainer.flow.eval()
    merged = load_stage(info, "flow_unet")
    gen = torch.Generator().manual_seed(2)
    x, c = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    ctx = trainer.null_context.expand(2, -1, -1)
    t = torch.tensor([999.0, 400.0])
    with torch.no_grad():
        unmerged = trainer.flow(x, t, c, ctx)
        torch.testing.assert_close(merged(x, t, c, ctx), unmerged, atol=1e-5, rtol=1e-5)
        trainer.flow.unet.requires_grad_(False)
        base = load_stage(read_model_dir(init_dir), "flow_unet")
        base.controlnet.load_state_dict(trainer.flow.controlnet.state_dict())
        assert (base(x, t, c, ctx) - unmerged).abs().max() > 1e-4  # the LoRA factors do contribute


def test_official_ckpt_has_the_official_layout_and_converts_to_the_exported_model(tmp_path, single_run, fixture_sd):
    from flowie.convert import convert

    ckpt = tmp_path / "flowie_trained.ckpt"
    code, log = _main("export-model", str(single_run / "checkpoints" / "state.pt"), "--official-ckpt", str(ckpt))
    assert code == 0, log
    official = load_checkpoint(ckpt)
    # The tiny official model (text encoder: Identity) has exactly these keys and shapes.
    assert {k: tuple(v.shape) for k, v in official.items()} == {k: tuple(v.shape) for k, v in fixture_sd.items()}
    for name in ("betas", "alphas_cumprod", "posterior_mean_coef2", "posterior_log_variance_clipped"):
        torch.testing.assert_close(official[name], fixture_sd[name], atol=1e-6, rtol=1e-6)
    for name in [k for k in fixture_sd if k.endswith((".attn_mask", ".relative_position_index"))]:
        assert torch.equal(official[name], fixture_sd[name])
    converted = tmp_path / "converted"
    convert(ckpt, str(CONFIG), converted, NULL)
    for stage in ("swinir", "cond_encoder", "flow_unet", "vae_decoder"):
        a, b = load_file(str(converted / f"{stage}.safetensors")), load_file(str(single_run / f"{stage}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_accumulation_and_gradient_checkpointing_train_like_the_plain_step(init_dir, tmp_path):
    """accum 2 x batch 1 = batch 2; activation checkpointing recomputes the same numbers; data worker
    processes hand over the same batches; bf16 runs."""
    from flowie.train.full import FullConfig, FullTrainer

    def one_step(**kw) -> dict[str, torch.Tensor]:
        cfg = FullConfig(init=str(init_dir), images="skimage", out=str(tmp_path), steps=1, crop=128,
                         degradation="general", **{"batch": 2, **kw})
        trainer = FullTrainer(cfg)
        if kw.get("grad_checkpointing"):
            assert all(block.gradient_checkpointing for block in trainer.flow.controlnet.down_blocks)
        loss = trainer.train_step()
        assert np.isfinite(loss)
        return {**trainer.lora_state(), **trainer.flow.controlnet.state_dict()}

    plain = one_step()
    for variant in (one_step(batch=1, accum=2), one_step(grad_checkpointing=True), one_step(data_workers=1)):
        for key, value in plain.items():
            torch.testing.assert_close(variant[key], value, atol=2e-5, rtol=0, msg=key)
    bf16 = one_step(bf16=True)
    assert max((bf16[k] - plain[k]).abs().max().item() for k in plain) < 1e-3


# ------------------------------------------------------------------------------------------ full size


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((FIXTURE.parent / name).read_text())
    return {k: tuple(v["shape"]) for k, v in data["keys"].items()}


def test_full_size_sd_layout_maps_and_writes_back_the_official_bfr_layout():
    """On the meta device, at full size: the SD 2.1 layout (DiffBIR's manifest: plain SD UNet, VAE, OpenCLIP,
    schedule) fills every network of the bfr_v1 preset, and the official writer gives exactly the keys and
    shapes of the official FlowIE BFR checkpoint (its text encoder aside)."""
    from flowie.convert import check_against_modules, map_checkpoint
    from flowie.nets.flow_unet import FlowUNet
    from flowie.nets.swinir import SwinIR
    from flowie.nets.vae import CondEncoder, VaeDecoder
    from flowie.train.init import InitReport, _vae_halves, controlnet_from_unet, ldm_sd_parts
    from flowie.train.lora import lora_targets
    from flowie.train.official import official_state_dict

    diffbir = _manifest("manifest_diffbir_face_v1.json")
    sd_layout = {k: torch.empty(s, device="meta") for k, s in diffbir.items()
                 if not k.startswith(("control_model.", "cond_encoder.", "preprocess_model."))}
    spec = parse_config(load_config("bfr_v1"))
    report = InitReport()
    unet, vae = ldm_sd_parts(sd_layout, spec, report)
    encoder, decoder = _vae_halves(vae, spec, report, Path("sd"))
    with torch.device("meta"):
        flow = FlowUNet(spec.unet)
        swinir = SwinIR(spec.swinir).state_dict()
    control = controlnet_from_unet(unet, {k: tuple(v.shape) for k, v in flow.controlnet.state_dict().items()}, report)
    assert report.controlnet["widened_zero_hint_channels"] == ["conv_in.weight"] and report.controlnet["zero_convs"] == 26
    stages = {"swinir": swinir, "cond_encoder": encoder, "vae_encoder": encoder, "vae_decoder": decoder,
              "flow_unet": {**{f"unet.{k}": v for k, v in unet.items()}, **{f"controlnet.{k}": v for k, v in control.items()}}}
    with torch.device("meta"):
        modules = {"swinir": SwinIR(spec.swinir), "cond_encoder": CondEncoder(spec.vae, 1.0),
                   "vae_encoder": CondEncoder(spec.vae, 1.0), "vae_decoder": VaeDecoder(spec.vae, 1.0), "flow_unet": flow}
    check_against_modules(stages, modules)
    lora = {}
    for name, linear in lora_targets(flow.unet):
        lora[f"{name}.lora_down.weight"] = torch.empty(4, linear.in_features, device="meta")
        lora[f"{name}.lora_up.weight"] = torch.empty(linear.out_features, 4, device="meta")
    official = official_state_dict(stages, lora, spec)
    expected = {k: s for k, s in _manifest("manifest_flowie_bfr_v1.json").items() if not k.startswith("cond_stage_model.")}
    assert {k: tuple(v.shape) for k, v in official.items()} == expected
    served = map_checkpoint(official, spec)
    assert set(served) == {"swinir", "cond_encoder", "vae_decoder", "flow_unet"}


def test_swinir_source_may_be_a_flowie_train_stage1_checkpoint(tmp_path, fixture_sd):
    from flowie.train.init import InitReport, read_swinir

    official = {k[len("preprocess_model."):]: v for k, v in fixture_sd.items() if k.startswith("preprocess_model.")}
    stage1 = tmp_path / "swinir.pt"
    torch.save({"format": 1, "phase": "swinir", "modules": {"swinir": official}}, stage1)
    report = InitReport()
    got = read_swinir(stage1, report)
    learned = {k: v for k, v in official.items() if not k.endswith((".attn_mask", ".relative_position_index"))}
    assert got.keys() == learned.keys() and all(torch.equal(got[k], learned[k]) for k in got)
    assert report.ignored == {"SwinIR attn_mask / relative_position_index buffers (recomputed)": len(official) - len(learned)}


def test_train_bench_runs_on_the_cpu_with_a_tiny_config(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "loadtests"))
    import train_bench

    assert train_bench.main(["--config", str(CONFIG), "--device", "cpu", "--crop", "128", "--batches", "1,2",
                             "--steps", "1", "--warmup", "0", "--workdir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["batches"]) == {"1", "2"} and report["batches"]["2"]["images_per_s"] > 0
    assert report["schedule"]["gpus"] == 7 and report["schedule"]["gpu_hours"] > 0
