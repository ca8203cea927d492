#!/usr/bin/env python3
"""Write deploy/docker/requirements-gpu.lock: every wheel the GPU image installs, pinned and hashed.

The image installs with ``pip install --no-deps --require-hashes -r requirements-gpu.lock`` so a
build never resolves anything: no newer torch with another CUDA, no surprise multi-GB download,
no nested installer (the ``tensorrt`` meta package runs pip again against NVIDIA's index).

What goes in: the ``[project].dependencies`` of pyproject.toml, with three substitutions for the
GPU image (the versions are the ``GPU_PINS`` below; docs/DEPLOY.md says why each one):

* ``torch``        -> the PyPI wheel whose Linux x86_64 build targets CUDA 12.8 (its
                      ``nvidia-*-cu12`` runtime wheels come in as pinned dependencies);
* ``onnxruntime``  -> ``onnxruntime-gpu`` (both install the ``onnxruntime`` module; only one may be there);
* ``tensorrt``     -> ``tensorrt-cu12-bindings`` only: the libraries come from the base image,
                      whose TensorRT version the bindings must equal.

Resolution is for the image's interpreter (CPython 3.12, glibc 2.39, x86_64) whatever host
runs, from PyPI itself (``--isolated``: no local wheel folder or mirror can change a hash).
pip downloads each wheel once to read its metadata; expect a few GB of traffic.

Usage: python deploy/docker/lock.py [--check]   (--check: fail if the lock no longer covers pyproject)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "deploy" / "docker" / "requirements-gpu.lock"
SHIM_LOCK = ROOT / "deploy" / "docker" / "tensorrt-shim.lock"
# NVIDIA's sdist that maps `import tensorrt` onto the bindings (installed --no-deps, see Dockerfile).
TENSORRT_SHIM = "tensorrt-cu12==10.8.0.43"
# The MTCNN face detector's weights ship inside this wheel; its declared pins (an old torch and numpy)
# would replace ours, so it goes in the same no-deps lock and is never imported (flowie/faces/weights.py).
FACE_WEIGHTS_WHEEL = "facenet-pytorch==2.6.0"

# Must agree with the base image named in the Dockerfile (TensorRT 10.8.0.43, CUDA 12.8, cuDNN 9.7).
GPU_PINS = {
    "torch": "torch==2.8.0",
    "onnxruntime": "onnxruntime-gpu==1.21.1",
    "tensorrt": "tensorrt-cu12-bindings==10.8.0.43",
}
# Build tools, from the lock too: `pip install --no-build-isolation` then needs nothing else (and the
# tensorrt shim's setup_requires names pip).
BUILD_TOOLS = ["pip==25.0.1", "setuptools==80.9.0", "wheel==0.45.1"]
PYTHON_VERSION = "3.12"
# pip 23 does not widen a --platform to older glibc tags by itself, so name them.
PLATFORMS = ["manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64", "linux_x86_64", "any"]
ABIS = ["cp312", "abi3", "none"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a package name from {requirement!r}")
    return canonical(match.group(1))


def project_requirements() -> list[str]:
    """pyproject's runtime dependencies with the GPU substitutions applied."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = []
    for requirement in project["dependencies"]:
        name = requirement_name(requirement)
        wanted.append(GPU_PINS.get(name, requirement))
    wanted.append(GPU_PINS["tensorrt"])  # from the `gpu` extra, without its meta package
    return wanted + BUILD_TOOLS


def _pip_report(args: list[str]) -> list[dict]:
    """Run `pip install --dry-run --report` against PyPI alone; return the report's install list."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
               "--no-cache-dir", "--report", str(report), "--quiet", *args]
        subprocess.run(cmd, check=True, env=env)
        return json.loads(report.read_text())["install"]


def resolve(requirements: list[str]) -> list[dict]:
    """pip's resolver for the image's interpreter and platform (wheels only)."""
    args = ["--only-binary=:all:", "--target", tempfile.mkdtemp(prefix="flowie-lock-"),
            "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    for abi in ABIS:
        args += ["--abi", abi]
    return _pip_report(args + requirements)


def resolve_shim() -> list[dict]:
    return _pip_report(["--no-deps", TENSORRT_SHIM, FACE_WEIGHTS_WHEEL])


def render(installs: list[dict], install_line: str) -> str:
    lines = [
        "# GPU image lock: written by deploy/docker/lock.py from pyproject.toml; do not edit by hand.",
        f"# Target: CPython {PYTHON_VERSION}, Linux x86_64 (nvcr.io/nvidia/tensorrt:25.01-py3).",
        f"# Install: {install_line}",
    ]
    for item in sorted(installs, key=lambda i: canonical(i["metadata"]["name"])):
        info = item["download_info"]
        url = info["url"]
        if not url.startswith("https://files.pythonhosted.org/"):
            raise SystemExit(f"{url} is not from PyPI; the image build would not find that file")
        digest = info["archive_info"].get("hashes", {}).get("sha256") or info["archive_info"]["hash"].split("=", 1)[1]
        lines.append(f"{canonical(item['metadata']['name'])}=={item['metadata']['version']} \\")
        lines.append(f"    --hash=sha256:{digest}")
    return "\n".join(lines) + "\n"


def locked_names(text: str) -> set[str]:
    return {requirement_name(line) for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line)}


def check() -> int:
    """Exit 1 when a pyproject dependency (after substitution) is missing from the lock."""
    missing = sorted({requirement_name(r) for r in project_requirements()} - locked_names(LOCK.read_text()))
    if missing:
        sys.stderr.write(f"{LOCK.name} lacks {', '.join(missing)}: run python deploy/docker/lock.py\n")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the lock covers pyproject")
    args = parser.parse_args()
    if args.check:
        return check()
    LOCK.write_text(render(resolve(project_requirements()),
                           "pip install --no-deps --require-hashes -r requirements-gpu.lock"))
    SHIM_LOCK.write_text(render(resolve_shim(), "NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 pip install "
                                "--no-deps --no-build-isolation --require-hashes -r tensorrt-shim.lock"))
    return check()


if __name__ == "__main__":
    sys.exit(main())
