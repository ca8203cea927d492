"""Start the service for a load run and stop it afterwards, on free loopback ports.

* ``serve``: one `flowie serve` process (API + in-process worker + in-memory queue);
* ``redis``: a redis-server (AOF, fsync every second: the production setting) + one `flowie api`
  + N x `flowie worker`, each worker with its own /metrics port.

Processes run as ``python -m service.cli`` from the repository root (the same way the service's
tests start them), with ``OMP_NUM_THREADS`` = ``threads`` so each compute process uses that many
torch threads, and their logs in ``logdir``. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(threads: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWIE_")}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH", "")])]),
                "FLOWIE_HOST": "127.0.0.1", "FLOWIE_LOG_JSON": "true"})
    env.update(extra)
    return env


def _flowie(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child holds it; closed with the process
    try:
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def _stop(process: subprocess.Popen | None, timeout: float = 30.0) -> int | None:
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class Service:
    """A started service: its URL, the /metrics pages to scrape, and how it was started."""

    mode: str
    url: str
    metrics_urls: list[str]
    logdir: Path
    settings: dict[str, str]
    redis_url: str = ""
    redis_hz: int | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "url": self.url, "metrics_urls": self.metrics_urls, "redis_url": self.redis_url,
                "redis_hz": self.redis_hz,
                "settings": self.settings, "pids": {k: p.pid for k, p in self.processes.items()},
                "logs": str(self.logdir)}

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n"
                                   f"{_tail(self.logdir / f'{name}.log')}")

    def wait_ready(self, workers: int, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200 and response.json()["checks"].get("workers", 0) >= workers:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.3)
        raise TimeoutError(f"{self.url}/readyz not ready with {workers} worker(s) after {timeout_s:g} s: {last}")

    def stop(self) -> dict[str, int | None]:
        """SIGTERM the API side first (it drains), then the workers, then Redis; return exit codes."""
        codes = {}
        order = [n for n in self.processes if n in ("serve", "api")] + \
                [n for n in self.processes if n.startswith("worker")] + \
                [n for n in self.processes if n == "redis"]
        for name in order:
            codes[name] = _stop(self.processes[name])
        return codes


def start_service(mode: str, logdir: Path, *, models: list[str], workers: int = 2, threads: int = 1,
                  settings: dict[str, str] | None = None, ready_timeout_s: float = 180.0,
                  redis_hz: int | None = None) -> Service:
    """Start `flowie serve` (mode "serve") or redis-server + `flowie api` + workers (mode "redis").

    ``redis_hz``: redis-server's ``hz`` (None = its default, 10). Redis ends blocking commands that
    time out (XREADGROUP BLOCK, BLPOP) only on its timer tick, every 1000/hz ms: at hz 10 a
    9 ms BLOCK lasts about 100 ms (measured with Redis 7.0), which stretches the worker's batching window.
    """
    logdir.mkdir(parents=True, exist_ok=True)
    settings = dict(settings or {})
    for key in settings:
        if not key.startswith("FLOWIE_"):
            raise ValueError(f"service settings are FLOWIE_* variables, got {key!r}")
    if models:
        settings["FLOWIE_MODEL_DIRS"] = ",".join(str(Path(m).resolve()) for m in models)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service: Service
    if mode == "serve":
        service = Service(mode, url, [f"{url}/metrics"], logdir, settings)
        try:
            service.processes["serve"] = _flowie(["serve", "--port", str(port)], logdir / "serve.log",
                                                 _env(threads, settings))
            service.wait_ready(1, ready_timeout_s)
        except BaseException:
            service.stop()
            raise
        return service
    if mode != "redis":
        raise ValueError(f"mode must be serve or redis, got {mode!r}")
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    redis_port = free_port()
    redis_dir = logdir / "redis"
    redis_dir.mkdir(exist_ok=True)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    settings.setdefault("FLOWIE_REDIS_URL", redis_url)
    settings.setdefault("FLOWIE_KEY_PREFIX", "load" + uuid.uuid4().hex[:6])
    metrics_ports = [free_port() for _ in range(workers)]
    service = Service(mode, url, [f"{url}/metrics"] + [f"http://127.0.0.1:{p}/metrics" for p in metrics_ports],
                      logdir, settings, redis_url=settings["FLOWIE_REDIS_URL"])
    service.redis_hz = redis_hz or 10
    try:
        with open(logdir / "redis.log", "ab") as log:
            service.processes["redis"] = subprocess.Popen(
                [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                 "--appendfsync", "everysec", "--dir", str(redis_dir), "--protected-mode", "no",
                 "--loglevel", "warning", *(["--hz", str(redis_hz)] if redis_hz else [])],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_redis(redis_port, service)
        service.processes["api"] = _flowie(["api", "--port", str(port)], logdir / "api.log", _env(threads, settings))
        for i, metrics_port in enumerate(metrics_ports):
            service.processes[f"worker{i}"] = _flowie(
                ["worker", "--worker-metrics-port", str(metrics_port), "--worker-id", f"load-worker{i}"],
                logdir / f"worker{i}.log", _env(threads, settings))
        service.wait_ready(workers, ready_timeout_s)
    except BaseException:
        service.stop()
        raise
    return service


def _wait_redis(port: int, service: Service, timeout_s: float = 10.0) -> None:
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout_s
    while True:
        service.check_alive()
        try:
            if client.ping():
                client.close()
                return
        except (redis.ConnectionError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
