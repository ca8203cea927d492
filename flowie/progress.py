"""Where a running pipeline call is, for whoever watches it (the service shows it at GET /jobs/{id}).

A caller that wants reports installs a `Progress` around the call with `watching(progress)`; the
pipeline then reports the stage it enters (`report_stage`), a tiled network the tiles it has done
(`report_tiles`) and the sampler its steps (`report_step`, passed as the ``on_step`` callback).
The reports come from deep inside (tiling loops, samplers), so they reach the watcher through a
context variable rather than an argument that every entry point (``enhance``, ``run_batch``,
``run_streamed``) and every tiling helper would carry. Without a watcher a report is one lookup.

Light module: no torch (the service's worker loop imports it).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    """The latest report of one pipeline call: written by the thread that computes, read by any.

    ``stage`` is the network running (swinir, cond_encoder, flow_unet, vae_decoder, colour_fix);
    ``step`` of ``steps`` the sampler's network evaluations done; ``tiles_done`` of ``tiles`` the
    tiles the running network has done in its current pass (0 of 0 when the image is not tiled).
    """

    FIELDS = ("stage", "step", "steps", "tiles_done", "tiles")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report: dict[str, str | int] = {"stage": "", "step": 0, "steps": 0, "tiles_done": 0, "tiles": 0}
        self._version = 0  # bumped by every report, so a reader sees whether anything changed

    def _update(self, **values: str | int) -> None:
        with self._lock:
            self._report.update(values)
            self._version += 1

    def stage(self, name: str) -> None:
        self._update(stage=name, tiles_done=0, tiles=0)

    def step(self, done: int, total: int) -> None:
        self._update(step=int(done), steps=int(total))

    def tiles(self, done: int, total: int) -> None:
        self._update(tiles_done=int(done), tiles=int(total))

    def snapshot(self) -> tuple[int, dict[str, str | int]]:
        """(version, a copy of the report): equal versions mean nothing was reported in between."""
        with self._lock:
            return self._version, dict(self._report)


_watching: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("flowie_progress", default=None)


@contextmanager
def watching(progress: Progress | None) -> Iterator[Progress | None]:
    """Send the reports of the pipeline calls made inside this block (in this context) to ``progress``."""
    token = _watching.set(progress)
    try:
        yield progress
    finally:
        _watching.reset(token)


def report_stage(name: str) -> None:
    progress = _watching.get()
    if progress is not None:
        progress.stage(name)


def report_step(done: int, total: int) -> None:
    progress = _watching.get()
    if progress is not None:
        progress.step(done, total)


def report_tiles(done: int, total: int) -> None:
    progress = _watching.get()
    if progress is not None:
        progress.tiles(done, total)
