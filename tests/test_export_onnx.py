"""`flowie export` makes ONNX files that onnxruntime runs like torch, and the onnx back end
gives the same images as the torch back end.

All on the CPU with the converted reference fixture (tiny networks). The export is done once
per module into a copy of the model directory; tests that change files make their own copy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from engines import EngineConfig, StaleArtifactError, build_engines, build_pipeline
from engines.artifacts import onnx_path, onnx_sidecar_path
from export.onnx import ExportError, VerificationError, export_model, export_module, verify_onnx
from flowie.model import load_null_context, load_stage
from flowie.modeldir import read_model_dir
from flowie.params import EnhanceParams
from flowie.pipeline import Pipeline
from flowie.stages import STAGE_NAMES as STAGE_ORDER
from flowie.stages import STAGES

FP32_TOLERANCE = 1e-4

ONNX_CPU = EngineConfig.for_device("cpu", backend="onnx")


@pytest.fixture(scope="module")
def model_copy(tiny_model_dir, tmp_path_factory):
    """A private copy of the converted fixture, so exports never touch the shared one."""
    dest = tmp_path_factory.mktemp("export") / "model"
    shutil.copytree(tiny_model_dir, dest)
    return dest


@pytest.fixture(scope="module")
def exported(model_copy):
    """All four stages exported (fp32) and verified by export_model itself."""
    messages: list[str] = []
    results = export_model(model_copy, progress=messages.append)
    return model_copy, results, messages


def _fresh_copy(tiny_model_dir, tmp_path, with_onnx_from=None):
    dest = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dest)
    if with_onnx_from is not None:
        shutil.copytree(with_onnx_from / "onnx", dest / "onnx")
    return dest


# ---------------------------------------------------------------- export + verification


def test_every_stage_is_exported_with_the_stage_contract(exported):
    import onnx

    model_dir, results, _ = exported
    assert [r.stage for r in results] == list(STAGE_ORDER)
    assert all(r.action == "exported" for r in results)
    for stage in STAGE_ORDER:
        spec = STAGES[stage]
        proto = onnx.load(str(onnx_path(model_dir, stage)), load_external_data=False)
        onnx.checker.check_model(proto)
        assert [i.name for i in proto.graph.input] == spec.input_names
        assert [o.name for o in proto.graph.output] == spec.output_names
        # Batch and spatial axes are symbolic, not baked to the traced shape.
        for tensor, value in zip(spec.inputs, proto.graph.input, strict=True):
            dims = value.type.tensor_type.shape.dim
            for declared, dim in zip(tensor.shape, dims, strict=True):
                if isinstance(declared, str):
                    assert dim.dim_param, f"{stage}.{tensor.name}: axis {declared} was exported as {dim.dim_value}"
                else:
                    assert dim.dim_value == declared


def test_onnxruntime_matches_torch_per_stage_at_two_sizes_and_two_batches(exported):
    model_dir, results, messages = exported
    for result in results:
        shapes = {(c.height, c.width) for c in result.cases}
        batches = {c.batch for c in result.cases}
        assert len(shapes) == 2 and len(batches) == 2, f"{result.stage}: cases {result.cases}"
        assert result.max_rel_err <= FP32_TOLERANCE, f"{result.stage}: relative error {result.max_rel_err:.3g}"
        sidecar = json.loads(onnx_sidecar_path(model_dir, result.stage).read_text())
        assert sidecar["verification"]["max_rel_err"] == pytest.approx(result.max_rel_err)
    # The progress output names the max relative error of each stage.
    assert sum("max relative error" in m for m in messages) == 4


def test_one_onnx_file_serves_new_shapes_through_the_engine(exported, tiny_model_dir):
    """A batch of 3 at 192x128 (neither traced nor verified) through the onnx engine equals torch."""
    model_dir, _, _ = exported
    info = read_model_dir(model_dir)
    engines = build_engines(model_dir, ONNX_CPU, stages=("swinir", "flow_unet"))
    context = load_null_context(info)
    g = torch.Generator().manual_seed(7)
    lq = torch.rand(3, 3, 192, 128, generator=g)
    ref = load_stage(info, "swinir")(lq)
    out = engines["swinir"](lq)
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) <= FP32_TOLERANCE
    x_t, c = torch.randn(3, 4, 24, 16, generator=g), torch.randn(3, 4, 24, 16, generator=g)
    t = torch.tensor([999.0, 399.0, 0.0])
    ctx = context.expand(3, -1, -1)
    with torch.no_grad():
        ref_v = load_stage(info, "flow_unet")(x_t, t, c, ctx)
    v = engines["flow_unet"].run({"x_t": x_t, "t": t, "c_latent": c, "context": ctx})["v"]
    assert float((v - ref_v).norm() / ref_v.norm()) <= FP32_TOLERANCE


def test_second_export_skips_up_to_date_files(exported):
    model_dir, _, _ = exported
    before = {s: onnx_path(model_dir, s).stat().st_mtime_ns for s in STAGE_ORDER}
    messages: list[str] = []
    again = export_model(model_dir, progress=messages.append)
    assert [r.action for r in again] == ["skipped"] * 4
    assert {s: onnx_path(model_dir, s).stat().st_mtime_ns for s in STAGE_ORDER} == before
    assert all("up to date" in m for m in messages)


def test_changed_opset_or_dtype_is_not_up_to_date(exported):
    from export.onnx import _is_current, export_key

    model_dir, _, _ = exported
    info = read_model_dir(model_dir)
    sidecar = json.loads(onnx_sidecar_path(model_dir, "swinir").read_text())
    folder = model_dir / "onnx"
    assert _is_current(sidecar, export_key(info, "swinir", "fp32", 17, "torchscript"), folder)
    assert not _is_current(sidecar, export_key(info, "swinir", "fp32", 18, "torchscript"), folder)
    assert not _is_current(sidecar, export_key(info, "swinir", "fp16", 17, "torchscript"), folder)
    other = {**sidecar, "key": {**sidecar["key"], "torch": "0.0"}}
    assert not _is_current(other, export_key(info, "swinir", "fp32", 17, "torchscript"), folder)


def test_verification_fails_loudly_and_keeps_no_file(exported, tiny_model_dir, tmp_path):
    from service.cli import main

    model_dir = _fresh_copy(tiny_model_dir, tmp_path)
    code = main(["export", "--model", str(model_dir), "--stages", "cond_encoder", "--tolerance", "1e-12",
                 "--verify-sizes", "128", "--verify-batches", "1"])
    assert code == 1
    assert not onnx_path(model_dir, "cond_encoder").exists()
    assert not onnx_sidecar_path(model_dir, "cond_encoder").exists()


def test_verify_onnx_reports_a_wrong_module(exported):
    """A 1 % different torch module is caught (the check is not vacuous)."""
    model_dir, _, _ = exported
    info = read_model_dir(model_dir)
    decoder = load_stage(info, "vae_decoder")

    class Off(torch.nn.Module):
        def forward(self, latent):
            return decoder(latent) * 1.01

    with pytest.raises(VerificationError, match="relative error"):
        verify_onnx(onnx_path(model_dir, "vae_decoder"), Off(), STAGES["vae_decoder"], load_null_context(info),
                    [(128, 128)], [1], FP32_TOLERANCE)


def test_large_weights_go_to_one_external_data_file(exported, tmp_path):
    """Above the threshold (2 GB in use; 0 here) weights move to <stage>.onnx.data, one file."""
    model_dir, _, _ = exported
    info = read_model_dir(model_dir)
    module = load_stage(info, "cond_encoder")
    spec = STAGES["cond_encoder"]
    example = [torch.rand(2, 3, 192, 128)]
    files = export_module(module, spec, tmp_path, example, external_data_bytes=0)
    assert set(files) == {"cond_encoder.onnx", "cond_encoder.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cond_encoder.onnx", "cond_encoder.onnx.data"]
    cases = verify_onnx(tmp_path / "cond_encoder.onnx", module, spec, load_null_context(info), [(128, 128)], [1],
                        FP32_TOLERANCE)
    assert cases[0].rel_err <= FP32_TOLERANCE


def test_fp16_export_runs_in_onnxruntime_close_to_fp32_torch(exported, tiny_model_dir, tmp_path):
    model_dir = _fresh_copy(tiny_model_dir, tmp_path)
    result = export_model(model_dir, stages=["vae_decoder"], dtype="fp16", sizes=[(128, 128)], batches=[1])[0]
    assert result.max_rel_err <= 1e-2
    sidecar = json.loads(onnx_sidecar_path(model_dir, "vae_decoder").read_text())
    assert sidecar["key"]["dtype"] == "fp16"
    # The onnx back end refuses to feed fp32 to an fp16 file unless asked for float16.
    from engines import EngineError

    with pytest.raises(EngineError, match="--dtype fp32"):
        build_engines(model_dir, ONNX_CPU, stages=("vae_decoder",))
    engine = build_engines(model_dir, dataclasses.replace(ONNX_CPU, dtype="float16"), stages=("vae_decoder",))["vae_decoder"]
    assert engine.precision == torch.float16
    assert engine(torch.randn(1, 4, 16, 16)).dtype == torch.float32


def test_unknown_exporter_dtype_and_stage_are_refused(exported):
    model_dir, _, _ = exported
    with pytest.raises(ExportError, match="exporter"):
        export_model(model_dir, exporter="magic")
    with pytest.raises(ExportError, match="dtype"):
        export_model(model_dir, dtype="int8")
    with pytest.raises(ExportError, match="unknown stage"):
        export_model(model_dir, stages=["text_encoder"])


def test_dynamo_exporter_without_onnxscript_says_what_to_install(exported, monkeypatch):
    import sys

    model_dir, _, _ = exported
    before = onnx_sidecar_path(model_dir, "cond_encoder").read_text()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match="onnxscript"):
        export_model(model_dir, stages=["cond_encoder"], exporter="dynamo", verify=False)
    # A failed export leaves the existing file and its record alone.
    assert onnx_sidecar_path(model_dir, "cond_encoder").read_text() == before
    build_engines(model_dir, ONNX_CPU, stages=("cond_encoder",))


def test_onnx_engine_refuses_files_from_other_weights(exported, tiny_model_dir, tmp_path):
    model_dir = _fresh_copy(tiny_model_dir, tmp_path, with_onnx_from=exported[0])
    sidecar_file = onnx_sidecar_path(model_dir, "swinir")
    sidecar = json.loads(sidecar_file.read_text())
    sidecar["key"]["weights"]["source_sha256"] = "0" * 64
    sidecar_file.write_text(json.dumps(sidecar))
    with pytest.raises(StaleArtifactError, match="flowie export"):
        build_engines(model_dir, ONNX_CPU, stages=("swinir",))
    (model_dir / "onnx" / "cond_encoder.onnx").unlink()
    with pytest.raises(StaleArtifactError, match="does not exist"):
        build_engines(model_dir, ONNX_CPU, stages=("cond_encoder",))


# ---------------------------------------------------------------- same images through the Pipeline


@pytest.fixture(scope="module")
def fixture_inputs(fixture_dir):
    return np.load(fixture_dir / "inputs" / "lq.npy"), torch.from_numpy(np.load(fixture_dir / "inputs" / "x_T.npy"))


def _images(pipe: Pipeline, lq, x_T) -> np.ndarray:
    params = EnhanceParams(upscale=1.0, min_side=0, tile="off")  # model defaults: mean_value, 5 steps, wavelet
    return np.stack([r.image for r in pipe.enhance(list(lq), params, noise=x_T)])


def test_onnx_pipeline_gives_the_torch_pipelines_images(exported, fixture_inputs, fixture_dir):
    model_dir, _, _ = exported
    lq, x_T = fixture_inputs
    torch_images = _images(build_pipeline(model_dir), lq, x_T)
    onnx_pipe = build_pipeline(model_dir, ONNX_CPU)
    assert onnx_pipe.backend == "onnx"
    onnx_images = _images(onnx_pipe, lq, x_T)
    diff = np.abs(torch_images.astype(np.int16) - onnx_images.astype(np.int16))
    assert diff.max() <= 1, f"torch and onnx images differ by {diff.max()} levels"
    # And both reproduce the official implementation's output.
    official = np.load(fixture_dir / "expected" / "meanvalue_wavelet_uint8.npy")
    assert np.abs(onnx_images.astype(np.int16) - official.astype(np.int16)).max() <= 1


def test_enhance_cli_backend_onnx_writes_the_official_images(exported, fixture_dir, tmp_path):
    """`flowie enhance --backend onnx` (one image per call) writes what the torch back end writes,
    which is the official output (test_reference_parity checks torch against it)."""
    from PIL import Image

    from service.cli import main

    model_dir, _, _ = exported
    code = main(["enhance", str(fixture_dir / "inputs" / "lq.npy"), "--model", str(model_dir), "--noise",
                 str(fixture_dir / "inputs" / "x_T.npy"), "--min-side", "0", "--tile", "off",
                 "-o", str(tmp_path), "--backend", "onnx"])
    assert code == 0
    official = np.load(fixture_dir / "expected" / "meanvalue_wavelet_uint8.npy").astype(np.int16)
    for i in range(official.shape[0]):
        ours = np.asarray(Image.open(tmp_path / f"lq_{i}.png")).astype(np.int16)
        assert np.abs(ours - official[i]).max() <= 1, f"image {i}"


def test_bench_reports_stage_and_end_to_end_timings_with_ratios(exported, tmp_path, capsys):
    from service.cli import main

    model_dir, _, _ = exported
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(model_dir), "--backend", "torch,onnx", "--batch", "1", "--size", "128",
                 "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    stages = {"swinir", "cond_encoder", "flow_unet", "vae_decoder", "end_to_end"}
    for backend in ("torch", "onnx"):
        assert {r["stage"] for r in rows if r["backend"] == backend and r["batch"] == 1} == stages
    for row in rows:
        assert row["median_ms"] > 0 and row["ratio_vs_torch"] > 0
        if row["backend"] == "onnx" and row["stage"] != "end_to_end":
            assert row["rel_diff_vs_first"] <= FP32_TOLERANCE
    assert report["machine"]["torch"] == torch.__version__
    assert "end_to_end" in capsys.readouterr().out
