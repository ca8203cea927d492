"""`flowie worker`: one GPU (``--device cuda:N``) or the CPU; takes jobs from Redis, batches, computes.

Run one per GPU. SIGTERM finishes the batch in progress and hands the rest back to the queue.
The worker's own Prometheus metrics are served on ``--worker-metrics-port``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from service.commands import _serving

log = logging.getLogger("flowie.service.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _serving.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    loaded = _serving.load(args, "worker")
    if loaded is None:
        return 2
    settings, models = loaded
    from prometheus_client import start_http_server

    from service.metrics import Metrics
    from service.worker import Worker

    load_runner = _serving.runner_factory(settings, models)

    metrics = Metrics(role="worker")
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=metrics.registry)
        log.info("worker metrics on http://%s:%d/metrics", settings.host, settings.worker_metrics_port)
    queue = _serving.redis_queue(settings, list(models), listen=False)
    worker = Worker(queue, load_runner, settings, metrics)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        await queue.start()
        try:
            await worker.run()
        finally:
            await queue.close()

    try:
        asyncio.run(main())
    except Exception:  # noqa: BLE001 - logged; the exit status says it failed
        log.exception("worker failed")
        return 1
    return 0
