"""The Engine interface and the parts of the back ends that need neither an export nor a GPU:
stage-contract checks, the torch engine, build_pipeline's options, and the TensorRT refusals
(plans for another GPU or TensorRT version, TensorRT missing)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from engines import (
    EngineConfig,
    EngineError,
    ShapeError,
    StaleArtifactError,
    build_engines,
    build_pipeline,
    normalise_backend,
)
from engines.artifacts import TRT_FORMAT, check_plan_meta, find_plan_dir, gpu_slug, trt_dir
from engines.base import bind_axes, output_shapes
from engines.torch_engine import TorchEngine
from flowie.model import load_stage
from flowie.modeldir import read_model_dir
from flowie.stages import FLOW_UNET, STAGES, SWINIR, VAE_DECODER

# ---------------------------------------------------------------- the stage contract


def test_bind_axes_resolves_symbols_and_output_shapes():
    axes = bind_axes(FLOW_UNET, {"x_t": (2, 4, 16, 24), "t": (2,), "c_latent": (2, 4, 16, 24),
                                 "context": (2, 77, 64)})
    assert axes["B"] == 2 and (axes["h"], axes["w"]) == (16, 24) and (axes["H"], axes["W"]) == (128, 192)
    assert output_shapes(FLOW_UNET, axes) == {"v": (2, 4, 16, 24)}
    assert output_shapes(VAE_DECODER, bind_axes(VAE_DECODER, {"latent": (3, 4, 8, 16)})) == {"image": (3, 3, 64, 128)}
    cond = STAGES["cond_encoder"]
    assert output_shapes(cond, bind_axes(cond, {"restored": (1, 3, 64, 128)})) == {"c_latent": (1, 4, 8, 16)}


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({"x_t": (2, 4, 16, 16), "t": (2,), "c_latent": (2, 4, 16, 16)}, "missing \\['context'\\]"),
        ({"x_t": (2, 4, 16, 16), "t": (3,), "c_latent": (2, 4, 16, 16), "context": (2, 77, 64)}, "B"),
        ({"x_t": (2, 8, 16, 16), "t": (2,), "c_latent": (2, 4, 16, 16), "context": (2, 77, 64)}, "must be 4"),
        ({"x_t": (2, 4, 16), "t": (2,), "c_latent": (2, 4, 16, 16), "context": (2, 77, 64)}, "rank"),
        ({"x_t": (2, 4, 16, 16), "t": (2,), "c_latent": (2, 4, 8, 8), "context": (2, 77, 64)}, "h"),
    ],
)
def test_bind_axes_refuses_inputs_outside_the_contract(shapes, message):
    with pytest.raises(ShapeError, match=message):
        bind_axes(FLOW_UNET, shapes)


def test_pixel_sizes_must_divide_into_latents():
    with pytest.raises(ShapeError, match="multiple of 8"):
        bind_axes(STAGES["cond_encoder"], {"restored": (1, 3, 100, 128)})


# ---------------------------------------------------------------- torch engine


@pytest.fixture(scope="module")
def info(tiny_model_dir):
    return read_model_dir(tiny_model_dir)


def test_torch_engine_runs_named_tensors_like_the_module(info):
    engine = TorchEngine.from_model(info, "swinir")
    lq = torch.rand(2, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    out = engine.run({"lq": lq})
    assert set(out) == {"restored"}
    with torch.no_grad():
        assert torch.equal(out["restored"], load_stage(info, "swinir")(lq))
    assert torch.equal(engine(lq), out["restored"])  # positional = Pipeline stage protocol
    assert engine.describe()["backend"] == "torch"
    with pytest.raises(ShapeError):
        engine.run({"image": lq})
    with pytest.raises(ShapeError, match="takes 1 inputs"):
        engine(lq, lq)


def test_torch_engine_options_are_checked(info):
    module = load_stage(info, "vae_decoder")
    with pytest.raises(EngineError, match="float32 on the CPU"):
        TorchEngine(module, VAE_DECODER, "cpu", torch.float16)
    with pytest.raises(EngineError, match="CUDA"):
        TorchEngine(module, VAE_DECODER, "cpu", cuda_graphs=True)
    with pytest.raises(EngineError, match="cudnn_benchmark=True needs a CUDA device"):
        TorchEngine(module, VAE_DECODER, "cpu", cudnn_benchmark=True)
    assert not torch.backends.cudnn.benchmark  # a refused option leaves the process flag alone
    with pytest.raises(EngineError, match="compile"):
        TorchEngine(module, VAE_DECODER, "cpu", compile="fastest")


def test_a_compiled_engine_lets_dynamo_keep_enough_graphs(info, monkeypatch):
    """Past dynamo's recompile limit (8 by default) a stage would silently run eagerly. A compiled
    engine raises it to RECOMPILE_LIMIT (never lowers it); an eager one leaves it alone."""
    import torch._dynamo

    from engines.torch_engine import RECOMPILE_LIMIT

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    TorchEngine(load_stage(info, "vae_decoder"), VAE_DECODER, "cpu")
    assert torch._dynamo.config.recompile_limit == 8
    TorchEngine(load_stage(info, "vae_decoder"), VAE_DECODER, "cpu", compile=True)  # wrapping compiles nothing yet
    assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT >= 32
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 500)
    TorchEngine(load_stage(info, "vae_decoder"), VAE_DECODER, "cpu", compile=True)
    assert torch._dynamo.config.recompile_limit == 500


def test_channels_last_engine_keeps_nhwc_weights_and_returns_nchw_outputs(info):
    nchw = TorchEngine(load_stage(info, "vae_decoder"), VAE_DECODER, "cpu")
    nhwc = TorchEngine(load_stage(info, "vae_decoder"), VAE_DECODER, "cpu", channels_last=True)
    convs = [m.weight for m in nhwc.module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # 1x1 kernels are both; the 3x3 ones are NHWC only
    assert nhwc.describe()["channels_last"] and not nchw.describe()["channels_last"]
    latent = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    ours, reference = nhwc(latent), nchw(latent)
    assert ours.is_contiguous()  # the stage contract's layout, whatever the engine computed in
    assert float((ours - reference).norm() / reference.norm()) < 1e-5  # float32 rounding only


def test_channels_last_follows_the_device_and_names_stages(tiny_model_dir):
    def nhwc(overrides=""):
        engines = build_engines(tiny_model_dir, EngineConfig.for_device("cpu", overrides=overrides))
        return {name for name, engine in engines.items() if engine.describe()["channels_last"]}

    assert nhwc() == {"swinir", "cond_encoder", "vae_decoder"}  # the CPU default: the convolution-heavy stages
    assert nhwc("channels_last=none") == set()
    assert nhwc("channels_last=all") == {"swinir", "cond_encoder", "flow_unet", "vae_decoder"}
    assert nhwc("channels_last=flow_unet") == {"flow_unet"}
    assert EngineConfig.for_device("cuda:1").channels_last == ()  # NCHW on CUDA
    with pytest.raises(ValueError, match="channels_last='unet' names no stage"):
        EngineConfig.for_device("cpu", overrides="channels_last=unet")


def test_engine_casts_inputs_and_returns_float32(info):
    engine = TorchEngine.from_model(info, "vae_decoder")
    out = engine(torch.randn(1, 4, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 64, 64)


# ---------------------------------------------------------------- build_pipeline


def test_build_pipeline_torch_backend_wraps_every_stage(tiny_model_dir):
    pipe = build_pipeline(tiny_model_dir)
    assert pipe.backend == "torch"
    assert {type(s).__name__ for s in pipe.stages.values()} == {"TorchEngine"}


def test_backend_names_and_aliases():
    assert normalise_backend("onnxruntime") == "onnx" and normalise_backend("TRT") == "tensorrt"
    assert normalise_backend(None) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        normalise_backend("openvino")


def test_compile_applies_to_the_named_stages_only(tiny_model_dir):
    """compile_stages narrows torch.compile to two stages: the others stay eager (no compile is
    triggered here: torch.compile wraps lazily, and describe() says what each engine will run)."""
    config = EngineConfig.for_device("cpu", overrides="compile_stages=flow_unet+vae_decoder")
    modes = {name: engine.describe()["compile"] for name, engine in build_engines(tiny_model_dir, config).items()}
    assert modes == {"swinir": None, "cond_encoder": None, "flow_unet": "default", "vae_decoder": "default"}
    every = build_engines(tiny_model_dir, EngineConfig.for_device("cpu", torch_compile=True))
    assert {engine.describe()["compile"] for engine in every.values()} == {"default"}


def test_onnx_backend_without_export_says_to_export(tiny_model_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir, ignore=shutil.ignore_patterns("onnx", "trt"))
    with pytest.raises(StaleArtifactError, match="flowie export --model"):
        build_pipeline(model_dir, EngineConfig.for_device("cpu", backend="onnx"))


def test_importing_engines_does_not_import_torch():
    import subprocess

    code = "import sys, engines, engines.artifacts, engines.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- TensorRT, without TensorRT


def _meta(gpu="NVIDIA H100 80GB HBM3", capability="9.0", trt="10.3.0", precision="fp16"):
    return {"format": TRT_FORMAT, "gpu": {"name": gpu, "compute_capability": capability}, "tensorrt": trt,
            "precision": precision, "stages": {}}


def test_plan_meta_matching_the_host_is_accepted():
    check_plan_meta(_meta(), "NVIDIA H100 80GB HBM3", "9.0", "10.3.0")


@pytest.mark.parametrize(
    "machine, named",
    [
        (("NVIDIA A100-SXM4-80GB", "8.0", "10.3.0"), "GPU 'NVIDIA H100 80GB HBM3'"),
        (("NVIDIA H100 80GB HBM3", "9.0", "10.8.0"), "TensorRT 10.3.0 (this host: 10.8.0)"),
        (("NVIDIA H100 80GB HBM3", "8.9", "10.3.0"), "compute capability 9.0"),
    ],
)
def test_plans_for_another_gpu_or_tensorrt_are_refused_with_the_rebuild_command(machine, named):
    with pytest.raises(StaleArtifactError) as excinfo:
        check_plan_meta(_meta(), *machine, model_dir="/models/bfr")
    message = str(excinfo.value)
    assert named in message
    assert "flowie build-engines --model /models/bfr --fp16" in message


def test_find_plan_dir_explains_why_existing_plans_do_not_apply(tmp_path):
    built = trt_dir(tmp_path, "NVIDIA A100-SXM4-80GB", "10.3.0")
    built.mkdir(parents=True)
    (built / "meta.json").write_text(json.dumps(_meta(gpu="NVIDIA A100-SXM4-80GB", capability="8.0")))
    with pytest.raises(StaleArtifactError, match="were built for GPU 'NVIDIA A100-SXM4-80GB'"):
        find_plan_dir(tmp_path, "NVIDIA H100 80GB HBM3", "9.0", "10.3.0")
    assert find_plan_dir(tmp_path, "NVIDIA A100-SXM4-80GB", "8.0", "10.3.0") == built
    with pytest.raises(StaleArtifactError, match="no TensorRT plans"):
        find_plan_dir(tmp_path / "empty", "NVIDIA H100 80GB HBM3", "9.0", "10.3.0")


def test_plan_directory_is_named_by_gpu_and_tensorrt_version(tmp_path):
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert trt_dir(tmp_path, "NVIDIA H100 80GB HBM3", "10.3.0") == tmp_path / "trt" / "nvidia-h100-80gb-hbm3-trt10.3.0"


def test_without_tensorrt_build_engines_exits_nonzero_with_one_sentence(tiny_model_dir, monkeypatch, capsys):
    from service.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, even where it is
    assert main(["build-engines", "--model", str(tiny_model_dir)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "TensorRT is not installed" in err and "no plans were built" in err


def test_without_tensorrt_the_tensorrt_backend_says_so(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        build_pipeline(tiny_model_dir, EngineConfig.for_device("cuda", backend="tensorrt"))


def test_profiles_come_from_the_stage_envelope_or_the_flag():
    from export.tensorrt import parse_profile, stage_profile

    profile = stage_profile(FLOW_UNET, FLOW_UNET.envelope, (77, 1024))
    env = FLOW_UNET.envelope
    assert profile["x_t"]["min"] == [env.min_batch, 4, env.min_px // 8, env.min_px // 8]
    assert profile["x_t"]["max"] == [env.max_batch, 4, env.max_px // 8, env.max_px // 8]
    assert profile["t"]["opt"] == [env.opt_batch]
    assert profile["context"]["max"] == [env.max_batch, 77, 1024]
    envelope = parse_profile("1x64/2x512/8x1024")
    assert (envelope.min_batch, envelope.opt_batch, envelope.max_batch) == (1, 2, 8)
    assert stage_profile(SWINIR, envelope, (77, 1024))["lq"]["opt"] == [2, 3, 512, 512]
    for bad in ("1x64/1x512", "4x64/1x512/8x1024", "1x60/1x512/8x1024", "64/512/1024"):
        with pytest.raises(ValueError):
            parse_profile(bad)
