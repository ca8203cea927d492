"""The GPU benchmark of the served pipeline: ``python3 -m loadtests.gpu_bench --help``.

Every pipeline it times is made by ``engines.build_pipeline`` from a model directory with an
``engines.EngineConfig.for_device`` configuration, so each row measures what a worker serves.
Sections: ``env`` (the machine), ``peak`` (matmul rates, copy bandwidth, FLOPs per stage),
``configs`` (``Pipeline.enhance`` per engine configuration, checked against fp32) and ``warmup``
(the real worker's warm-up, then image sizes it never saw). Large images: run
``loadtests/scaling_bench.py --model <out>/model`` on the model directory this writes.
"""
