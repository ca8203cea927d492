"""The engine configuration resolves every default once per device; captures stay bounded."""

from __future__ import annotations

import pytest

from engines.captures import CaptureCache
from engines.config import EngineConfig, parse_overrides

ALL = ("swinir", "cond_encoder", "flow_unet", "vae_decoder")


def test_on_cuda_the_measured_gpu_path_is_the_default():
    config = EngineConfig.for_device("cuda:1")
    assert (config.dtype, config.cuda_graphs, config.cudnn_benchmark, config.control_stream) == ("float16", True,
                                                                                                   True, True)
    assert (config.channels_last, config.tile_batch, config.encode_overlap, config.host_malloc) == ((), 8, True, False)
    assert (config.spill_dir, config.png_compress_level, config.compile_stages) == (None, 1, ())


def test_on_the_cpu_float32_eager_nhwc_convolutions_and_tiles_by_area():
    config = EngineConfig.for_device("cpu")
    assert (config.dtype, config.cuda_graphs, config.cudnn_benchmark, config.control_stream) == ("float32", False,
                                                                                                   False, False)
    assert config.channels_last == ("swinir", "cond_encoder", "vae_decoder")
    assert [config.tiles_per_call(px) for px in (512, 256, 128)] == [1, 4, 16]
    assert (config.encode_overlap, config.host_malloc) == (False, True)


def test_other_back_ends_on_cuda_run_float32_without_the_torch_options():
    config = EngineConfig.for_device("cuda", backend="ort")
    assert (config.backend, config.dtype, config.cuda_graphs, config.control_stream) == ("onnx", "float32", False,
                                                                                           False)
    assert EngineConfig.for_device("cuda", torch_compile=True).compile_stages == ALL
    assert EngineConfig.for_device("cuda", backend="onnx", torch_compile=True).compile_stages == ()


def test_overrides_are_typed_and_each_mistake_is_named():
    assert parse_overrides(" cuda_graphs=OFF, tile_batch=4,channels_last=swinir+vae_decoder ,") == {
        "cuda_graphs": False, "tile_batch": 4, "channels_last": ("swinir", "vae_decoder")}
    assert parse_overrides("") == {}
    for bad, says in (("tile_batch", "expected key=value"), ("tiles=3", "expected key=value"),
                      ("cuda_graphs=maybe", "is not on or off"), ("codec_threads=0", "from 1 to 64"),
                      ("compile_mode=fast", "is not one of default"), ("compile_stages=unet", "names no stage")):
        with pytest.raises(ValueError, match=says):
            parse_overrides(bad)


def test_overrides_that_the_device_cannot_run_are_refused():
    with pytest.raises(ValueError, match="cuda_graphs=on needs a CUDA device"):
        EngineConfig.for_device("cpu", overrides="cuda_graphs=on")
    with pytest.raises(ValueError, match="float16 on cpu"):
        EngineConfig.for_device("cpu", dtype="float16")
    with pytest.raises(ValueError, match="reduce-overhead"):
        EngineConfig.for_device("cuda", torch_compile=True, overrides="compile_mode=reduce-overhead")
    assert not EngineConfig.for_device("cuda", torch_compile=True,
                                       overrides="compile_mode=reduce-overhead,cuda_graphs=off").cuda_graphs


def test_the_torch_options_of_each_stage():
    config = EngineConfig.for_device("cuda", overrides="compile_stages=flow_unet,cuda_graph_cache=3")
    assert config.torch_options("flow_unet") == {"compile": "default", "cuda_graphs": True, "cuda_graph_cache": 3,
                                                 "cudnn_benchmark": True, "channels_last": False,
                                                 "control_stream": True}
    assert config.torch_options("swinir")["compile"] is False
    assert config.torch_options("swinir")["control_stream"] is False


def test_captures_made_during_the_warm_up_stay_and_the_rest_share_an_lru_of_its_size():
    made: list[str] = []
    cache: CaptureCache[str] = CaptureCache(size=2)

    def get(key: str) -> str | None:
        return cache.get(key, lambda: made.append(key) or f"graph {key}")

    cache.start_warmup()
    assert [get(k) for k in ("a", "b", "c")] == ["graph a", "graph b", "graph c"]
    cache.end_warmup()
    for key in ("d", "e", "a", "d", "f", "e", "b"):  # d is used again before f comes: e is the oldest
        get(key)
    assert made == ["a", "b", "c", "d", "e", "f", "e"]
    assert sorted(cache.pinned) == ["a", "b", "c"] and list(cache.recent) == ["f", "e"]
    assert len(cache) == 5 and cache.captures == 7


def test_with_no_room_shapes_outside_the_warm_up_run_eagerly():
    cache: CaptureCache[int] = CaptureCache(size=0)
    cache.start_warmup()
    assert cache.get("warm", lambda: 1) == 1
    cache.end_warmup()
    assert cache.get("new", lambda: 2) is None and cache.get("warm", lambda: 3) == 1
    assert (len(cache), cache.captures) == (1, 1)
    with pytest.raises(ValueError, match="0 or more"):
        CaptureCache(size=-1)


def test_a_shape_captured_before_the_warm_up_moves_to_the_kept_set_without_a_second_capture():
    cache: CaptureCache[str] = CaptureCache(size=1)
    cache.get("a", lambda: "first")
    cache.start_warmup()
    assert cache.get("a", lambda: "second") == "first"
    cache.end_warmup()
    cache.get("b", lambda: "b")
    assert cache.get("a", lambda: "third") == "first" and cache.captures == 2
