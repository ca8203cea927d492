#!/usr/bin/env bash
# Run FlowIE Serve on a fresh host: install FlowIE Serve (CPU torch) if needed, then run the
# service on the embedded defaults: in-memory queue, bundled demo model (models/demo), CPU.
# Extra arguments go to `flowie serve` (e.g. --port 8080, --model DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" 2>/dev/null; then
  # A CPU build; on a GPU host install the CUDA build of your choice first instead.
  python3 -m pip install -q torch==2.13.0
fi
# Installed, and installed from this checkout: checked from outside it (here the current directory
# would shadow an install that points elsewhere, e.g. a clone that was moved).
repo="$PWD"
if ! (cd / && python3 -c "import os, sys, flowie, service, fastapi, diffusers
sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(service.__file__))) != sys.argv[1])" "$repo") 2>/dev/null \
    || ! command -v flowie >/dev/null; then
  python3 -m pip install -q -e .
fi
# The offline face detector's weights (whole photos); --no-deps: its pins would replace torch and numpy.
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('facenet_pytorch') is None)"; then
  python3 -m pip install -q --no-deps facenet-pytorch==2.6.0
fi
exec flowie serve "$@"
