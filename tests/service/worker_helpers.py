"""Helpers of the worker tests: a runner that records its batches, and jobs of a given size."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict

from svc_helpers import png

from flowie.params import EnhanceParams
from service.queue.base import Job


class Recording:
    """The real runner, recording what each batch held (and running a hook as a batch starts)."""

    def __init__(self, runner, on_batch=None) -> None:
        self.runner, self.on_batch, self.batches = runner, on_batch, []
        self.backend = runner.backend

    @property
    def tasks(self):
        return self.runner.tasks

    def padded_shape(self, *args):
        return self.runner.padded_shape(*args)

    def memory_bytes(self):
        return self.runner.memory_bytes()

    def tile_rows(self, task, height, width):
        return self.runner.tile_rows(task, height, width)

    def shape_probe(self, task, height, width):
        return self.runner.shape_probe(task, height, width)

    def warmup_done(self):
        self.runner.warmup_done()

    def enhance(self, task, images, params, seeds):
        self.batches.append((params.sampler, [image.shape[:2] for image in images], list(seeds)))
        if self.on_batch:
            self.on_batch()
        return self.runner.enhance(task, images, params, seeds)


def make_job(width: int, height: int, deadline_s: float = 60, **params) -> Job:
    filled = EnhanceParams(sampler="mean_value", steps=5, color_fix="wavelet", upscale=1.0, min_side=128,
                           tile="auto", seed=len(params) + width)
    now = time.time()
    return Job(id=uuid.uuid4().hex, task="bfr", params={**asdict(filled), **params}, output_format="png",
               quality=None, image=png(width, height), created_at=now, deadline=now + deadline_s)
