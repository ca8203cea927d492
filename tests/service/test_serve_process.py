"""`flowie serve` as users run it: uvicorn in a subprocess, JSON logs, graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
from svc_helpers import ROOT, flowie, free_port, png, stop, subprocess_env, wait_http

KEY = "serve-test-key-0123456789abcdef"


def depth(base: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "flowie_queue_depth")


def test_serve_without_model_and_without_demo_says_what_to_do():
    program = ("import sys, pathlib, flowie.modeldir as m; m.DEMO_MODEL_DIR = pathlib.Path('/nonexistent/demo'); "
               "from service.cli import main; sys.exit(main(['serve']))")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--model DIR" in lines[0] and "flowie convert" in lines[0], done.stderr


def test_serve_answers_logs_json_and_drains_on_sigterm(tiny_model_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    process = flowie(["serve", "--model", str(tiny_model_dir), "--port", str(port)], log_path,
                     FLOWIE_API_KEYS=KEY, FLOWIE_DRAIN_TIMEOUT_S="30")
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}", "X-Request-ID": "serve-e2e-1"}
    try:
        wait_http(f"{base}/readyz", timeout=120, process=process)
        ok = httpx.post(f"{base}/enhance", files={"image": ("a.png", png(), "image/png")},
                        data={"min_side": "128"}, headers=headers, timeout=60)
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png", ok.text

        # A slow request in flight when SIGTERM arrives still gets its answer.
        slow: dict = {}

        def in_flight() -> None:
            slow["response"] = httpx.post(
                f"{base}/enhance", files={"image": ("a.png", png(), "image/png")},
                data={"min_side": "128", "sampler": "euler", "steps": "40"},
                headers={**headers, "X-Request-ID": "serve-e2e-slow"}, timeout=120)

        thread = threading.Thread(target=in_flight)
        thread.start()
        deadline = time.monotonic() + 60
        while log_path.read_text().count('"batch started"') < 2:  # the first request's batch, then this one
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.05)

        # A client that goes away while its job waits: the job is cancelled, never computed.
        request = httpx.Request("POST", f"{base}/enhance", files={"image": ("b.png", png(), "image/png")},
                                data={"min_side": "128", "sampler": "restore_only"},
                                headers={**headers, "X-Request-ID": "serve-e2e-gone"})
        raw = b"".join([f"POST /enhance HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode(),
                        *(f"{k}: {v}\r\n".encode() for k, v in request.headers.items() if k.lower() != "host"),
                        b"\r\n", request.read()])
        with socket.create_connection(("127.0.0.1", port)) as gone:
            gone.sendall(raw)
            while depth(base) < 2:  # the slow job in progress + this one waiting
                assert time.monotonic() < deadline, log_path.read_text()[-2000:]
                time.sleep(0.05)
        while "client disconnected" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.05)

        process.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        assert slow["response"].status_code == 200, slow["response"].text
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown (exit by signal).
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "worker stopping" in log_path.read_text()
        assert log_path.read_text().count('"batch started"') == 2  # the cancelled job never computed
    finally:
        stop(process)
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("logger") == "flowie.service.access" and r.get("path") == "/enhance"]
    assert access and access[0]["request_id"] == "serve-e2e-1" and access[0]["status"] == 200
    host = [r for r in records if r.get("logger") == "flowie.service.host"]
    assert host and "kept in the process" in host[0]["detail"]  # host_malloc is on by default on a CPU worker
    text = log_path.read_text()
    assert KEY not in text and "IHDR" not in text  # no keys, no image bytes
