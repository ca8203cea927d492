"""The shipped demo model (models/demo): small, loadable, and better than bicubic on held-out pictures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flowie import metrics
from flowie.modeldir import DEMO_MODEL_DIR, WEIGHT_FILES, read_model_dir

MAX_BYTES = 25 * 1024 * 1024


def _require_demo():
    if not (DEMO_MODEL_DIR / "model.json").is_file():
        pytest.fail(f"the bundled demo model is missing from {DEMO_MODEL_DIR}; train it (docs/DEMO_MODEL.md)")
    return read_model_dir(DEMO_MODEL_DIR)


def _held_out_crop(size: int = 128) -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    from flowie.train.data import SKIMAGE_HOLDOUT

    assert "coffee" in SKIMAGE_HOLDOUT, "this test must use an image the demo never trained on"
    img = skdata.coffee()  # held out: never seen in training
    y, x = 140, 260  # the cup's rim and saucer: edges and texture
    return np.ascontiguousarray(img[y : y + size, x : x + size])


def test_demo_model_is_complete_and_at_most_25_mb():
    info = _require_demo()
    files = [p for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= MAX_BYTES, f"models/demo is {total / 2**20:.1f} MiB (limit 25 MB)"
    assert {p.name for p in files} == {"model.json", *(f"{s}.safetensors" for s in WEIGHT_FILES)}
    card = info.meta["card"]
    assert card["training"]["phases"]["flow"]["steps_done"] > 0
    assert "coffee" in card["data"]["split"] and "metrics" in card


def test_demo_model_restores_a_held_out_crop_better_than_bicubic():
    from flowie.params import EnhanceParams
    from flowie.pipeline import Pipeline
    from flowie.train.degrade import degrade_uint8

    _require_demo()
    clean = _held_out_crop()
    lq = degrade_uint8(clean, "x4_bar", seed=0)
    bicubic = np.asarray(Image.fromarray(lq).resize(clean.shape[1::-1], Image.Resampling.BICUBIC))
    pipe = Pipeline.from_model_dir(DEMO_MODEL_DIR)
    restored = pipe.enhance([lq], EnhanceParams(upscale=4.0), seeds=[0])[0]  # the model's defaults
    base = metrics.psnr(bicubic, clean, crop_border=4)
    full = metrics.psnr(restored.image, clean, crop_border=4)
    stage1 = metrics.psnr(restored.restored, clean, crop_border=4)
    assert stage1 > base, f"SwinIR {stage1:.2f} dB vs bicubic {base:.2f} dB"
    assert full > base, f"full pipeline {full:.2f} dB vs bicubic {base:.2f} dB"


def test_flowie_enhance_uses_the_demo_model_by_default(tmp_path):
    from service.cli import main

    _require_demo()
    src = tmp_path / "in.png"
    Image.fromarray(_held_out_crop(48)).save(src)
    out = tmp_path / "out"
    assert main(["enhance", str(src), "-o", str(out), "--seed", "1"]) == 0
    with Image.open(out / "in.png") as result:
        assert result.size == (48, 48)
