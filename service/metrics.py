"""Prometheus metrics (docs/ARCHITECTURE.md, Metrics), one registry per process (API, worker, or both).

Buckets are chosen for this workload: a request or a stage takes from about 10 ms (a tiny image,
one step) to about a minute (a large tiled image on the CPU), and a queue wait with no backlog
takes about a millisecond (the Redis hop: admission -> a worker starts), so the buckets run
1 ms ... 60 s instead of the library's web-request defaults.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

import flowie

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                     45.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
FACE_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)


class Metrics:
    """Every series the service exports; pass one instance to the app and the worker of a process."""

    def __init__(self, registry: CollectorRegistry | None = None, *, role: str = "serve") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("flowie_requests", "POST /enhance answers by task and HTTP status",
                                ["task", "status"], registry=r)
        self.request_duration = Histogram(
            "flowie_request_duration_seconds", "POST /enhance wall time from first byte to answer",
            ["task"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_wait = Histogram(
            "flowie_queue_wait_seconds", "time from admission to the start of the job's batch",
            ["task"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("flowie_queue_depth", "jobs waiting or in progress",
                                 ["task"], registry=r)
        self.rejections = Counter("flowie_rejections", "requests refused, by reason",
                                  ["reason"], registry=r)
        self.batch_size = Histogram("flowie_batch_size", "images per worker batch", ["task"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.stage_duration = Histogram(
            "flowie_stage_duration_seconds", "wall time of one pipeline stage for one batch",
            ["stage", "backend"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.faces = Histogram("flowie_faces_per_request", "faces restored in one whole photo (faces=detect)",
                               ["task"], buckets=FACE_BUCKETS, registry=r)
        self.jobs = Counter("flowie_jobs", "jobs finished by the worker, by outcome",
                            ["task", "outcome"], registry=r)
        self.gpu_memory = Gauge("flowie_gpu_memory_bytes", "GPU memory held by the worker's torch allocator",
                                ["device", "kind"], registry=r)
        self.stored_results = Gauge("flowie_stored_results", "finished results the in-process queue holds",
                                    registry=r)
        self.stored_result_bytes = Gauge("flowie_stored_result_bytes",
                                         "bytes of the encoded images the in-process queue holds", registry=r)
        self.build = Info("flowie_build", "version and role of this process", registry=r)
        self.build.info({"version": flowie.__version__, "python": platform.python_version(), "role": role})

    def render(self) -> bytes:
        return generate_latest(self.registry)
