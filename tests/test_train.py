"""`flowie train` on tiny networks and crops: writes a loadable model, lowers each loss, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engines import build_pipeline
from flowie.train import losses
from flowie.train.lora import inject_lora, merge_lora
from flowie.train.trainer import ARCHS, PHASES, PhaseConfig, TrainConfig, Trainer


def _write_images(folder: Path, n: int = 2, size: int = 128) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        img = np.stack([np.sin(xx / (6 + i)) * 0.4 + 0.5, yy / size, np.cos((xx + yy) / (9 + 2 * i)) * 0.4 + 0.5], -1)
        img[20:50, 30:70] = [0.9, 0.2 * i, 0.1]
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _write_images(tmp_path_factory.mktemp("train_images"))


def _config(images: Path, out: Path, steps: int = 3, lr: float = 1e-3, **kw) -> TrainConfig:
    swinir, vae, unet = ARCHS["tiny"]
    phases = {p: PhaseConfig(steps=steps, batch=2, crop=64, lr=lr, warmup=1) for p in PHASES}
    return TrainConfig(out=str(out), images=str(images), phases=phases, swinir=swinir, vae=vae, unet=unet,
                       checkpoint_every=2, threads=1, work_scale=(1.0, 1.5), defaults={"min_side": 0},
                       **{"seed": 1, **kw})


def _states(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.clone() for m, mod in trainer.modules().items() for k, v in mod.state_dict().items()}


def test_flowie_train_writes_a_model_directory_the_pipeline_loads(images, tmp_path):
    from flowie.modeldir import read_model_dir
    from flowie.params import EnhanceParams
    from service.cli import main

    out = tmp_path / "model"
    argv = ["train", "--images", str(images), "--out", str(out), "--arch", "tiny", "--steps", "2", "--batch", "2",
            "--crop", "64", "--threads", "2", "--workers", "2", "--min-side", "0", "--work-scale", "1,1.5",
            "--flow-bank", "8"]
    assert main(argv) == 0
    info = read_model_dir(out)
    assert info.defaults["min_side"] == 0 and info.defaults["sampler"] == "mean_value"
    card = info.meta["card"]
    assert {p: card["training"]["phases"][p]["steps_done"] for p in PHASES} == dict.fromkeys(PHASES, 2)
    assert card["null_context"]["shape"] == [1, 77, ARCHS["tiny"][2].context_dim]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"{p}.pt" for p in sorted(PHASES)]
    pipe = build_pipeline(out)
    lq = (np.random.default_rng(0).uniform(0, 255, (40, 52, 3))).astype(np.uint8)
    for sampler in ("mean_value", "euler", "one_step", "restore_only"):
        result = pipe.enhance([lq], EnhanceParams(sampler=sampler, upscale=2.0), seeds=[0])[0]
        assert result.image.shape == (80, 104, 3)


LOSS_METHODS = {"swinir": "swinir_loss", "vae": "vae_loss", "cond_encoder": "cond_loss", "flow": "flow_loss"}


def test_each_phase_lowers_its_loss(images, tmp_path):
    trainer = Trainer(_config(images, tmp_path / "m", steps=16, lr=2e-3))
    per_step: dict[str, list[float]] = {p: [] for p in PHASES}

    def recorder(phase, loss_fn):
        def fn(step):
            out = loss_fn(step)
            per_step[phase].append(float(out["loss"].detach()))
            return out
        return fn

    for phase, name in LOSS_METHODS.items():
        setattr(trainer, name, recorder(phase, getattr(trainer, name)))
    trainer.run()
    for phase in PHASES:
        values = per_step[phase]
        assert len(values) == 16 and all(np.isfinite(values)), phase
        assert np.mean(values[-4:]) < np.mean(values[:4]), (phase, values)


def test_an_interrupted_run_resumes_to_the_same_weights(images, tmp_path):
    straight = Trainer(_config(images, tmp_path / "a", steps=4))
    straight.run()

    class Interrupt(Exception):
        pass

    def stop_in_vae(phase, step, total, values):
        if phase == "vae" and step == 3:
            raise Interrupt

    cfg = _config(images, tmp_path / "b", steps=4)
    with pytest.raises(Interrupt):
        Trainer(cfg, progress=stop_in_vae).run()
    assert {p.name for p in cfg.ckpt_dir.iterdir()} == {"swinir.pt", "vae.pt"}
    resumed = Trainer(cfg)
    resumed.run(resume=True)
    assert resumed.history["vae"]["steps"] == 4
    expected, got = _states(straight), _states(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert resumed.scale_factor == pytest.approx(straight.scale_factor)


def test_resume_refuses_checkpoints_made_with_other_options(images, tmp_path):
    cfg = _config(images, tmp_path / "c", steps=2)
    Trainer(cfg).run()
    changed = _config(images, tmp_path / "c", steps=2, kl_weight=1e-3)
    with pytest.raises(ValueError, match="different options for the vae phase"):
        Trainer(changed).run(resume=True)


def test_lora_trains_only_its_factors_and_the_controlnet_then_merges(images, tmp_path):
    base_dir = tmp_path / "base"
    base = Trainer(_config(images, base_dir, steps=2))
    base.run()
    base.write_model()
    init = base_dir / "flow_unet.safetensors"
    cfg = _config(images, tmp_path / "lora", steps=3, lora_rank=2, init_unet=str(init))
    cfg.phases = {"flow": cfg.phases["flow"]}
    trainer = Trainer(cfg)
    trainer.run()
    base_unet = {k[len("unet."):]: v for k, v in load_file(str(init)).items() if k.startswith("unet.")}
    for name, value in trainer.flow.unet.named_parameters():
        if name.endswith(".up"):
            assert value.abs().sum() > 0, f"LoRA factor {name} did not train"
        elif name.endswith(".original"):
            key = name.replace(".parametrizations.weight.original", ".weight")
            assert torch.equal(value, base_unet[key]), f"frozen base weight {key} changed"
        elif "parametrizations" not in name:
            assert torch.equal(value, base_unet[name]), f"frozen base weight {name} changed"
    out = trainer.write_model()
    merged = load_file(str(out / "flow_unet.safetensors"))
    assert not any("parametrizations" in k or "lora" in k for k in merged)
    assert json.loads((out / "model.json").read_text())["card"]["objectives"]["flow"].endswith("frozen base UNet")
    # The merged weights compute what the LoRA-wrapped network computes.

    pipe = build_pipeline(out)
    x = torch.randn(1, 4, 8, 8)
    c = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500.0])
    ctx = trainer.null_context
    with torch.no_grad():
        torch.testing.assert_close(pipe.stages["flow_unet"](x, t, c, ctx), trainer.flow(x, t, c, ctx), rtol=1e-4, atol=1e-5)


def test_lora_merge_is_exact_on_a_linear_layer():
    layer = torch.nn.Sequential()
    block = torch.nn.Module()
    block.attn1 = torch.nn.Module()
    block.attn1.to_q = torch.nn.Linear(6, 5)
    layer.add_module("blk", block)
    factors = inject_lora(layer, rank=2, seed=0)
    assert len(factors) == 2 and not layer.blk.attn1.to_q.parametrizations.weight.original.requires_grad
    with torch.no_grad():
        factors[1].normal_()
    x = torch.randn(3, 6)
    before = layer.blk.attn1.to_q(x)
    assert merge_lora(layer) == 1
    torch.testing.assert_close(layer.blk.attn1.to_q(x), before)


def test_rectified_flow_conventions():
    x_0, x_T = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([1.0, 0.25, 1e-9])
    x_t, v = losses.rectified_flow_inputs(x_0, x_T, t)
    torch.testing.assert_close(x_t[0], x_T[0])  # t = 1 is pure noise
    torch.testing.assert_close(x_t[1], 0.25 * x_T[1] + 0.75 * x_0[1])
    torch.testing.assert_close(x_t[2], x_0[2])  # t -> 0 is data
    torch.testing.assert_close(v, x_0 - x_T)
    # An Euler step of size t along v from x_t lands on x_0.
    torch.testing.assert_close(x_t[1] + 0.25 * v[1], x_0[1])
    ts = losses.sample_time(10_000, torch.Generator().manual_seed(0)) * losses.T_SCALE
    assert 1.0 - 1e-4 <= float(ts.min()) and float(ts.max()) <= 999.0
    assert abs(float(ts.mean()) - 500.0) < 15
    zero = torch.zeros(2, 4, 3, 3)
    assert float(losses.kl_divergence(zero, zero)) == 0.0


def test_content_rescale_reaches_the_crops_and_the_checkpoint_fingerprint(images, tmp_path):
    default = Trainer(_config(images, tmp_path / "a"))
    wide = Trainer(_config(images, tmp_path / "b", rescale=(0.25, 1.0)))
    assert default._sampler().rescale == (0.5, 1.0) and wide._sampler().rescale == (0.25, 1.0)
    # The default stays out of the fingerprint (checkpoints written before the option resume); another range is in it.
    assert "rescale" not in json.loads(default.phase_fingerprint("swinir"))["common"]
    assert json.loads(wide.phase_fingerprint("vae"))["common"]["rescale"] == [0.25, 1.0]
    assert default.phase_fingerprint("flow") != wide.phase_fingerprint("flow")
