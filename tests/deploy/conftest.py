"""Fixtures of the deployment checks: a live `flowie serve` on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_helpers import ROOT, clean_env, free_port, skip_or_fail, stop_process, wait_until_ok


@dataclass
class LiveService:
    """A running `flowie serve` on the loopback interface."""

    base_url: str
    port: int
    process: subprocess.Popen
    log_path: Path


@pytest.fixture(scope="module")
def live_flowie(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """`flowie serve --model <tiny model>` on a free port, ready (model loaded, worker alive)."""
    try:
        model_dir = request.getfixturevalue("tiny_model_dir")
    except pytest.FixtureLookupError:
        skip_or_fail("the `tiny_model_dir` fixture (tests/conftest.py) is not defined")
    port = free_port()
    log_path = tmp_path_factory.mktemp("flowie_serve") / "serve.log"
    # The tiny bfr model on the aligned path: the metric checks count its work-size refusals.
    env = clean_env(FLOWIE_HOST="127.0.0.1", FLOWIE_PORT=str(port), FLOWIE_ENV="development",
                    FLOWIE_LOG_JSON="false", FLOWIE_FACE_MODE="aligned")
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(model_dir)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    service = LiveService(f"http://127.0.0.1:{port}", port, process, log_path)
    try:
        # /readyz: the model is loaded and the in-process worker heartbeats, so requests compute.
        wait_until_ok(f"{service.base_url}/readyz", process, log_path, timeout=300)
        yield service
    finally:
        stop_process(process)
