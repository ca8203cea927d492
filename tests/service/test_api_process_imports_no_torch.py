"""The API process never imports torch: `flowie api` builds its app from light modules only."""

from __future__ import annotations

import subprocess
import sys

from svc_helpers import ROOT, subprocess_env

PROGRAM = """
import sys
from service.cli import build_parser
from service.app import create_app, load_models
from service.commands import _serving
from service.metrics import Metrics
from service.settings import load_settings

build_parser()  # imports every command module, as `flowie --help` does
settings = load_settings(model_dirs=[sys.argv[1]])
models = load_models(settings)
queue = _serving.redis_queue(settings, list(models), listen=True)
app = create_app(settings, queue, models, metrics=Metrics(role="api"))
app.openapi()
heavy = sorted(m for m in ("torch", "diffusers", "onnxruntime", "tensorrt", "cv2") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def test_api_app_builds_without_importing_torch(tiny_model_dir):
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(tiny_model_dir)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY:\n" in done.stdout, done.stdout
