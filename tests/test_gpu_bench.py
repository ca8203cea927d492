"""loadtests/gpu_bench.py: the GPU pipeline benchmark runs on the CPU with --tiny and writes
complete, finite results; its CUDA-only sections say why they were skipped."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "loadtests" / "gpu_bench.py"
BATCHES = ("1", "2")


def _load_bench():
    """The script as a module (loadtests/ is not an installed package)."""
    if "flowie_gpu_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("flowie_gpu_bench", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["flowie_gpu_bench"]


def _strict_json(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return _strict_json((out / "gpu_bench.json").read_text()), proc.stdout, out


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_run_records_the_machine_and_its_measured_ceilings(tiny_run):
    data, _, _ = tiny_run
    meta = data["meta"]
    assert data["schema"] == "flowie-gpu-bench/1"
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert "--tiny" in meta["command"] and meta["date_utc"]
    assert meta["defaults"]["float32_matmul_precision"]
    rates = data["peak"]["matmul_tflops"]
    assert rates and all(_positive(v) for v in rates.values())
    assert _positive(data["peak"]["copy_gb_per_s"])


def test_tiny_run_counts_flops_per_stage_and_the_floor(tiny_run):
    data, _, _ = tiny_run
    per_stage = data["flops"]["per_stage_batch1"]
    for name in ("swinir", "cond_encoder", "flow_unet", "vae_decoder"):
        assert _positive(per_stage[name]["flops"]) and _positive(per_stage[name]["params"]), name
    per_image = data["flops"]["per_image"]
    expected_bfr = sum(per_stage[s]["flops"] for s in ("swinir", "cond_encoder", "vae_decoder", "colour_fix")) \
        + 4 * per_stage["flow_unet"]["flops"]
    assert per_image["bfr"] == expected_bfr
    assert per_image["bsr"] < per_image["bfr"] < per_image["diffbir"]
    floor = data["flops"]["floor"]["ms_per_img"]
    assert all(_positive(floor[wl][b]) for wl in ("bfr", "bsr", "swinir") for b in BATCHES)


def test_tiny_run_times_every_workload_at_every_batch(tiny_run):
    data, _, _ = tiny_run
    for mode in ("fp32_eager", "bf16_eager"):
        workloads = data["modes"][mode]["workloads"]
        for wl in ("bfr", "bsr", "swinir"):
            for b in BATCHES:
                entry = workloads[wl][b]
                assert entry["status"] == "done", (mode, wl, b, entry)
                for key in ("batch_ms", "ms_per_img", "img_per_s", "tflops"):
                    assert _positive(entry[key]), (mode, wl, b, key)
                assert entry["reps"] >= 1
        stages = workloads["bfr"]["1"]["stages_ms"]
        assert {"swinir", "cond_encoder", "eval1", "eval4", "vae_decoder", "colour_fix"} <= set(stages)
        assert all(_positive(v) for v in stages.values())
        assert workloads["diffbir"]["1"]["status"] == "done" and _positive(workloads["diffbir"]["1"]["batch_ms"])
        assert _positive(workloads["diffbir"]["2"]["derived"]["batch_ms"])


def test_fast_modes_are_checked_against_fp32_on_the_same_inputs(tiny_run):
    data, _, _ = tiny_run
    ref = data["modes"]["fp32_eager"]["workloads"]["bfr"]["2"]["check"]
    assert ref["repeat"]["exact"] or ref["repeat"]["psnr_db"] > 80
    for wl in ("bfr", "bsr"):
        check = data["modes"]["bf16_eager"]["workloads"][wl]["2"]["check"]["vs_fp32"]
        assert check["nonfinite"] == 0
        assert math.isfinite(check["psnr_db"]) and check["psnr_db"] > 20, check
        assert check["ok"] == (check["psnr_db"] >= 40)


def test_cuda_only_sections_are_skipped_with_a_reason(tiny_run):
    data, _, _ = tiny_run
    sections = {s["name"]: s for s in data["sections"]}
    assert all(s["status"] != "error" for s in sections.values()), [s for s in sections.values() if s["status"] == "error"]
    for name in ("env", "peak", "build", "fp32_eager", "bf16_eager"):
        assert sections[name]["status"] == "done", sections[name]
    cuda_only = [n for n in sections if n.endswith(("_graphs", "_compile")) or n in ("fp32_tf32_eager", "unet_max_autotune")]
    assert len(cuda_only) >= 5
    for name in cuda_only:
        assert sections[name]["status"] == "skipped" and sections[name]["reason"], sections[name]


def test_the_cudnn_benchmark_ab_mode_runs_only_its_batches_and_no_diffbir(tiny_run):
    data, _, _ = tiny_run
    [name] = [n for n in data["modes"] if n.endswith("_eager_nobench")]
    mode = data["modes"][name]
    assert mode["settings"]["cudnn_benchmark"] is False and mode["settings"]["batches"] == [1, 2]
    for workload in ("bfr", "bsr", "swinir"):
        assert {b: e["status"] for b, e in mode["workloads"][workload].items()} == {"1": "done", "2": "done"}
    assert mode["workloads"]["diffbir"]["1"]["status"] == "skipped"
    assert "A/B" in mode["workloads"]["diffbir"]["1"]["reason"]


def test_the_control_stream_modes_run_the_flow_workloads_and_leave_the_flag_off_after(tiny_run):
    """FLOWIE_CONTROL_STREAM's A/B: eager at the smallest and largest batch (run here, where the flag
    is inert), the CUDA-graph one skipped off CUDA; the modes after it run with the flag cleared."""
    data, _, _ = tiny_run
    [eager] = [n for n in data["modes"] if n.endswith("_eager_cs")]
    mode = data["modes"][eager]
    assert mode["settings"]["control_stream"] is True and mode["settings"]["batches"] == [1, 2]
    assert set(mode["workloads"]) == {"bfr", "bsr", "diffbir"}  # SwinIR alone has no ControlNet
    for workload in ("bfr", "bsr"):
        assert {b: e["status"] for b, e in mode["workloads"][workload].items()} == {"1": "done", "2": "done"}
    assert mode["workloads"]["bfr"]["2"]["check"]["vs_fp32"]["ok"]
    sections = {s["name"]: s for s in data["sections"]}
    [graphed] = [n for n in sections if n.endswith("_graphs_cs")]
    assert sections[graphed]["status"] == "skipped" and "CUDA" in sections[graphed]["reason"]
    assert all(m["settings"].get("control_stream") in (False, None) for n, m in data["modes"].items() if n != eager)


def test_tiny_run_prints_one_table_and_saves_it(tiny_run):
    _, stdout, out = tiny_run
    assert stdout.count("FlowIE gpu_bench") == 1
    table = (out / "gpu_bench_table.txt").read_text()
    assert "fp32_eager" in table and "bf16_eager" in table and "TINY" in table


def test_embedded_tiny_config_is_the_reference_tiny_config(fixture_dir):
    from flowie.convert import load_config, parse_config

    bench = _load_bench()
    assert parse_config(bench.TINY_CONFIG) == parse_config(load_config(fixture_dir / "model_config.yaml"))


def test_prebuilt_colour_fix_computes_the_library_colour_fix():
    from flowie.colorfix import wavelet_color_fix

    bench = _load_bench()
    gen = torch.Generator().manual_seed(3)
    content, style = torch.rand(2, 3, 48, 40, generator=gen), torch.rand(2, 3, 48, 40, generator=gen)
    fixed = bench.WaveletColourFix(torch.device("cpu"))(content, style)
    torch.testing.assert_close(fixed, wavelet_color_fix(content, style), rtol=0, atol=1e-6)


def test_psnr_of_clamped_images():
    bench = _load_bench()
    ref = torch.full((1, 3, 4, 4), 0.5)
    assert bench.psnr_db(ref.clone(), ref)["exact"]
    assert bench.psnr_db(ref + 0.01, ref)["psnr_db"] == pytest.approx(40.0, abs=1e-3)
    assert bench.psnr_db(ref + 0.001, ref)["ok"] and not bench.psnr_db(ref + 0.1, ref)["ok"]
    assert bench.psnr_db(ref + 2.0, ref)["psnr_db"] == pytest.approx(10 * math.log10(1 / 0.25), abs=1e-3)  # clamped
    nan = ref.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert bench.psnr_db(nan, ref) == {"nonfinite": 1, "exact": False, "psnr_db": None, "ok": False}


def test_tiny_run_measures_the_pipeline_against_image_size(tiny_run):
    data, _, out = tiny_run
    sections = {s["name"]: s for s in data["sections"]}
    assert sections["scaling"]["status"] == "done", sections["scaling"]
    rows = data["scaling"]["rows"]
    assert data["scaling"]["warmup_s"] > 0  # first-call costs stay out of the first timed row
    assert data["scaling"]["warmup_tile_rows"] == data["scaling"]["tile_batches"]["streamed_tiles2"] == 2
    assert data["scaling"]["tile_batches"] == {"streamed": 1, "streamed_tiles2": 2, "batch": 1}
    assert [(r["h"], r["w"]) for r in rows] == [(576, 64), (1088, 64)]
    for row in rows:
        for path in ("streamed", "streamed_tiles2", "batch"):
            assert row[path]["s"] > 0 and row[path]["stages_s"]["vae_decoder"] > 0, row
            assert "peak_mib" not in row[path]  # device memory is read on CUDA only
    assert "scaling (float32, one step, tiles)" in (out / "gpu_bench_table.txt").read_text()


def test_tiny_run_measures_the_service_path_on_the_engines(tiny_run):
    data, _, out = tiny_run
    sections = {s["name"]: s for s in data["sections"]}
    assert sections["service"]["status"] == "done", sections["service"]
    service = data["service"]
    assert service["engine_options"] == {"cuda_graphs": False, "cudnn_benchmark": False, "control_stream": False,
                                         "compiled": []}  # a CPU
    for workload in ("bfr", "bsr"):
        rows = service["workloads"][workload]
        assert set(rows) == {"1", "2"}
        for b, row in rows.items():
            assert row["status"] == "done" and row["batch_ms"] > 0 and row["reps"] >= 1
            assert row["img_per_s"] == pytest.approx(int(b) / (row["batch_ms"] / 1000))
            assert row["stages_ms"]["flow_unet"] > 0 and row["stages_ms"]["vae_decoder"] > 0
            assert row["encode_png_batch_ms"] > 0
            assert row["img_per_s_with_encode"] == pytest.approx(
                int(b) / ((row["batch_ms"] + row["encode_png_batch_ms"]) / 1000))
            assert len(row["first_calls_ms"]) == 2 and min(row["first_calls_ms"]) > 0
            # the answers against fp32 engines' answers to the same requests (here the same engines:
            # a wrong image, seed or order would show as a low PSNR)
            check = row["vs_fp32"]
            assert check["ok"] is True and check["nonfinite"] == 0
            assert check["exact"] or check["psnr_db"] >= 60, check
    # mean-value makes 4 evaluations, one-step 1: the flow takes longer in the BFR run
    assert service["workloads"]["bfr"]["1"]["stages_ms"]["flow_unet"] > service["workloads"]["bsr"]["1"]["stages_ms"]["flow_unet"]
    assert "service path (Pipeline.enhance on float32 engines" in (out / "gpu_bench_table.txt").read_text()
    # The real worker on that pipeline, answers encoded before / while the next batch computes.
    worker = service["worker"]
    assert set(worker) == {"1", "2"}
    for b, row in worker.items():
        assert row["status"] == "done" and row["jobs"] == 6 * int(b)
        assert [r["encode_overlap"] for r in row["runs"]] == [False, True, False, True]
        assert all(r["batches"] == 6 and r["median_encode_ms_per_batch"] > 0 for r in row["runs"])
        assert row["ratio_on_off"] == pytest.approx(row["img_per_s"]["on"] / row["img_per_s"]["off"])
    assert "img/s with answers encoded before / while" in (out / "gpu_bench_table.txt").read_text()


def test_stage_runner_moves_inputs_to_its_module_device():
    """The streamed path's cond encoder reads tiles from host RAM; on a GPU the bench's stage
    wrapper must move them to the card, as the service's engines do. The meta device stands in for
    a card here: a CPU input reaches a meta-device convolution only if the wrapper moved it."""
    bench = _load_bench()
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, device="meta")
    runner = bench.StageRunner(conv, torch.float32, channels_last=False)
    out = runner(torch.zeros(1, 3, 8, 8))
    assert out.device.type == "meta"
    assert tuple(out.shape) == (1, 4, 8, 8)


def test_service_compile_stages_take_the_settings_words_or_a_stage_list():
    bench = _load_bench()
    assert bench.parse_args(["--tiny"]).service_compile_stages == ["swinir", "cond_encoder", "flow_unet", "vae_decoder"]
    assert bench.parse_args(["--tiny", "--service-compile-stages", "all"]).service_compile_stages == [
        "swinir", "cond_encoder", "flow_unet", "vae_decoder"]
    assert bench.parse_args(["--tiny", "--service-compile-stages", "swinir, flow_unet"]).service_compile_stages == [
        "swinir", "flow_unet"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--service-compile-stages", "unet"])
