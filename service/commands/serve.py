"""`flowie serve`: API + in-process worker + in-memory queue in one process (the embedded default)."""

from __future__ import annotations

import argparse

from service.commands import _serving


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _serving.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    loaded = _serving.load(args, "serve")
    if loaded is None:
        return 2
    settings, models = loaded
    from service.app import create_app
    from service.metrics import Metrics
    from service.queue.memory import MemoryJobQueue
    from service.worker import Worker

    load_runner = _serving.runner_factory(settings, models)

    metrics = Metrics(role="serve")
    queue = MemoryJobQueue(max_queue=settings.max_queue, result_ttl_s=settings.result_ttl_s,
                           max_results=settings.max_stored_results,
                           max_result_bytes=settings.max_stored_result_mib << 20)
    worker = Worker(queue, load_runner, settings, metrics)
    app = create_app(settings, queue, models, worker=worker, metrics=metrics)
    return _serving.serve_http(app, settings)
