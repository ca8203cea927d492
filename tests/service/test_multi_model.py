"""One service, several models: one per task, chosen by the `task` field (--model is repeatable)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from svc_helpers import FAST, png

from engines import EngineConfig
from service.settings import load_settings


@pytest.fixture(scope="module")
def two_task_client(tiny_model_dir, tiny_bsr_model_dir, make_settings):
    from service.app import create_app, load_models
    from service.metrics import Metrics
    from service.queue.memory import MemoryJobQueue
    from service.runner import PipelineRunner
    from service.worker import Worker

    settings = make_settings(model_dirs=[tiny_model_dir, tiny_bsr_model_dir])
    runner = PipelineRunner.load(settings.model_dirs)
    queue, metrics = MemoryJobQueue(8, 60), Metrics()
    app = create_app(settings, queue, load_models(settings), worker=Worker(queue, lambda: runner, settings, metrics),
                     metrics=metrics)
    with TestClient(app) as client:
        yield client


def test_each_task_is_served_by_its_own_model(two_task_client):
    models = two_task_client.get("/models").json()
    assert sorted(m["task"] for m in models["models"]) == ["bfr", "bsr"]
    for task in ("bfr", "bsr"):
        response = two_task_client.post("/enhance", files={"image": ("a.png", png(), "image/png")},
                                        data={**FAST, "task": task, "sampler": "one_step"},
                                        headers={"Accept": "application/json"})
        assert response.status_code == 200, response.text
    depth = [line for line in two_task_client.get("/metrics").text.splitlines()
             if line.startswith("flowie_queue_depth{")]
    assert len(depth) == 2


def test_two_model_directories_for_one_task_are_refused(tiny_model_dir, make_settings):
    from service.app import load_models
    from service.settings import SettingsError

    with pytest.raises(SettingsError, match="one per task"):
        load_models(make_settings(model_dirs=[tiny_model_dir, tiny_model_dir]))


def test_the_runner_compiles_every_stage_with_torch_compile_or_those_an_override_names(tiny_model_dir):
    """FLOWIE_TORCH_COMPILE reaches the engines: on wraps every stage in torch.compile, off none;
    compile_stages names some. (Wrapping is lazy: this builds the engines and compiles nothing.)"""
    from service.runner import PipelineRunner

    def compiled(**settings) -> set[str]:
        pipe = PipelineRunner.load([tiny_model_dir], load_settings(**settings).engine_config()).pipelines["bfr"]
        return {name for name, engine in pipe.stages.items() if engine.describe()["compile"]}

    assert compiled(torch_compile=True) == {"swinir", "cond_encoder", "flow_unet", "vae_decoder"}
    assert compiled() == set()
    assert compiled(engine_overrides="compile_stages=flow_unet+vae_decoder") == {"flow_unet", "vae_decoder"}


def test_the_runner_names_a_size_probe_only_when_networks_are_compiled(tiny_model_dir):
    """Runner.shape_probe: with a compiled stage, a size 64 taller and 128 wider than the warm-up size
    (both sides differ, so dynamo makes both symbolic); none when nothing is compiled, and none when
    that size would be tiled (tiles have the tile's shape). The tiny model tiles above 1 MP."""
    from service.runner import PipelineRunner

    compiled = PipelineRunner.load([tiny_model_dir], EngineConfig.for_device("cpu", overrides="compile_stages=vae_decoder"))
    assert compiled.shape_probe("bfr", 128, 128) == (192, 256)
    assert compiled.shape_probe("bfr", 960, 896) == (1024, 1024)  # 1 MP: still untiled
    assert compiled.shape_probe("bfr", 960, 960) is None  # 1024 x 1088 would be tiled
    assert PipelineRunner.load([tiny_model_dir]).shape_probe("bfr", 128, 128) is None


def test_the_runner_s_pipelines_take_the_tiles_per_call_of_the_engine_configuration(tiny_model_dir):
    from service.runner import PipelineRunner

    auto = PipelineRunner.load([tiny_model_dir]).pipelines["bfr"]
    # on the CPU: as many tiles as fill one official 512-pixel tile per call
    assert (auto.tiles_per_call(512), auto.tiles_per_call(128)) == (1, 16)
    three = PipelineRunner.load([tiny_model_dir], EngineConfig.for_device("cpu", overrides="tile_batch=3"))
    assert three.pipelines["bfr"].tiles_per_call(128) == 3
    assert EngineConfig.for_device("cuda").tiles_per_call(128) == 8  # on CUDA 8 whatever the tile


def test_the_runner_names_the_tile_size_and_its_rows_per_call_for_the_warm_up_on_cuda_only(tiny_model_dir):
    """Runner.tile_rows: on CUDA, for the model's pixel tile (512 here), the rows a tiled call can hold
    (tile_batch); 0 for other sizes and on the CPU (no per-shape cost to warm away there)."""
    from service.runner import PipelineRunner

    cpu = PipelineRunner.load([tiny_model_dir], EngineConfig.for_device("cpu", overrides="tile_batch=6"))
    assert cpu.tile_rows("bfr", 512, 512) == 0
    pipe = cpu.pipelines["bfr"]
    as_cuda = PipelineRunner({"bfr": pipe}, EngineConfig.for_device("cuda:0", overrides="tile_batch=6"))  # the rule only
    assert (pipe.pixel_tile, as_cuda.tile_rows("bfr", 512, 512)) == (512, 6)
    assert as_cuda.tile_rows("bfr", 512, 448) == as_cuda.tile_rows("bfr", 256, 256) == 0


def test_no_tile_rows_when_the_model_s_tiles_differ_by_stage():
    """The demo's pixel tiles (576 px) and UNet tiles (16 latents) differ: its tiled calls are not
    shaped like a batch of tile-sized images, so the warm-up has nothing to add."""
    from pathlib import Path

    from service.runner import PipelineRunner

    demo = Path(__file__).resolve().parents[2] / "models" / "demo"
    pipe = next(iter(PipelineRunner.load([demo]).pipelines.values()))
    as_cuda = PipelineRunner({"restore": pipe}, EngineConfig.for_device("cuda:0"))  # the rule only: nothing runs
    assert (pipe.pixel_tile, pipe.latent_tile) == (576, 16)
    assert as_cuda.tile_rows("restore", 576, 576) == 0
