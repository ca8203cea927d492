"""Shared by `flowie serve`, `flowie api` and `flowie worker`: settings, logging, HTTP server.

Light at import (argparse only); everything heavy is imported inside the functions.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from service.settings import add_settings_arguments

    add_settings_arguments(parser)


def load(args: argparse.Namespace, command: str) -> tuple[Any, Any] | None:
    """(settings, models by task) or None after writing one line to stderr saying what to do."""
    from flowie.modeldir import ModelDirError
    from service.app import load_models
    from service.logs import configure_logging
    from service.settings import SettingsError, settings_from_args

    try:
        settings = settings_from_args(args)
        config = settings.engine_config()  # refuses overrides this device cannot run, before anything starts
        models = load_models(settings)
    except (SettingsError, ModelDirError) as exc:
        sys.stderr.write(f"flowie {command}: {exc}\n")
        return None
    configure_logging(getattr(args, "log_level", "INFO"), settings.log_json)
    if command != "api":  # the API process runs no network
        from service import hostmem

        # Before any thread starts: glibc fixes its arenas when a second thread first allocates.
        done = hostmem.apply(config.host_malloc)
        logging.getLogger("flowie.service.host").info("host memory", extra={"host_malloc": config.host_malloc,
                                                                             "detail": done})
    return settings, models


def runner_factory(settings: Any, models: dict) -> Any:
    """A zero-argument callable that loads the models (torch) in the worker's own thread."""
    model_dirs = [info.path for info in models.values()]

    def load_runner() -> Any:
        from service.runner import PipelineRunner  # torch: the worker side only

        return PipelineRunner.load(model_dirs, settings.engine_config(), face_detector=settings.face_detector,
                                   background_task=settings.background_task, face_models=settings.face_models,
                                   face_parser=settings.face_parser)

    return load_runner


def redis_queue(settings: Any, tasks: list[str], *, listen: bool) -> Any:
    from service.queue.redis_streams import RedisJobQueue

    return RedisJobQueue(settings.redis_url, tasks=tasks, prefix=settings.key_prefix, max_queue=settings.max_queue,
                         result_ttl_s=settings.result_ttl_s, visibility_timeout_s=settings.visibility_timeout_s,
                         max_deliveries=settings.max_deliveries, max_connections=settings.redis_max_connections,
                         listen=listen)


def serve_http(app: Any, settings: Any) -> int:
    """Run uvicorn; on SIGTERM/SIGINT stop admitting (503), drain requests in flight, then stop."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=int(settings.drain_timeout_s) or None, lifespan="on")
    server = DrainingServer(config)
    server.run()
    return 0 if server.started else 1
