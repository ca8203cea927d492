"""The worker's warm-up (``FLOWIE_WARMUP``): which work sizes and batch sizes it runs before ready.

Before it reports ready, the worker runs each warm-up work size once at every batch size up to
``max_batch`` on a blank image, so that the first requests of that size do not pay what a new input
shape costs on a GPU (CUDA-graph capture, the cuDNN algorithm search, torch.compile). A size equal
to a large image's tiles on CUDA runs up to the tiles per network call when that is more: tiled
calls have those shapes (``Runner.tile_rows``). With compiled networks it then runs one more size,
whose sides both differ, at batch 1 and 2, so that dynamo compiles its graphs for any size now and
not when the first odd-sized photo comes (``Runner.shape_probe``). A failing size is logged and
skipped: requests of that size will say more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowie.params import EnhanceParams
from service.runner import Runner
from service.settings import MIN_WARMUP_SIDE, Settings, warmup_sizes

log = logging.getLogger("flowie.service.worker")


@dataclass(frozen=True)
class WarmupRun:
    """One warm-up size of one task, run at batch sizes 1..``batches``; ``why`` is shown in /readyz."""

    task: str
    height: int
    width: int
    batches: int
    why: str = ""


def warmup_plan(runner: Runner, settings: Settings) -> dict[str, list[tuple[int, int]]]:
    """Work sizes (H, W) to warm up, per task: none when off (or auto off CUDA), each task's default
    minimum side when auto, else the listed sizes."""
    setting = settings.warmup
    if setting == "off" or (setting == "auto" and not settings.device.startswith("cuda")):
        return {}
    if setting == "auto":
        sides = {task: runner.default_min_side(task) for task in runner.tasks}
        return {task: [(side, side)] for task, side in sides.items() if side >= MIN_WARMUP_SIDE}
    return {task: warmup_sizes(setting) for task in runner.tasks}


def warmup_runs(runner: Runner, settings: Settings) -> list[WarmupRun]:
    """Every warm-up size at batch sizes up to max_batch (or the tiles per call, when more), and for
    each task whose networks are compiled the size probe at batch 1 and 2."""
    runs = []
    for task, sizes in warmup_plan(runner, settings).items():
        runs += [WarmupRun(task, h, w, max(settings.max_batch, runner.tile_rows(task, h, w))) for h, w in sizes]
        probe = runner.shape_probe(task, *sizes[0]) if sizes else None
        if probe is not None:
            runs.append(WarmupRun(task, *probe, min(2, settings.max_batch), ", compiling for other sizes"))
    return runs


async def warm_up(runner: Runner, runs: list[WarmupRun],
                  on_compute_thread: Callable[..., Awaitable[Any]],
                  report: Callable[[str | None], None], stopping: Callable[[], bool]) -> None:
    """Run ``runs`` through ``runner.enhance`` on the compute thread; ``report`` gets what is running
    (None when done); stops early when ``stopping()`` turns true."""
    total = sum(run.batches for run in runs)
    if not total:
        return
    log.info("warming up: %d batches", total)
    started, done = time.perf_counter(), 0
    params = EnhanceParams(upscale=1.0, min_side=0)  # the image's own size is the work size
    for run in runs:
        blank = np.full((run.height, run.width, 3), 128, dtype=np.uint8)
        for n in range(1, run.batches + 1):
            if stopping():
                return
            done += 1
            what = f"{run.task} {run.height}x{run.width}, batch {n} of {run.batches}{run.why} ({done}/{total})"
            report(what)
            t0 = time.perf_counter()
            try:
                await on_compute_thread(runner.enhance, run.task, [blank] * n, params, list(range(n)))
            except Exception as exc:  # noqa: BLE001 - requests of this size will say more
                log.warning("warm-up of %s %dx%d failed at batch %d (%s: %s); skipping that size",
                            run.task, run.height, run.width, n, type(exc).__name__, exc)
                break
            log.info("warm-up %s", what, extra={"seconds": round(time.perf_counter() - t0, 3)})
    report(None)
    log.info("warm-up done in %.1f s", time.perf_counter() - started)
