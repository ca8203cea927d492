"""The model directory: the artefact every stage reads (torch-free).

Layout (docs/ARCHITECTURE.md, the stage contract)::

    <model>/model.json
    <model>/<stage>.safetensors      swinir, cond_encoder, flow_unet, vae_decoder, null_context
    <model>/onnx/<stage>.onnx        written by `flowie export`
    <model>/trt/<gpu>-trt<ver>/      written by `flowie build-engines`
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from flowie.params import FAMILY_SAMPLERS

FORMAT_VERSION = 1
WEIGHT_FILES = ("swinir", "cond_encoder", "flow_unet", "vae_decoder", "null_context")

# Repository root / models / demo: the bundled demo model, the embedded default.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"


class ModelDirError(ValueError):
    """A model directory is missing or malformed; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What model.json says about a model directory."""

    path: Path
    meta: dict

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def family(self) -> str:
        """"flowie" (rectified flow) or "diffbir" (DDPM); directories written before families were named are flowie."""
        return str(self.meta.get("family", "flowie"))

    @property
    def prediction(self) -> str:
        """What the flow_unet stage outputs: "v" (flow velocity, or DDPM v) or "eps"."""
        return str(self.meta.get("prediction", "v"))

    @property
    def samplers(self) -> tuple[str, ...]:
        return FAMILY_SAMPLERS.get(self.family, ())

    @property
    def defaults(self) -> dict:
        return dict(self.meta["defaults"])

    @property
    def stages(self) -> dict:
        return dict(self.meta["stages"])

    @property
    def scale_factor(self) -> float:
        return float(self.meta["scale_factor"])

    @property
    def source_sha256(self) -> str:
        return str(self.meta.get("source", {}).get("sha256", ""))

    def weight_path(self, stage: str) -> Path:
        return self.path / f"{stage}.safetensors"


def read_model_dir(path: str | Path) -> ModelInfo:
    """Read and check ``<path>/model.json``; raise ModelDirError with a next step if unusable."""
    root = Path(path)
    meta_path = root / "model.json"
    if not meta_path.is_file():
        raise ModelDirError(
            f"{root} is not a FlowIE model directory (no model.json). Create one with "
            f"`flowie convert CHECKPOINT --config CONFIG.yaml -o {root}`."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{meta_path} is not valid JSON: {exc}") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelDirError(
            f"{meta_path} has format_version {version!r}; this FlowIE Serve reads version "
            f"{FORMAT_VERSION}. Re-run `flowie convert` on the source checkpoint."
        )
    for key in ("task", "defaults", "stages", "scale_factor"):
        if key not in meta:
            raise ModelDirError(f"{meta_path} lacks the {key!r} field; re-run `flowie convert`.")
    missing = [s for s in WEIGHT_FILES if not (root / f"{s}.safetensors").is_file()]
    if missing:
        raise ModelDirError(
            f"{root} lacks {', '.join(s + '.safetensors' for s in missing)}; re-run `flowie convert`."
        )
    return ModelInfo(path=root, meta=meta)


def write_model_json(path: str | Path, meta: dict) -> None:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, **meta}
    (root / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in 1 MiB chunks (checkpoints are several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
