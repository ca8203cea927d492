"""`flowie train --minutes` (a phase cut to its time budget) and `--bf16` (autocast) on tiny networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowie.train.budget import StepBudget
from flowie.train.trainer import ARCHS, PHASES, PhaseConfig, TrainConfig, Trainer
from tests.test_train import _write_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("budget_images"))


def _config(images, out, phases: dict[str, PhaseConfig], **kw) -> TrainConfig:
    swinir, vae, unet = ARCHS["tiny"]
    return TrainConfig(out=str(out), images=str(images), phases=phases, swinir=swinir, vae=vae, unet=unet,
                       checkpoint_every=1000, threads=1, work_scale=(1.0, 1.0), defaults={"min_side": 0}, seed=3, **kw)


def test_a_budget_fits_the_step_count_to_the_measured_speed():
    # 1 s of set-up, a first step of 0.5 s, then 0.1 s a step, 10 s in all: 1 + (10 - 1.5) / 0.1 = 86 steps.
    budget = StepBudget(seconds=10.0, started=0.0, steps=100_000)
    now, done, total = 1.0, 0, 100_000
    while done < total:
        now += 0.5 if done == 0 else 0.1
        done += 1
        total = budget.fit(done, now)
    assert 85 <= done <= 87, done
    assert now <= 10.0 + 0.1 + 1e-9


def test_a_budget_never_asks_for_more_steps_than_given():
    budget = StepBudget(seconds=3600.0, started=0.0, steps=30)
    totals = [budget.fit(done, done * 0.01) for done in range(1, 31)]
    assert max(totals) == 30 and totals[-1] == 30


def test_a_phase_with_minutes_stops_early_and_the_card_says_so(images, tmp_path):
    phases = {"swinir": PhaseConfig(steps=100_000, batch=1, crop=64, lr=1e-3, warmup=1, minutes=1.5 / 60)}
    cfg = _config(images, tmp_path / "m", phases)
    trainer = Trainer(cfg)
    trainer.run()
    done = trainer.history["swinir"]["steps"]
    assert 6 <= done < 100_000
    assert trainer.history["swinir"]["seconds"] < 1.5 + 1.0
    card = trainer.model_card()["training"]["phases"]["swinir"]
    assert card["steps_done"] == done and card["minutes"] == pytest.approx(0.025)
    # Resuming a phase its budget ended counts it as finished: no step more.
    again = Trainer(cfg)
    again.run(resume=True)
    assert again.done == ["swinir"] and again.history["swinir"]["steps"] == done


def test_minutes_are_not_part_of_the_checkpoint_fingerprint(images, tmp_path):
    a = _config(images, tmp_path / "a", {"vae": PhaseConfig(steps=4, minutes=0.0)})
    b = _config(images, tmp_path / "a", {"vae": PhaseConfig(steps=4, minutes=3.0)}, bf16=True)
    assert Trainer(a).phase_fingerprint("vae") == Trainer(b).phase_fingerprint("vae")


def test_bf16_autocast_trains_every_phase_and_writes_float32_weights(images, tmp_path):
    def run(bf16: bool) -> tuple[Trainer, dict[str, list[float]]]:
        phases = {p: PhaseConfig(steps=3, batch=2, crop=64, lr=1e-3, warmup=1) for p in PHASES}
        trainer = Trainer(_config(images, tmp_path / f"bf16-{bf16}", phases, bf16=bf16, flow_bank=4))
        seen: dict[str, list[float]] = {p: [] for p in PHASES}
        trainer.progress = lambda phase, step, total, ema: seen.setdefault(phase, []).append(ema.get("loss", np.nan))
        trainer.run()
        return trainer, seen

    fp32, fp32_losses = run(False)
    bf16, bf16_losses = run(True)
    for phase in PHASES:
        a, b = np.array(fp32_losses[phase]), np.array(bf16_losses[phase])
        assert len(b) == 3 and np.all(np.isfinite(b)), phase
        # Autocast ran (bf16 rounding moves the losses) and stayed close to float32.
        np.testing.assert_allclose(b, a, rtol=0.1, err_msg=phase)
    assert any(not np.array_equal(fp32_losses[p], bf16_losses[p]) for p in PHASES)
    assert all(t.dtype == torch.float32 for t in bf16.stage_state_dicts()["swinir"].values())
    assert bf16.model_card()["training"]["bf16"] is True


def test_flowie_train_cli_takes_minutes_per_phase_and_bf16(images, tmp_path):
    from flowie.modeldir import read_model_dir
    from service.cli import main

    out = tmp_path / "model"
    argv = ["train", "--images", str(images), "--out", str(out), "--arch", "tiny", "--steps", "swinir=100000,vae=2,cond=2,flow=2",
            "--minutes", "swinir=0.02", "--bf16", "--batch", "1", "--crop", "64", "--threads", "1", "--min-side", "0",
            "--work-scale", "1,1", "--flow-bank", "4"]
    assert main(argv) == 0
    phases = read_model_dir(out).meta["card"]["training"]["phases"]
    assert 1 <= phases["swinir"]["steps_done"] < 100_000 and phases["swinir"]["minutes"] == 0.02
    assert [phases[p]["steps_done"] for p in ("vae", "cond_encoder", "flow")] == [2, 2, 2]
    assert read_model_dir(out).meta["card"]["training"]["bf16"] is True


def test_minutes_are_refused_with_the_full_recipe(tmp_path, capsys):
    from service.cli import main

    assert main(["train", "--arch", "full", "--init", str(tmp_path), "--out", str(tmp_path / "o"), "--minutes", "3"]) == 2
    assert "--minutes is for the demo and tiny architectures" in capsys.readouterr().err
