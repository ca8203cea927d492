"""loadtests/run_load.py: a short bounded locust run against a real `flowie serve` (tiny model) leaves a
complete report with no 5xx; non-loopback targets are refused; the report's helpers are right."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOADTESTS = ROOT / "loadtests"
sys.path.insert(0, str(LOADTESTS))

from load_lib import NotLoopback, check_loopback  # noqa: E402
from load_lib.mix import Mix, MixConfig, parse_server_timing, work_size  # noqa: E402
from load_lib.records import Record  # noqa: E402
from load_lib.report import ENHANCE_SYNC, timing_breakdown  # noqa: E402
from load_lib.scrape import histogram_quantile, parse_metrics, summarize  # noqa: E402


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWIE_", "LOCUST_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def test_short_locust_run_against_flowie_serve(tiny_model_dir, tmp_path):
    if importlib.util.find_spec("locust") is None:  # not imported here: locust monkey-patches with gevent
        message = "locust is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "load"
    cmd = [sys.executable, str(LOADTESTS / "run_load.py"), "--start", "serve", "--model", str(tiny_model_dir),
           "--users", "2", "--spawn-rate", "2", "--duration", "10", "--stop-timeout", "15", "--warmup", "1",
           "--scale", "0.25", "--wait", "0.1,0.3", "--max-total-s", "100", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))

    assert report["schema"] == "flowie-load-report/1"
    assert {"meta", "config", "service", "overall", "endpoints", "errors_by_status", "server_timing",
            "service_metrics", "time_series", "files"} <= set(report)
    assert report["config"]["profile"] == "fixed" and report["config"]["generator"].startswith("locust")
    # uvicorn re-raises the SIGTERM it handled after a graceful shutdown: -15 is a clean stop
    assert report["service"]["mode"] == "serve" and report["service"]["exit_codes"]["serve"] in (0, -15)
    assert report["service"]["alive_at_end"] is True
    assert report["meta"]["machine"]["cpus"] >= 1 and len(report["meta"]["loadavg_before"]) == 3

    overall = report["overall"]
    assert overall["requests"] > 0 and overall["images_done"] > 0
    assert overall["server_errors_5xx"] == 0, overall["status"]
    assert overall["no_answer"] == 0, overall["status"]
    assert not any(code.startswith("5") for code in overall["status"]), overall["status"]

    sync = report["endpoints"]["POST /enhance [sync]"]
    assert sync["count"] > 0 and sync["ok"] > 0
    for key in ("p50", "p95", "p99", "max"):
        assert sync["latency_ms"][key] > 0
    assert sync["latency_ms"]["p50"] <= sync["latency_ms"]["p95"] <= sync["latency_ms"]["p99"] <= sync["latency_ms"]["max"]
    for stats in report["endpoints"].values():
        assert set(stats["status"]) and stats["count"] == sum(stats["status"].values())

    timing = report["server_timing"]
    assert timing["n"] > 0 and timing["ms"]["compute"]["p50"] > 0
    share = timing["overhead_share_p50"]["ratio_of_p50s"]
    assert 0 <= share <= 1

    metrics = report["service_metrics"]
    assert all(page["ok"] for page in metrics["pages"].values())
    assert metrics["jobs"].get("done", 0) >= sync["ok"]
    assert metrics["batch"]["mean_batch_size"] >= 1
    assert metrics["queue_wait"]["count"] > 0 and metrics["compute"]["mean_batch_s"] > 0
    assert metrics["requests_by_status"] and not any(s.startswith("5") for s in metrics["requests_by_status"])

    for name in ("report.md", "load_latency_time.png", "load_latency_hist.png", "records.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "load_latency_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "POST /enhance [sync]" in (out / "report.md").read_text()


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "http://192.168.1.2", "ftp://127.0.0.1/"])
def test_only_loopback_targets(url):
    with pytest.raises(NotLoopback):
        check_loopback(url)
    done = subprocess.run([sys.executable, str(LOADTESTS / "run_load.py"), "--url", url, "--out", "/nonexistent"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr + done.stdout


def test_loopback_targets_accepted():
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_loopback("http://[::1]:9000") == "http://[::1]:9000"
    assert check_loopback("http://localhost:1234") == "http://localhost:1234"


def test_server_timing_and_histogram_helpers():
    assert parse_server_timing("queue;dur=1.5, compute;dur=20, total;dur=23.25") == {
        "queue": 1.5, "compute": 20.0, "total": 23.25}
    assert parse_server_timing(None) == {} and parse_server_timing("total") == {}
    buckets = [(0.01, 0.0), (0.1, 50.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.055)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.55)


def test_timing_split_keeps_decode_out_of_post_and_reads_older_answers():
    def record(st):
        return Record(t=0.0, name=ENHANCE_SYNC, status=200, ms=20.0, st=st)

    new = timing_breakdown([record({"decode": 1.0, "queue": 2.0, "pickup": 0.5, "compute": 10.0, "notify": 0.4,
                                    "total": 14.0})])["ms"]
    assert new["post"]["p50"] == pytest.approx(1.0) and new["decode"]["p50"] == 1.0
    assert new["pickup"]["p50"] == 0.5 and new["notify"]["p50"] == 0.4
    assert new["server_overhead"]["p50"] == pytest.approx(4.0) and new["overhead"]["p50"] == pytest.approx(10.0)
    old = timing_breakdown([record({"queue": 3.0, "compute": 10.0, "total": 14.0})])["ms"]  # no decode entry
    assert old["post"]["p50"] == pytest.approx(1.0) and old["decode"]["n"] == 0


def test_metrics_deltas_add_processes():
    page = ('# TYPE flowie_batch_size histogram\n'
            'flowie_batch_size_bucket{task="bfr",le="1.0"} %d\nflowie_batch_size_bucket{task="bfr",le="2.0"} %d\n'
            'flowie_batch_size_bucket{task="bfr",le="+Inf"} %d\nflowie_batch_size_count{task="bfr"} %d\n'
            'flowie_batch_size_sum{task="bfr"} %d\n'
            '# TYPE flowie_rejections counter\nflowie_rejections_total{reason="queue_full"} %d\n')
    before = {"at": 0.0, "pages": {"a": {"ok": True, "error": "", "samples": parse_metrics(page % (1, 1, 1, 1, 1, 0))},
                                   "b": {"ok": True, "error": "", "samples": {}}}}
    after = {"at": 5.0, "pages": {"a": {"ok": True, "error": "", "samples": parse_metrics(page % (2, 3, 3, 3, 5, 2))},
                                  "b": {"ok": True, "error": "", "samples": parse_metrics(page % (0, 2, 2, 2, 4, 1))}}}
    summary = summarize(before, after)
    assert summary["batch"]["batches"] == 4 and summary["batch"]["images"] == 8
    assert summary["batch"]["mean_batch_size"] == 2.0
    assert summary["rejections"] == {"queue_full": 3}


def test_mix_scales_sizes_and_covers_the_options():
    config = MixConfig(scale=0.25, seed=3)
    assert config.effective_min_side() == 128
    assert work_size(192, 128, 128) == (192, 128) and work_size(64, 64, 128) == (128, 128)
    mix = Mix(config, ["bfr"])
    specs = [mix.next() for _ in range(400)]
    assert {(s.width, s.height) for s in specs} == {(64, 64), (128, 128), (192, 128), (256, 256)}
    assert {s.sampler for s in specs} == {"mean_value", "one_step", "euler", "restore_only"}
    assert {s.mode for s in specs} == {"sync", "async"} and {s.body for s in specs} == {"multipart", "json"}
    assert all(s.steps in (4, 8) for s in specs if s.sampler == "euler")
    body, headers = specs[0].build()
    assert headers["Content-Type"].startswith(("multipart/form-data; boundary=", "application/json"))
    assert len(body) > 100
    env = config.to_env()
    assert env["FLOWIE_LOAD_SCALE"] == "0.25" and env["FLOWIE_LOAD_MIN_SIDE"] == "auto"
