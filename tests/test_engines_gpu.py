"""GPU back ends: torch on CUDA (fp16/bf16, CUDA graphs, torch.compile), onnxruntime with IO
binding, TensorRT plans. Marked ``gpu`` / ``tensorrt`` and skipped, with the reason, where no
CUDA GPU (or no TensorRT, or no onnxruntime-gpu) is present."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from engines import EngineConfig, build_pipeline
from flowie.model import load_stage
from flowie.modeldir import read_model_dir
from flowie.params import EnhanceParams

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible to torch here)")
needs_trt = pytest.mark.skipif(not (HAS_CUDA and HAS_TRT), reason="needs TensorRT >= 10 and a CUDA GPU (not present here)")
needs_ort_cuda = pytest.mark.skipif(not (HAS_CUDA and _ort_has_cuda()),
                                    reason="needs onnxruntime-gpu with the CUDA provider and a CUDA GPU (not present here)")


@pytest.fixture(autouse=True)
def _exact_float32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def info(tiny_model_dir):
    return read_model_dir(tiny_model_dir)


def _images(pipe, fixture_dir):
    lq = np.load(fixture_dir / "inputs" / "lq.npy")
    x_T = torch.from_numpy(np.load(fixture_dir / "inputs" / "x_T.npy"))
    params = EnhanceParams(upscale=1.0, min_side=0, tile="off")
    return np.stack([r.image for r in pipe.enhance(list(lq), params, noise=x_T)]).astype(np.int16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_torch_engine_half_precision_on_cuda_is_close_to_fp32(info, dtype, tolerance):
    from engines.torch_engine import TorchEngine

    g = torch.Generator().manual_seed(0)
    x_t, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999.0, 399.0])
    ctx = torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        ref = load_stage(info, "flow_unet")(x_t, t, c, ctx)
    engine = TorchEngine.from_model(info, "flow_unet", "cuda", dtype)
    out = engine.run({"x_t": x_t, "t": t, "c_latent": c, "context": ctx})["v"]
    assert out.dtype == dtype and out.device.type == "cuda"
    assert rel_err(out, ref) <= tolerance


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_equals_eager_for_each_shape(info):
    from engines.torch_engine import TorchEngine

    eager = TorchEngine.from_model(info, "vae_decoder", "cuda")
    graphed = TorchEngine.from_model(info, "vae_decoder", "cuda", cuda_graphs=True)
    for shape in [(1, 4, 16, 16), (2, 4, 16, 24), (1, 4, 16, 16)]:
        latent = torch.randn(shape, device="cuda")
        first = graphed(latent)
        second = graphed(latent * 2)  # must not overwrite the first result
        assert rel_err(first, eager(latent)) <= 1e-6
        assert rel_err(second, eager(latent * 2)) <= 1e-6
    assert graphed.describe()["graphs_kept"] == 2 and graphed.describe()["graphs_captured"] == 2


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_keep_the_warm_up_shapes_and_at_most_the_cache_size_more(info):
    """cuda_graph_cache 1: the warm-up's shape stays captured, later shapes share one slot (each new
    one replaces the last), and every output still equals eager's."""
    from engines.torch_engine import TorchEngine

    eager = TorchEngine.from_model(info, "vae_decoder", "cuda")
    graphed = TorchEngine.from_model(info, "vae_decoder", "cuda", cuda_graphs=True, cuda_graph_cache=1)
    graphed.start_warmup()
    warm = torch.randn(1, 4, 16, 16, device="cuda")
    graphed(warm)
    graphed.end_warmup()
    for shape in [(1, 4, 16, 24), (1, 4, 24, 16), (1, 4, 16, 16), (1, 4, 16, 24)]:
        latent = torch.randn(shape, device="cuda")
        assert rel_err(graphed(latent), eager(latent)) <= 1e-6
    assert graphed.describe()["graphs_kept"] == 2  # the warm-up's + one
    assert graphed.describe()["graphs_captured"] == 4  # 16x24 twice: dropped in between


@pytest.mark.gpu
@needs_cuda
def test_cudnn_benchmark_sets_the_process_flag_and_keeps_the_numbers(info):
    from engines.torch_engine import TorchEngine

    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        eager = TorchEngine.from_model(info, "vae_decoder", "cuda")
        latent = torch.randn(2, 4, 16, 24, device="cuda")
        reference = eager(latent)
        tuned = TorchEngine.from_model(info, "vae_decoder", "cuda", cudnn_benchmark=True)
        assert torch.backends.cudnn.benchmark and tuned.describe()["cudnn_benchmark"]
        assert rel_err(tuned(latent), reference) <= 1e-2  # another algorithm (TF32 convolutions by default)
    finally:
        torch.backends.cudnn.benchmark = previous


@pytest.mark.gpu
@needs_cuda
def test_control_stream_gives_the_one_stream_numbers_eager_and_under_cuda_graphs(info):
    """control_stream: the ControlNet on a second stream computes the same operations, so the
    same numbers (kernels may be chosen per stream, hence a float32 tolerance and not bit equality);
    a CUDA graph captures the fork and join and replays them for each shape."""
    from engines.errors import EngineError
    from engines.torch_engine import TorchEngine

    g = torch.Generator().manual_seed(1)
    feeds = []
    for b, h, w in [(1, 16, 16), (2, 16, 24)]:
        feeds.append({"x_t": torch.randn(b, 4, h, w, generator=g), "t": torch.full((b,), 599.0),
                      "c_latent": torch.randn(b, 4, h, w, generator=g), "context": torch.randn(b, 77, 64, generator=g)})
    one_stream = TorchEngine.from_model(info, "flow_unet", "cuda")
    two_eager = TorchEngine.from_model(info, "flow_unet", "cuda", control_stream=True)
    two_graphed = TorchEngine.from_model(info, "flow_unet", "cuda", control_stream=True, cuda_graphs=True)
    assert two_graphed.describe()["control_stream"] and two_graphed.module.control_stream
    for feed in feeds + feeds:  # the second round replays the captured graphs
        ref = one_stream.run(feed)["v"]
        assert rel_err(two_eager.run(feed)["v"], ref) <= 1e-6
        assert rel_err(two_graphed.run(feed)["v"], ref) <= 1e-6
    with pytest.raises(EngineError, match="flow_unet stage only"):
        TorchEngine.from_model(info, "vae_decoder", "cuda", control_stream=True)


@pytest.mark.gpu
@needs_cuda
def test_torch_compile_matches_eager(info):
    from engines.torch_engine import TorchEngine

    latent = torch.randn(1, 4, 16, 16, device="cuda")
    eager = TorchEngine.from_model(info, "vae_decoder", "cuda")(latent)
    compiled = TorchEngine.from_model(info, "vae_decoder", "cuda", compile=True)(latent)
    assert rel_err(compiled, eager) <= 1e-4


@pytest.mark.gpu
@needs_cuda
def test_cuda_pipeline_reproduces_the_official_images(tiny_model_dir, fixture_dir):

    ours = _images(build_pipeline(tiny_model_dir, EngineConfig.for_device("cuda", dtype="float32", overrides="cuda_graphs=off")), fixture_dir)
    official = np.load(fixture_dir / "expected" / "meanvalue_wavelet_uint8.npy").astype(np.int16)
    assert np.abs(ours - official).max() <= 1


@pytest.fixture(scope="module")
def exported_dir(tiny_model_dir, tmp_path_factory):
    from export.onnx import export_model

    dest = tmp_path_factory.mktemp("gpu_export") / "model"
    shutil.copytree(tiny_model_dir, dest)
    export_model(dest, sizes=[(128, 128)], batches=[1])
    return dest


@pytest.mark.gpu
@needs_ort_cuda
def test_onnxruntime_cuda_with_io_binding_matches_torch(exported_dir, fixture_dir):

    config = EngineConfig.for_device("cuda", backend="onnx", overrides="trt_ep_cache=off")
    pipe = build_pipeline(exported_dir, dataclasses.replace(config, providers=("CUDAExecutionProvider",
                                                                               "CPUExecutionProvider")))
    assert pipe.stages["flow_unet"].providers[0] == "CUDAExecutionProvider"
    ours = _images(pipe, fixture_dir)
    torch_images = _images(build_pipeline(exported_dir), fixture_dir)
    assert np.abs(ours - torch_images).max() <= 1


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_plans_build_skip_and_give_the_torch_images(exported_dir, fixture_dir):
    from export.tensorrt import BuildOptions, build_engines, parse_profile

    options = BuildOptions(envelope=parse_profile("1x64/2x128/2x256"), workspace_gb=2)
    messages: list[str] = []
    plan_dir = build_engines(exported_dir, options=options, progress=messages.append)
    meta = json.loads((plan_dir / "meta.json").read_text())
    assert meta["gpu"]["name"] == torch.cuda.get_device_name()
    assert set(meta["stages"]) == {"swinir", "cond_encoder", "flow_unet", "vae_decoder"}
    assert (plan_dir / "timing.cache").is_file()
    messages.clear()
    build_engines(exported_dir, options=options, progress=messages.append)
    assert sum("up to date" in m for m in messages) == 4
    pipe = build_pipeline(exported_dir, EngineConfig.for_device("cuda", backend="tensorrt"))
    ours = _images(pipe, fixture_dir)
    torch_images = _images(build_pipeline(exported_dir), fixture_dir)
    assert np.abs(ours - torch_images).max() <= 1


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_engine_refuses_a_plan_from_another_gpu(exported_dir):
    from engines import StaleArtifactError
    from export.tensorrt import BuildOptions, build_engines, parse_profile

    plan_dir = build_engines(exported_dir, options=BuildOptions(envelope=parse_profile("1x64/2x128/2x256")))
    meta_file = plan_dir / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "tensorrt": "9.0.0"}))
    try:
        with pytest.raises(StaleArtifactError, match="flowie build-engines"):
            build_pipeline(exported_dir, EngineConfig.for_device("cuda", backend="tensorrt"))
    finally:
        meta_file.write_text(json.dumps(meta))
