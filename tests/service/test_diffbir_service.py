"""A DiffBIR (diffusion) model served beside a FlowIE (flow) model in one `flowie serve` process.

Each model answers its own samplers; asking one for the other family's sampler is a 422 that
names the samplers the model supports; /models lists each model's family, samplers and defaults.
"""

from __future__ import annotations

import httpx
from svc_helpers import FAST, flowie, free_port, png, stop, wait_http


def test_a_diffbir_model_is_served_next_to_a_flowie_model(tiny_model_dir, tiny_diffbir_model_dir, tmp_path):
    port = free_port()
    process = flowie(["serve", "--model", str(tiny_model_dir), "--model", str(tiny_diffbir_model_dir),
                      "--port", str(port)], tmp_path / "serve.log", OMP_NUM_THREADS="1")
    base = f"http://127.0.0.1:{port}"
    image = {"image": ("a.png", png(), "image/png")}
    try:
        wait_http(f"{base}/readyz", timeout=120, process=process)
        listed = {m["task"]: m for m in httpx.get(f"{base}/models", timeout=10).json()["models"]}
        assert listed["diffbir"]["family"] == "diffbir"
        assert listed["diffbir"]["samplers"] == ["ddpm", "ddim", "dpm_solver", "restore_only"]
        assert listed["diffbir"]["defaults"]["sampler"] == "ddpm"
        assert listed["bfr"]["samplers"] == ["mean_value", "euler", "one_step", "restore_only"]

        for task, sampler in (("diffbir", "dpm_solver"), ("bfr", "mean_value")):
            ok = httpx.post(f"{base}/enhance", files=image, timeout=60,
                            data={**FAST, "task": task, "sampler": sampler, "steps": "2"})
            assert ok.status_code == 200 and ok.headers["content-type"] == "image/png", ok.text

        for task, sampler, names in (("diffbir", "mean_value", "ddpm, ddim, dpm_solver"),
                                     ("bfr", "ddpm", "mean_value, euler, one_step")):
            bad = httpx.post(f"{base}/enhance", files=image, timeout=60, data={**FAST, "task": task, "sampler": sampler})
            assert bad.status_code == 422, bad.text
            assert bad.headers["content-type"].startswith("application/problem+json")
            assert names in bad.json()["detail"]
    finally:
        stop(process)
