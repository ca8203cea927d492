"""What the routes share: the `ServiceState` on ``app.state.service`` and the dependencies reading it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from flowie.modeldir import ModelInfo
from service.auth import ApiKeyAuth
from service.metrics import Metrics
from service.queue.base import JobQueue
from service.settings import Settings


@dataclass(frozen=True)
class ServiceState:
    """The parts of one app, fixed when `create_app` composes it (draining stays on app.state)."""

    settings: Settings
    queue: JobQueue
    models: dict[str, ModelInfo]  # task -> model; the first is the default task
    worker: Any | None  # a service.worker.Worker when the app runs one in-process
    metrics: Metrics
    auth: ApiKeyAuth

    @property
    def default_task(self) -> str:
        return next(iter(self.models))


def get_service(request: Request) -> ServiceState:
    return request.app.state.service


Service = Annotated[ServiceState, Depends(get_service)]


async def require_api_key(request: Request, service: Service) -> None:
    """401 unless the request carries a configured key (every key passes when none is configured)."""
    await service.auth(request)


def is_draining(request: Request) -> bool:
    """True once shutdown began (the lifespan and the serving command set app.state.draining)."""
    return bool(request.app.state.draining)


Draining = Annotated[bool, Depends(is_draining)]
SECURED = [Depends(require_api_key)]
JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="job id")]
