"""A DiffBIR model through ONNX export and the onnxruntime back end reproduces the official images.

The flow_unet stage takes t as float32; the DDPM timesteps (999, 888, ...) reach it as those values,
which the sinusoidal embedding sees exactly as the official int64 timesteps.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from engines import EngineConfig, build_pipeline
from export.onnx import export_model
from flowie import imageops
from flowie.params import EnhanceParams


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_onnx_back_end_replays_the_official_short_run(tiny_diffbir_model_dir, diffbir_fixture_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_diffbir_model_dir, model_dir)
    export_model(model_dir)
    pipe = build_pipeline(model_dir, EngineConfig.for_device("cpu", backend="onnx"))
    assert pipe.backend == "onnx"
    inputs = diffbir_fixture_dir / "inputs"
    lq = imageops.images_to_tensor(list(np.load(inputs / "lq.npy")))
    out = pipe.run_batch(lq, EnhanceParams(sampler="ddpm", steps=10, color_fix="wavelet", tile="off"),
                         noise=torch.from_numpy(np.load(inputs / "x_T.npy")),
                         step_noise=torch.from_numpy(np.load(inputs / "noise_short.npy")))
    ours = imageops.tensor_to_uint8(out.image).astype(np.int16)
    official = np.load(diffbir_fixture_dir / "expected" / "short_wavelet_uint8.npy").astype(np.int16)
    diff = np.abs(ours - official)
    assert diff.max() <= 2 and float((diff > 1).mean()) <= 0.001, f"max {diff.max()}, {(diff > 0).mean():.4%} differ"
