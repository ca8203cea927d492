"""loadtests/worker_bench.py: the real worker runs every job of the backlog with its answers encoded
before and while the next batch computes, and the report holds both settings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("worker_bench", ROOT / "loadtests" / "worker_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("decode", [False, True])  # uploads as pixels (flowie serve) or as bytes (Redis)
def test_worker_bench_runs_both_settings_on_the_stand_in(tmp_path, capsys, decode):
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--compute", "wait:5", "--size", "64", "--batch", "2", "--jobs", "4", "--rounds", "1",
                       "--codec-threads", "2", "--json", str(out), *(["--decode"] if decode else [])]) == 0
    report = json.loads(out.read_text())
    assert [(r["encode_overlap"], r["batches"]) for r in report["runs"]] == [(False, 2), (True, 2)]
    for run in report["runs"]:
        assert run["images_per_s"] == pytest.approx(4 / run["seconds"])
        assert run["median_encode_ms_per_batch"] > 0
        # every batch waited its stand-in compute (5 ms per image, 2 batches of 2)
        assert run["seconds"] >= 0.02
    assert report["ratio_on_off"] == pytest.approx(report["summary"]["on"]["images_per_s"]
                                                   / report["summary"]["off"]["images_per_s"])
    printed = capsys.readouterr().out
    assert "| on |" in printed
    assert ("decoded by the worker" in printed) is decode and report["args"]["decode"] == str(decode)


def test_worker_bench_refuses_what_it_cannot_run():
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--jobs", "3", "--batch", "2"])  # not a multiple of the batch
    with pytest.raises(SystemExit, match="h200"):
        bench.make_runner("h200", 3)  # no H200 time measured for batch 3
    with pytest.raises(SystemExit, match="wait:MS"):
        bench.make_runner("gpu", 1)
