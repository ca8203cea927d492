"""Build-time check of the GPU image's Python environment: fail the build, not the first request.

Runs in the Dockerfile's builder stage, where there is no GPU: only imports and versions are checked.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

EXPECTED_TENSORRT = "10.8.0.43"  # = libnvinfer of nvcr.io/nvidia/tensorrt:25.01-py3
EXPECTED_CUDA_PREFIX = "12.8"  # = CUDA of that base image


def problems() -> list[str]:
    import onnxruntime
    import tensorrt
    import torch

    found = []
    if tensorrt.__version__ != EXPECTED_TENSORRT:
        found.append(f"tensorrt bindings {tensorrt.__version__}, base image has {EXPECTED_TENSORRT}")
    if not (torch.version.cuda or "").startswith(EXPECTED_CUDA_PREFIX):
        found.append(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, not {EXPECTED_CUDA_PREFIX}")
    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if provider not in onnxruntime.get_available_providers():
            found.append(f"onnxruntime lacks {provider}")
    try:
        md.version("onnxruntime")
        found.append("the CPU onnxruntime is installed beside onnxruntime-gpu (both own `onnxruntime`)")
    except md.PackageNotFoundError:
        pass
    md.version("flowie-serve")  # raises when the project itself is not installed
    return found


def main() -> int:
    found = problems()
    for line in found:
        sys.stderr.write(f"check_env: {line}\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
