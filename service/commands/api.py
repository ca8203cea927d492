"""`flowie api`: the HTTP API alone, joined to `flowie worker` processes by Redis. Never imports torch."""

from __future__ import annotations

import argparse

from service.commands import _serving


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _serving.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    loaded = _serving.load(args, "api")
    if loaded is None:
        return 2
    settings, models = loaded
    from service.app import create_app
    from service.metrics import Metrics

    queue = _serving.redis_queue(settings, list(models), listen=True)
    app = create_app(settings, queue, models, metrics=Metrics(role="api"))
    return _serving.serve_http(app, settings)
