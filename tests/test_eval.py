"""`flowie eval`: every method measured the same way, table / JSON / grid written, paired LQ folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines import build_pipeline
from flowie import evaluate as ev
from flowie import metrics
from flowie.train.data import NamedImage


@pytest.fixture(autouse=True)
def _pillow_default_bomb_limit(monkeypatch):
    """Tests that build the service app leave Pillow's process-wide limit lowered; grids are no bombs."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1 << 28)


def _clean(size: int = 128, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.stack([np.sin(xx / 7) * 0.4 + 0.5, yy / size, np.cos((xx - yy) / 11) * 0.4 + 0.5], -1)
    img += np.random.default_rng(seed).normal(0, 0.02, img.shape)
    return (img.clip(0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval_clean")
    Image.fromarray(_clean(128, 0)).save(folder / "one.png")
    return folder


def test_mean_value_and_euler_get_the_same_number_of_evaluations():
    methods = {m.name: m for m in ev.default_methods()}
    assert list(methods) == ["input", "swinir", "mean_value", "euler", "one_step"]
    assert methods["mean_value"].evaluations == methods["euler"].evaluations == 4
    assert methods["one_step"].evaluations == 1


def test_evaluate_measures_every_method_and_writes_table_json_and_grid(tiny_model_dir, tmp_path):

    pipe = build_pipeline(tiny_model_dir)
    items, degradation = ev.make_items([NamedImage("one", _clean(128, 0))], preset="x4_bar", seed=3)
    assert items[0].lq.shape == (32, 32, 3) and items[0].scale == 4.0
    report, outputs = ev.evaluate(pipe, items, degradation, seed=0, overrides={"min_side": 0})
    per = report.per_image["one"]
    assert set(per) == {"input", "swinir", "mean_value", "euler", "one_step"}
    # The input column is exactly the bicubic upscale of the degraded image, border crop = scale.
    expected = metrics.psnr(ev.bicubic_up(items[0].lq, (128, 128)), items[0].clean, crop_border=4)
    assert per["input"]["psnr_rgb"] == pytest.approx(expected)
    assert report.settings["crop_border"] == 4
    # The samplers really differ (same noise, different schedules).
    assert not np.array_equal(outputs["one"]["mean_value"], outputs["one"]["euler"])
    md = report.markdown()
    assert "| degraded input (bicubic) |" in md and "full: Euler-4 (4 NFE)" in md
    assert "LPIPS / FID / MANIQA: not computed" in md
    bar = report.bar()
    assert bar["default_sampler"] == "mean_value"  # the tiny model's default
    assert bar["gain_over_input_db"] == pytest.approx(per["mean_value"]["psnr_rgb"] - per["input"]["psnr_rgb"], abs=1e-3)
    assert bar["swinir_gain_db"] == pytest.approx(per["swinir"]["psnr_rgb"] - per["input"]["psnr_rgb"], abs=1e-3)
    assert "Bar: default pipeline (mean_value) - input = " in md
    paths = ev.write_outputs(report, outputs, tmp_path / "out", figure=tmp_path / "fig" / "grid.png")
    data = json.loads(paths["json"].read_text())
    assert data["mean"]["input"]["psnr_rgb"] == pytest.approx(expected, abs=1e-3)
    assert data["degradation"]["preset"] == "x4_bar" and data["degradation"]["jpeg_quality"] == 60
    with Image.open(paths["grid"]) as grid:
        assert grid.width == 6 * (256 + 4) + 4 and grid.height == 256 + 28 + 8
    assert (tmp_path / "fig" / "grid.png").is_file()


def test_paired_lq_folder_sets_the_scale_from_the_sizes(tmp_path):
    clean = _clean(128, 1)
    lq_dir = tmp_path / "lq"
    lq_dir.mkdir()
    Image.fromarray(clean[::2, ::2]).save(lq_dir / "pic.png")
    items, degradation = ev.make_items([NamedImage("pic", clean)], paired=lq_dir)
    assert items[0].scale == 2.0 and items[0].lq.shape == (64, 64, 3)
    assert degradation == {"paired": str(lq_dir)}
    with pytest.raises(ValueError, match="no LQ image named other"):
        ev.make_items([NamedImage("other", clean)], paired=lq_dir)


def test_flowie_eval_cli_records_the_results_in_the_model_card(tiny_model_dir, clean_folder, tmp_path):
    from service.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(model), "--images", str(clean_folder), "--out", str(out), "--min-side", "0",
            "--threads", "1", "--record-in-card", "--grid-crop", "64"]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "grid.png"}
    card = json.loads((model / "model.json").read_text())["card"]
    assert card["metrics"]["images"] == ["one"]
    assert set(card["metrics"]["mean"]) == {"input", "swinir", "mean_value", "euler", "one_step"}
    assert main(["eval", "--model", str(model), "--images", str(clean_folder), "--degradation", "nope"]) == 2


def _report(per_image: dict[str, dict[str, float]], sampler: str = "one_step") -> ev.EvalReport:
    report = ev.EvalReport(model="m", degradation={}, methods=ev.default_methods(),
                           settings={"defaults": {"sampler": sampler}})
    for name, psnrs in per_image.items():
        report.per_image[name] = {m: {"psnr_rgb": v, "ssim_rgb": 0.5, "psnr_y": v, "ssim_y": 0.5} for m, v in psnrs.items()}
    return report


def _row(inp, swinir, one_step, mean_value=0.0, euler=0.0):
    return {"input": inp, "swinir": swinir, "one_step": one_step, "mean_value": mean_value, "euler": euler}


def test_the_bar_is_the_default_sampler_and_swinir_over_bicubic():
    # +0.42 / +0.2 (mean +0.31), SwinIR +0.92 / +0.7 (mean +0.81): just over the bar.
    bar = _report({"a": _row(20.0, 20.92, 20.42), "b": _row(30.0, 30.7, 30.2)}).bar()
    assert bar["default_sampler"] == "one_step" and bar["passed"] is True
    got = (bar["gain_over_input_db"], bar["worst_image_gain_db"], bar["swinir_gain_db"])
    assert got == pytest.approx((0.31, 0.2, 0.81), abs=1e-6)
    # The mean is fine but one photo loses 0.4 dB.
    assert _report({"a": _row(20.0, 21.0, 21.0), "b": _row(30.0, 30.8, 29.6)}).bar()["passed"] is False
    # Only SwinIR falls short.
    assert _report({"a": _row(20.0, 20.7, 20.5), "b": _row(30.0, 30.7, 30.5)}).bar()["passed"] is False
    # Another default sampler is judged instead: mean-value here misses although one-step passes.
    assert _report({"a": _row(20.0, 21.0, 21.0, mean_value=19.0)}, sampler="mean_value").bar()["passed"] is False
