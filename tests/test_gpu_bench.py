"""loadtests/gpu_bench: the GPU benchmark runs on the CPU with --tiny, through the served factory,
and writes complete, finite results; what cannot run on a CPU is skipped with the reason."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["swinir", "cond_encoder", "flow_unet", "vae_decoder"]


def _strict_json(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _bench(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtests.gpu_bench", "--tiny", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    proc = _bench(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return _strict_json((out / "gpu_bench.json").read_text()), out


def test_tiny_run_runs_every_section_and_says_why_bf16_cannot_run_on_the_cpu(tiny_run):
    data, _ = tiny_run
    status = {s["name"]: s["status"] for s in data["sections"]}
    assert status == {"env": "done", "peak": "done", "configs.fp32": "done", "configs.served_eager": "done",
                      "configs.bf16": "skipped", "configs.channels_last": "done", "warmup": "done"}
    [bf16] = [s for s in data["sections"] if s["name"] == "configs.bf16"]
    assert "float32 on the CPU" in bf16["reason"]
    assert data["env"]["device"] == "cpu" and data["env"]["torch"] == torch.__version__
    assert "--tiny" in data["env"]["command"] and data["env"]["date_utc"].startswith("20")


def test_tiny_run_measures_the_cards_ceilings_and_counts_flops_per_stage(tiny_run):
    data, _ = tiny_run
    peak = data["peak"]
    assert set(peak["matmul_tflops"]) == {"fp32"} and peak["matmul_tflops"]["fp32"] > 0
    assert peak["copy_gb_per_s"] > 0
    assert sorted(peak["flops"]["per_stage_batch1"]) == sorted(STAGES)
    assert all(v["flops"] > 0 for v in peak["flops"]["per_stage_batch1"].values())


def test_each_configuration_serves_the_asked_size_at_every_batch(tiny_run):
    data, _ = tiny_run
    for name in ("fp32", "served_eager", "channels_last"):
        for workload in ("bfr", "bsr"):
            rows = data["configs"][name]["workloads"][workload]
            assert set(rows) == {"1", "2"}, (name, workload)
            for row in rows.values():
                assert row["status"] == "done" and row["reps"] >= 1 and len(row["first_calls_ms"]) == 2
                assert row["answer_shape"] == [128, 128, 3]
                assert set(row["stages_ms"]) == {*STAGES, "colour_fix", "total"}
                assert row["batch_ms"] > 0 and row["encode_png_batch_ms"] > 0
                # same seeds, same bits on a CPU: a wrong seed or image order would show here
                assert row["repeat"]["exact"], (name, workload, row["repeat"])


def test_configurations_are_the_factorys_and_are_checked_against_fp32(tiny_run):
    data, _ = tiny_run
    configs = data["configs"]
    assert configs["fp32"]["engine"]["dtype"] == "float32" and configs["fp32"]["engine"]["cuda_graphs"] is False
    assert configs["channels_last"]["engine"]["channels_last"] == STAGES
    assert all("vs_fp32" not in row for rows in configs["fp32"]["workloads"].values() for row in rows.values())
    for rows in configs["served_eager"]["workloads"].values():  # on a CPU the served config is fp32's networks
        assert all(row["vs_fp32"]["exact"] for row in rows.values())
    for rows in configs["channels_last"]["workloads"].values():  # another memory layout: close, not the same
        for row in rows.values():
            assert row["vs_fp32"]["ok"] and row["vs_fp32"]["nonfinite"] == 0 and row["vs_fp32"]["psnr_db"] > 40


def test_the_warmup_section_runs_the_real_worker_on_sizes_it_never_saw(tiny_run):
    data, _ = tiny_run
    warmup = data["warmup"]
    assert warmup["warm_up"]["s"] > 0
    assert [(r["shape"], r["batch"]) for r in warmup["phases"]] == [
        ([256, 320], 1), ([192, 128], 2), ([256, 320], 1), ([128, 128], 1)]
    assert all(state == "done" for r in warmup["phases"] for state in r["states"])


def test_tiny_run_writes_a_model_directory_and_a_table(tiny_run, fixture_dir):
    from flowie.convert import load_config, parse_config
    from flowie.modeldir import read_model_dir
    from loadtests.gpu_bench.model import TINY_CONFIG

    data, out = tiny_run
    assert read_model_dir(data["model_dir"]).meta["task"] == "bfr"
    assert parse_config(TINY_CONFIG) == parse_config(load_config(fixture_dir / "model_config.yaml"))
    table = (out / "gpu_bench_table.txt").read_text()
    assert "anchor" in table and "channels_last" in table and "bf16" not in table


def test_full_size_networks_have_the_official_parameter_counts():
    """bfr_v1 built on the meta device (no memory): SwinIR 15.8 M, flow UNet + ControlNet 1229 M."""
    from loadtests.gpu_bench.peak import stage_flops

    rec: dict = {}
    stage_flops(rec, "bfr_v1", 512)
    params = {s: v["params"] / 1e6 for s, v in rec["per_stage_batch1"].items()}
    assert params["swinir"] == pytest.approx(15.8, abs=0.05)
    assert params["flow_unet"] == pytest.approx(1229.1, abs=0.1)


def test_no_section_starts_after_the_time_limit(tmp_path):
    proc = _bench(tmp_path, "--time-limit-s", "0", "--configs", "fp32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = _strict_json((tmp_path / "gpu_bench.json").read_text())
    assert [(s["name"], s["status"], s["reason"]) for s in data["sections"]] == [
        (name, "skipped", "time limit reached") for name in ("env", "peak", "configs.fp32", "warmup")]


def test_unknown_configuration_is_refused():
    proc = subprocess.run([sys.executable, "-m", "loadtests.gpu_bench", "--configs", "fp32,fast"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "unknown configuration fast" in proc.stderr


def test_psnr_of_clamped_images():
    from loadtests.gpu_bench.report import psnr_db

    ref = torch.full((1, 3, 4, 4), 0.5)
    assert psnr_db(ref.clone(), ref)["exact"]
    assert psnr_db(ref + 0.01, ref)["psnr_db"] == pytest.approx(40.0, abs=1e-3)
    assert psnr_db(ref + 0.001, ref)["ok"] and not psnr_db(ref + 0.1, ref)["ok"]
    assert psnr_db(ref + 2.0, ref)["psnr_db"] == pytest.approx(10 * math.log10(1 / 0.25), abs=1e-3)  # clamped
    nan = ref.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert psnr_db(nan, ref) == {"nonfinite": 1, "exact": False, "psnr_db": None, "ok": False}
