"""`flowie train --images`: package sources, joined sources, and starting every stage from a model directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowie.train.data import PACKAGE_SOURCES, load_images
from flowie.train.trainer import ARCHS, PHASES, PhaseConfig, TrainConfig, Trainer


def _fake_plasma_tree(root: Path) -> Path:
    """The layout of plasma-workspace-wallpapers: <Name>/contents/images/WxH.jpg, two renderings each."""
    spec = PACKAGE_SOURCES["plasma-photos"]
    rng = np.random.default_rng(0)
    for name in spec.names:
        folder = root / spec.folder / name / "contents" / "images"
        folder.mkdir(parents=True)
        for w, h in ((320, 200), (840, 820)):
            Image.fromarray(np.full((h, w, 3), rng.integers(256), np.uint8)).save(folder / f"{w}x{h}.jpg")
    return root


def test_plasma_photos_reads_the_largest_rendering_of_each_photo_shrunk(tmp_path):
    images = load_images(f"plasma-photos={_fake_plasma_tree(tmp_path)}")
    spec = PACKAGE_SOURCES["plasma-photos"]
    assert [im.name for im in images] == [f"{spec.package}:{n}/contents/images/840x820.jpg" for n in spec.names]
    assert {im.pixels.shape for im in images} == {(800, 820, 3)}  # short side 820 -> 800


def test_sources_join_with_plus_and_a_missing_package_says_what_to_install(tmp_path):
    folder = tmp_path / "own"
    folder.mkdir()
    Image.fromarray(np.full((90, 120, 3), 7, np.uint8)).save(folder / "a.png")
    joined = load_images(f"{folder}+{folder}")
    assert [im.name for im in joined] == ["a", "a"]
    with pytest.raises(ValueError, match="mate-backgrounds"):
        load_images(f"mate-photos={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="plasma-photos"):
        load_images("no-such-source")


def _tiny_config(images: Path, out: Path, **kw) -> TrainConfig:
    swinir, vae, unet = ARCHS["tiny"]
    phases = {p: PhaseConfig(steps=0, batch=2, crop=64, warmup=1) for p in PHASES}
    return TrainConfig(out=str(out), images=str(images), phases=phases, swinir=swinir, vae=vae, unet=unet,
                       threads=1, work_scale=(1.0, 1.5), defaults={"min_side": 0}, **kw)


def test_init_from_starts_every_stage_from_a_model_directory(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(images / "x.png")
    first = Trainer(_tiny_config(images, tmp_path / "first", seed=3))
    first.write_model()
    second = Trainer(_tiny_config(images, tmp_path / "second", seed=4, init_from=str(tmp_path / "first")))
    fresh = Trainer(_tiny_config(images, tmp_path / "fresh", seed=4))
    for name, module in second.modules().items():
        # The model directory has no VAE encoder: the cond encoder (a fine-tuned copy of it) starts it.
        source = first.modules()["cond_encoder" if name == "vae_encoder" else name]
        for key, value in module.state_dict().items():
            assert torch.equal(value, source.state_dict()[key]), f"{name}.{key}"
    assert not torch.equal(fresh.swinir.conv_first[1].weight, second.swinir.conv_first[1].weight)
    card = second.model_card()
    assert card["training"]["init_from"] == str(tmp_path / "first") and card["data"]["files"] == ["x"]
    with pytest.raises(ValueError, match="no swinir.safetensors"):
        Trainer(_tiny_config(images, tmp_path / "third", init_from=str(images)))
