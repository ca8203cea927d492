"""Fixtures of the service tests: the tiny model loaded once, in-process apps, a real redis-server.

Apps run in-process through Starlette's TestClient (its portal thread runs the app's event loop,
the in-process worker included). Every app that computes shares one loaded PipelineRunner on the
tiny reference model, so the model loads once per test run (session-scoped fixture).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from svc_helpers import free_port

CI = os.environ.get("CI", "").lower() == "true"


def skip_or_fail(message: str) -> None:
    """Skip locally; fail on CI (CI=true), where every part must be present."""
    if CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def _one_thread_torch() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


@pytest.fixture(scope="session")
def tiny_runner(tiny_model_dir: Path) -> Any:
    """The real Pipeline on the tiny reference model, behind the worker's runner protocol."""
    from service.runner import PipelineRunner

    return PipelineRunner.load([tiny_model_dir])


@pytest.fixture(scope="session")
def make_settings(tiny_model_dir: Path) -> Callable[..., Any]:
    from service.settings import load_settings

    def make(**overrides: Any) -> Any:
        values: dict[str, Any] = {"model_dirs": [tiny_model_dir], "log_json": True, "sync_timeout_s": 60.0,
                                  "max_wait_ms": 5.0, "face_mode": "aligned"}  # whole photos: test_faces_http
        values.update(overrides)
        return load_settings(**values)

    return make


@pytest.fixture(scope="session")
def make_app(make_settings: Callable[..., Any], tiny_runner: Any) -> Callable[..., Any]:
    """make_app(worker=True, **settings) -> FastAPI app on a memory queue (worker=False: nothing computes)."""
    from service.app import create_app, load_models
    from service.metrics import Metrics
    from service.queue.memory import MemoryJobQueue
    from service.worker import Worker

    def make(worker: bool = True, queue: Any = None, **overrides: Any) -> Any:
        if not worker:
            overrides.setdefault("sync_timeout_s", 0.5)  # nothing computes: do not wait long
        settings = make_settings(**overrides)
        metrics = Metrics()
        queue = queue or MemoryJobQueue(settings.max_queue, settings.result_ttl_s)
        in_process = Worker(queue, lambda: tiny_runner, settings, metrics) if worker else None
        return create_app(settings, queue, load_models(settings), worker=in_process, metrics=metrics)

    return make


@pytest.fixture(scope="session")
def client(make_app: Callable[..., Any]) -> Iterator[Any]:
    """The embedded service (memory queue + in-process worker on the tiny model)."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(max_batch=4)) as test_client:
        deadline = time.monotonic() + 60
        while test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, test_client.get("/readyz").text
            time.sleep(0.05)
        yield test_client


@pytest.fixture()
def idle_client(make_app: Callable[..., Any]) -> Iterator[Any]:
    """An embedded service with no worker: jobs wait forever (queue bounds, deadlines, cancel)."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(worker=False, max_queue=2, job_deadline_s=30.0, sync_timeout_s=0.3)) as test_client:
        yield test_client


# --- redis-server ------------------------------------------------------------------------
class RedisServer:
    """A real redis-server on a free port, persistent (AOF, fsync always) so it can restart."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir),
             "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # redis flushes the AOF on SIGTERM
            self.process.wait(timeout=10)
        self.process = None

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port)

    def fill_up(self) -> None:
        """Put Redis past its memory limit with eviction off (the deployment's policy): writes are refused."""
        client = self.client()
        client.set("test:filler", b"\0" * 4_000_000)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1mb")

    def make_room(self) -> None:
        client = self.client()
        client.config_set("maxmemory", "0")
        client.delete("test:filler")


@pytest.fixture()
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test alone (one that fills it up disturbs no other)."""
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        skip_or_fail("redis-server is not installed (apt-get install redis-server); the Redis tests need a real one")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        skip_or_fail("redis-server is not installed (apt-get install redis-server); the Redis tests need a real one")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
