"""Stage modules -> ONNX, checked by onnx.checker and by onnxruntime against torch.

One file per stage, ``<model>/onnx/<stage>.onnx``, with the StageSpec's tensor names and
dynamic batch and spatial axes (H, W and the latent h, w; any multiple of 64 pixels). The
weights go to ``<stage>.onnx.data`` when they pass 2 GB (protobuf's limit). A sidecar
``<stage>.json`` records the key the file was made under (source sha256 and stage config,
opset, dtype, torch version, exporter) and its verification, so a rerun skips files that
are up to date.

Exporter: the TorchScript one (``dynamo=False``) by default; docs/ENGINES.md says why and
what was measured. Tracing turns Python-level shape checks into constants (TracerWarnings),
so every export is verified at two sizes and two batch sizes other than the traced one; in
particular SwinIR is traced at a size where it computes its shifted-window mask (the cached
``attn_mask`` is only taken at the configured size), which is right at every size.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engines.artifacts import (
    ONNX_FORMAT,
    onnx_dir,
    onnx_path,
    onnx_sidecar_path,
    read_sidecar,
    weights_fingerprint,
)
from engines.base import random_inputs
from flowie.modeldir import ModelInfo, read_model_dir
from flowie.stages import LATENT_DOWNSCALE, SPATIAL_MULTIPLE, STAGES, StageSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Relative error ||onnxruntime - torch|| / ||torch|| allowed per case. fp16 files are compared
# with the fp32 torch module, so their bound measures the precision loss too.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # below protobuf's 2 GiB cap, with room for the graph
DEFAULT_BATCHES = (1, 2)

Progress = Callable[[str], None]


class ExportError(RuntimeError):
    """Export failed; the message says why and what to do."""


class VerificationError(ExportError):
    """onnxruntime disagrees with torch beyond the tolerance (the file is not kept)."""


@dataclass
class VerifyCase:
    batch: int
    height: int
    width: int
    rel_err: float
    max_abs_err: float


@dataclass
class StageExport:
    """What happened to one stage: exported, verified, or skipped as up to date."""

    stage: str
    path: Path
    action: str  # "exported", "verified" (file kept, verified now), "skipped"
    seconds: float = 0.0
    tolerance: float = 0.0
    cases: list[VerifyCase] = field(default_factory=list)

    @property
    def max_rel_err(self) -> float | None:
        return max((c.rel_err for c in self.cases), default=None)


def native_size(stages_cfg: dict) -> int:
    """The image size the model was configured for: SwinIR's img_size x 8 (512 for full size)."""
    swin = stages_cfg.get("swinir", {})
    return int(swin.get("img_size", 64)) * int(swin.get("unshuffle_scale", 8))


def default_verify_sizes(stages_cfg: dict) -> list[tuple[int, int]]:
    """The configured size, square, and a wider one (H x W); neither is the traced size."""
    px = native_size(stages_cfg)
    return [(px, px), (px, px + SPATIAL_MULTIPLE)]


def trace_size(stages_cfg: dict) -> tuple[int, int]:
    """Traced at a taller, non-square size: H and W cannot be confused, and SwinIR's feature map
    differs from its configured img_size, so the general shifted-window mask path is traced."""
    px = native_size(stages_cfg)
    return px + SPATIAL_MULTIPLE, px


# ---------------------------------------------------------------- export of one module


def _dynamo_shapes(spec: StageSpec) -> tuple:
    from torch.export import Dim

    batch = Dim("B", min=1, max=64)
    # Pixel sizes are multiples of 64, latent sizes multiples of 8: declare them so, so the
    # exporter can prove the divisions inside the networks exact.
    pixel_h, pixel_w = SPATIAL_MULTIPLE * Dim("H64", min=1, max=64), SPATIAL_MULTIPLE * Dim("W64", min=1, max=64)
    step = SPATIAL_MULTIPLE // LATENT_DOWNSCALE
    latent_h, latent_w = step * Dim("h8", min=1, max=64), step * Dim("w8", min=1, max=64)
    symbols = {"B": batch, "H": pixel_h, "W": pixel_w, "h": latent_h, "w": latent_w}
    return tuple({i: symbols[d] for i, d in enumerate(t.shape) if d in symbols} for t in spec.inputs)


def _run_exporter(module: nn.Module, spec: StageSpec, example: Sequence[torch.Tensor], path: Path, opset: int,
                  exporter: str) -> None:
    with warnings.catch_warnings():
        # Tracer and deprecation warnings are expected; correctness is checked by verification.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(module, tuple(example), str(path), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        elif exporter == "dynamo":
            try:
                import onnxscript  # noqa: F401  (the dynamo exporter needs it)
            except ImportError as exc:
                raise ExportError("the dynamo exporter needs onnxscript (pip install onnxscript); "
                                  "the default torchscript exporter does not") from exc
            torch.onnx.export(module, tuple(example), str(path), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_shapes=_dynamo_shapes(spec),
                              opset_version=max(opset, 18), dynamo=True, external_data=True)
        else:
            raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")


def export_module(module: nn.Module, spec: StageSpec, out_dir: Path, example: Sequence[torch.Tensor],
                  opset: int = DEFAULT_OPSET, exporter: str = "torchscript",
                  external_data_bytes: int = EXTERNAL_DATA_BYTES, metadata: dict | None = None,
                  before_replace: Callable[[], None] | None = None) -> dict[str, int]:
    """Export ``module`` to ``out_dir/<stage>.onnx`` and check it with onnx.checker.

    ``module`` is in eval mode and in the export dtype; ``example`` are inputs in StageSpec
    order. Weights move to ``<stage>.onnx.data`` when they exceed ``external_data_bytes``.
    The exporter writes to a scratch folder first, so a failed export leaves the existing
    files alone; ``before_replace`` is called just before they are overwritten.
    Returns ``{file name: bytes}`` of what was written.
    """
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    raw_dir = out_dir / f".raw-{spec.name}"
    shutil.rmtree(raw_dir, ignore_errors=True)
    raw_dir.mkdir()
    try:
        raw = raw_dir / f"{spec.name}.onnx"
        with torch.no_grad():
            _run_exporter(module, spec, example, raw, opset, exporter)
        # Re-save in one layout whatever the exporter wrote (it may scatter external tensors).
        model = onnx.load(str(raw), load_external_data=True)
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    onnx.helper.set_model_props(model, {k: str(v) for k, v in (metadata or {}).items()})
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    target = out_dir / f"{spec.name}.onnx"
    data_name = f"{spec.name}.onnx.data"
    if before_replace is not None:
        before_replace()
    (out_dir / data_name).unlink(missing_ok=True)
    if weight_bytes > external_data_bytes:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(target))
    del model
    try:
        onnx.checker.check_model(str(target))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {target}: {exc}") from exc
    files = {target.name: target.stat().st_size}
    if (out_dir / data_name).exists():
        files[data_name] = (out_dir / data_name).stat().st_size
    return files


# ---------------------------------------------------------------- verification


def verify_onnx(path: Path, reference: nn.Module, spec: StageSpec, context: torch.Tensor,
                sizes: Sequence[tuple[int, int]], batches: Sequence[int], tolerance: float, seed: int = 1234,
                progress: Progress | None = None) -> list[VerifyCase]:
    """Run onnxruntime (CPU) and the float32 torch ``reference`` on the same fresh random inputs
    at every (size, batch); raise VerificationError if any relative error exceeds ``tolerance``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    types = {i.name: (np.float16 if i.type == "tensor(float16)" else np.float32) for i in session.get_inputs()}
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for (height, width), batch in itertools.product(sizes, batches):
        inputs = random_inputs(spec, batch, height, width, context, generator)
        with torch.no_grad():
            expected = reference(*inputs).double()
        feed = {name: x.numpy().astype(types[name]) for name, x in zip(spec.input_names, inputs, strict=True)}
        got = torch.from_numpy(session.run([spec.output_names[0]], feed)[0]).double()
        if tuple(got.shape) != tuple(expected.shape):
            raise VerificationError(f"{spec.name}: onnxruntime returned shape {tuple(got.shape)}, torch "
                                    f"{tuple(expected.shape)} (batch {batch}, {height}x{width})")
        diff = got - expected
        case = VerifyCase(batch, height, width, float(diff.norm() / expected.norm().clamp_min(1e-30)),
                          float(diff.abs().max()))
        if not bool(torch.isfinite(got).all()):
            case.rel_err = float("inf")
        cases.append(case)
        if progress:
            progress(f"  {spec.name}: batch {batch}, {height}x{width}: relative error {case.rel_err:.2e} "
                     f"(max |diff| {case.max_abs_err:.2e})")
    worst = max(cases, key=lambda c: c.rel_err)
    if not worst.rel_err <= tolerance:
        raise VerificationError(
            f"{spec.name}: onnxruntime differs from torch by a relative error of {worst.rel_err:.3g} "
            f"(batch {worst.batch}, {worst.height}x{worst.width}), above the tolerance {tolerance:g}"
        )
    return cases


# ---------------------------------------------------------------- a model directory


def export_key(info: ModelInfo, stage: str, dtype: str, opset: int, exporter: str) -> dict:
    """What an ONNX file is valid for; a rerun skips a stage whose sidecar holds the same key."""
    return {
        "format": ONNX_FORMAT,
        "weights": weights_fingerprint(info, stage),
        "opset": int(opset),
        "dtype": dtype,
        "torch": torch.__version__,
        "exporter": exporter,
    }


def _is_current(sidecar: dict | None, key: dict, folder: Path) -> bool:
    if not sidecar or sidecar.get("key") != key:
        return False
    files = sidecar.get("files", {})
    return bool(files) and all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in files.items())


def export_model(model_dir: str | Path, stages: Sequence[str] | None = None, dtype: str = "fp32",
                 opset: int = DEFAULT_OPSET, exporter: str = "torchscript", verify: bool = True, force: bool = False,
                 sizes: Sequence[tuple[int, int]] | None = None, batches: Sequence[int] = DEFAULT_BATCHES,
                 tolerance: float | None = None, external_data_bytes: int = EXTERNAL_DATA_BYTES,
                 device: str = "cpu", progress: Progress | None = None) -> list[StageExport]:
    """Export (and verify) the stages of a model directory into ``<model>/onnx``.

    Idempotent: a stage whose sidecar key matches (source sha256 and stage config, opset,
    dtype, torch version, exporter) and whose files are intact is skipped; one that was
    exported without verification is verified now if ``verify``. Raises VerificationError
    (and removes the new file) when onnxruntime and torch disagree beyond ``tolerance``
    (default: 1e-4 for fp32, 1e-2 for fp16, relative to the fp32 torch output).
    """
    from flowie.model import load_null_context, load_stage

    say = progress or log.info
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    info = read_model_dir(model_dir)
    names = list(stages) if stages else list(STAGES)
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ExportError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    sizes = list(sizes) if sizes else default_verify_sizes(info.stages)
    for height, width in (*sizes, trace_size(info.stages)):
        if height % SPATIAL_MULTIPLE or width % SPATIAL_MULTIPLE:
            raise ExportError(f"sizes must be multiples of {SPATIAL_MULTIPLE} pixels, got {height}x{width}")
    tol = TOLERANCE[dtype] if tolerance is None else float(tolerance)
    context = load_null_context(info)
    folder = onnx_dir(info.path)
    results = []
    for index, stage in enumerate(names, 1):
        spec = STAGES[stage]
        key = export_key(info, stage, dtype, opset, exporter)
        sidecar_file = onnx_sidecar_path(info.path, stage)
        sidecar = read_sidecar(sidecar_file)
        current = not force and _is_current(sidecar, key, folder)
        verified = bool(sidecar and sidecar.get("verification"))
        if current and (verified or not verify):
            say(f"[{index}/{len(names)}] {stage}: up to date ({onnx_path(info.path, stage).name}, {dtype}, "
                f"opset {opset}), skipped")
            results.append(StageExport(stage, onnx_path(info.path, stage), "skipped"))
            continue
        start = time.perf_counter()
        reference = load_stage(info, stage, "cpu", torch.float32)
        if current:
            say(f"[{index}/{len(names)}] {stage}: file up to date, verifying")
            files = sidecar["files"]
            action = "verified"
        else:
            say(f"[{index}/{len(names)}] {stage}: exporting ({dtype}, opset {opset}, {exporter} exporter)")
            module = reference if dtype == "fp32" and device == "cpu" else load_stage(info, stage, device, DTYPES[dtype])
            height, width = trace_size(info.stages)
            example = random_inputs(spec, 2, height, width, context, torch.Generator().manual_seed(0), DTYPES[dtype])
            example = [x.to(device) for x in example]
            files = export_module(module, spec, folder, example, opset=opset, exporter=exporter,
                                  external_data_bytes=external_data_bytes,
                                  metadata={"flowie.stage": stage, "flowie.dtype": dtype,
                                            "flowie.source_sha256": info.source_sha256},
                                  # The old record goes with the old file; a new one only once verified.
                                  before_replace=lambda record=sidecar_file: record.unlink(missing_ok=True))
            del module
            say(f"  {stage}: wrote {', '.join(f'{n} ({s / 1e6:.1f} MB)' for n, s in files.items())}; onnx.checker ok")
            action = "exported"
        cases: list[VerifyCase] = []
        if verify:
            try:
                cases = verify_onnx(onnx_path(info.path, stage), reference, spec, context, sizes, batches, tol,
                                    progress=say)
            except VerificationError:
                for name in files:
                    (folder / name).unlink(missing_ok=True)
                sidecar_file.unlink(missing_ok=True)
                raise
        seconds = time.perf_counter() - start
        result = StageExport(stage, onnx_path(info.path, stage), action, seconds, tol, cases)
        record = {
            "stage": stage,
            "key": key,
            "files": files,
            "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in spec.inputs],
            "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in spec.outputs],
            "verification": {"tolerance": tol, "max_rel_err": result.max_rel_err,
                             "cases": [asdict(c) for c in cases]} if verify else None,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        sidecar_file.write_text(json.dumps(record, indent=2) + "\n")
        if verify:
            say(f"  {stage}: max relative error {result.max_rel_err:.2e} (tolerance {tol:g}) in {seconds:.1f} s")
        results.append(result)
        del reference
    return results
