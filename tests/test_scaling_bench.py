"""The image-size scaling benchmark (loadtests/scaling_bench.py) runs end to end on tiny sizes.

Structure and sanity only: performance is measured by the benchmark, never asserted here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "loadtests" / "scaling_bench.py"

pytestmark = pytest.mark.timeout(300)


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_image_shape_and_size_parsing():
    bench = _load_bench()
    for mp in (0.25, 0.5, 1, 4, 16):
        h, w = bench.image_shape(mp)
        assert h % 64 == 0 and w % 64 == 0
        assert 0.8 < h / w < 1.25
        assert abs(h * w / (mp * 1e6) - 1) < 0.15
    sizes = bench.parse_sizes("4,576x128,1")
    assert [s[1] * s[2] for s in sizes] == sorted(s[1] * s[2] for s in sizes)
    assert (None, 576, 128) in sizes
    for bad in ("0", "100x64", "abc", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_sizes(bad)


def test_a_fixed_mmap_threshold_turns_the_host_memory_setting_off():
    """--malloc-mmap-threshold sets glibc's threshold through the children's environment; the host
    memory setting's mallopt would replace it, so the two do not combine."""
    bench = _load_bench()
    assert bench.parse_args(["--model", "m"]).host_malloc == "auto"
    assert bench.parse_args(["--model", "m", "--malloc-mmap-threshold", "131072"]).host_malloc == "off"
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "m", "--malloc-mmap-threshold", "131072", "--host-malloc", "on"])


@pytest.mark.parametrize("path_args", [["--path", "streamed", "--spill-dir", "SPILL"], ["--path", "batch"]])
def test_scaling_bench_runs_on_tiny_sizes(tiny_model_dir, tmp_path, path_args):
    # Both sizes have a side > 512 px, so tiling engages (two pixel tiles, then three) while each
    # tile stays a thin 512 x 64 strip: cheap enough for the tiny model on a CPU.
    out = tmp_path / "scaling"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--sizes", "576x64,1088x64",
         "--sampler", "one_step", "--device", "cpu", "--threads", "1", "--no-warmup", "--out", str(out),
         *[str(tmp_path) if a == "SPILL" else a for a in path_args]],
        capture_output=True, text=True, env=env, timeout=280, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "memory" in proc.stdout and "time:" in proc.stdout  # the table and the claim lines

    report = json.loads((out / "scaling.json").read_text())
    assert (out / "scaling.png").stat().st_size > 1000
    assert report["sampler"] == "one_step" and report["tile"] == "on" and report["threads"] == 1
    rows = report["rows"]
    assert [(r["h"], r["w"]) for r in rows] == [(576, 64), (1088, 64)]
    assert {r["path"] for r in rows} == {path_args[1]}
    assert [p.name for p in tmp_path.iterdir()] == ["scaling"]  # no spill file left behind
    for row in rows:
        assert row["tiled"] is True
        for key in ("wall_s", "pixels", "seconds_per_megapixel", "peak_increase_bytes", "image_sized_bytes",
                    "working_bytes", "baseline_bytes"):
            assert _positive(row[key]), (key, row[key])
        assert _positive(row["cpu_s"])
        for stage in ("swinir", "cond_encoder", "flow_unet", "vae_decoder", "colour_fix"):
            assert _positive(row["stages"][stage]["seconds"]), stage
        assert row["stages"]["swinir"]["tile_calls"] >= 2  # tiling really engaged
        assert row["stages"]["flow_unet"]["tile_calls"] >= 2
        assert row["peak_increase_bytes"] >= row["image_sized_bytes"] * 0.5
    for raw in report["raw"]:
        assert raw["real"]["output_finite"] and raw["null"]["output_finite"]

    claims = report["claims"]
    mem = claims["memory_flat"]
    for key in ("peak_increase_ratio", "working_ratio", "image_sized_ratio", "pixel_ratio"):
        assert _positive(mem[key]), key
    assert isinstance(mem["total_holds"], bool) and isinstance(mem["working_holds"], bool)
    t = claims["time_linear"]
    assert all(_positive(v) for v in t["time_per_pixel_vs_anchor"])
    assert math.isfinite(t["loglog_slope"])
    assert isinstance(t["holds"], bool)
