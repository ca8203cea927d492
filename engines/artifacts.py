"""Where exported artefacts live in a model directory and what makes them valid (torch-free).

``export`` writes these files and ``engines`` reads them, so the layout, the validity keys
and the refusal messages are stated here once::

    <model>/onnx/<stage>.onnx         (+ <stage>.onnx.data when the weights pass 2 GB)
    <model>/onnx/<stage>.json         sidecar: the key the file was made under, verification
    <model>/trt/<gpu>-trt<version>/<stage>.plan
    <model>/trt/<gpu>-trt<version>/meta.json
    <model>/trt/<gpu>-trt<version>/timing.cache
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from engines.errors import StaleArtifactError
from flowie.modeldir import ModelInfo, file_sha256

ONNX_FORMAT = 1  # bump when the export recipe changes in a way that invalidates old files
TRT_FORMAT = 1


# ---------------------------------------------------------------- ONNX


def onnx_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / "onnx"


def onnx_path(model_dir: str | Path, stage: str) -> Path:
    return onnx_dir(model_dir) / f"{stage}.onnx"


def onnx_sidecar_path(model_dir: str | Path, stage: str) -> Path:
    return onnx_dir(model_dir) / f"{stage}.json"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()




def weights_fingerprint(info: ModelInfo, stage: str) -> dict:
    """What identifies one stage's weights: the converted checkpoint's sha256, the stage's
    model.json block and the weight file's size. Model directories without a source hash
    (trained in place) hash the weight file itself."""
    weights = info.weight_path(stage)
    fingerprint = {
        "source_sha256": info.source_sha256,
        "stage_config_sha256": _sha256_bytes(json.dumps(info.stages[stage], sort_keys=True).encode()),
        "weights_bytes": weights.stat().st_size,
    }
    if not info.source_sha256:
        fingerprint["weights_sha256"] = file_sha256(weights)
    return fingerprint


def read_sidecar(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_onnx_current(info: ModelInfo, stage: str) -> dict:
    """Return the sidecar of ``stage``'s ONNX file; raise StaleArtifactError if it is missing,
    unverified or was exported from other weights."""
    path = onnx_path(info.path, stage)
    rebuild = f"run `flowie export --model {info.path}`"
    if not path.is_file():
        raise StaleArtifactError(f"{path} does not exist; {rebuild} first")
    sidecar = read_sidecar(onnx_sidecar_path(info.path, stage))
    if sidecar is None:
        raise StaleArtifactError(f"{path} has no export record ({stage}.json); {rebuild} to re-export it")
    if sidecar.get("key", {}).get("weights") != weights_fingerprint(info, stage):
        raise StaleArtifactError(f"{path} was exported from other weights than {info.weight_path(stage).name}; "
                                 f"{rebuild} to re-export it")
    for name, size in sidecar.get("files", {}).items():
        file = path.parent / name
        if not file.is_file() or file.stat().st_size != size:
            raise StaleArtifactError(f"{file} is missing or truncated; {rebuild} --force")
    return sidecar


# ---------------------------------------------------------------- TensorRT


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe as a directory name)."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


def trt_dir(model_dir: str | Path, gpu_name: str, trt_version: str) -> Path:
    return Path(model_dir) / "trt" / f"{gpu_slug(gpu_name)}-trt{trt_version}"


def plan_path(plan_dir: str | Path, stage: str) -> Path:
    return Path(plan_dir) / f"{stage}.plan"


def trt_meta_path(plan_dir: str | Path) -> Path:
    return Path(plan_dir) / "meta.json"


def rebuild_hint(model_dir: str | Path, meta: dict | None = None) -> str:
    flags = ""
    if meta and meta.get("precision") == "fp16":
        flags = " --fp16"
    return f"rebuild the plans on this host with `flowie build-engines --model {model_dir}{flags}`"


def check_plan_meta(meta: dict, gpu_name: str, compute_capability: str, trt_version: str,
                    model_dir: str | Path = "DIR") -> None:
    """Refuse plans built for another GPU or TensorRT version (TensorRT plans are not portable).

    Raises StaleArtifactError with one sentence saying what the plan was built for, what this
    machine has, and the command that rebuilds it.
    """
    if meta.get("format") != TRT_FORMAT:
        raise StaleArtifactError(f"the TensorRT plans in {model_dir} have meta format {meta.get('format')!r}, "
                                 f"this FlowIE Serve reads {TRT_FORMAT}; {rebuild_hint(model_dir, meta)}")
    built_gpu = meta.get("gpu", {})
    problems = []
    if built_gpu.get("name") != gpu_name:
        problems.append(f"GPU {built_gpu.get('name')!r} (this host: {gpu_name!r})")
    if str(built_gpu.get("compute_capability")) != str(compute_capability):
        problems.append(f"compute capability {built_gpu.get('compute_capability')} (this host: {compute_capability})")
    if meta.get("tensorrt") != trt_version:
        problems.append(f"TensorRT {meta.get('tensorrt')} (this host: {trt_version})")
    if problems:
        raise StaleArtifactError(f"the TensorRT plans in {model_dir} were built for {', '.join(problems)}; "
                                 f"{rebuild_hint(model_dir, meta)}")


def find_plan_dir(model_dir: str | Path, gpu_name: str, compute_capability: str, trt_version: str) -> Path:
    """The plan directory for this GPU and TensorRT version, checked against its meta.json."""
    plan_dir = trt_dir(model_dir, gpu_name, trt_version)
    meta = read_sidecar(trt_meta_path(plan_dir))
    if meta is None:
        others = sorted(p.parent for p in (Path(model_dir) / "trt").glob("*/meta.json"))
        if others:
            # Say why the existing plans do not apply here.
            other_meta = read_sidecar(trt_meta_path(others[0])) or {}
            check_plan_meta(other_meta, gpu_name, compute_capability, trt_version, model_dir)
        raise StaleArtifactError(f"no TensorRT plans for {gpu_name} / TensorRT {trt_version} in {plan_dir}; "
                                 f"build them with `flowie build-engines --model {model_dir}`")
    check_plan_meta(meta, gpu_name, compute_capability, trt_version, model_dir)
    return plan_dir
