# syntax=docker/dockerfile:1
#
# FlowIE Serve GPU image: `flowie api`, `flowie worker`, and the one-shot model preparation
# (`flowie convert` / `export` / `build-engines`) all run from this one image.
#
# Base: nvcr.io/nvidia/tensorrt:25.01-py3 (NGC release 25.01): Ubuntu 24.04, CPython 3.12,
# CUDA 12.8.0, cuDNN 9.7.0, TensorRT 10.8.0.43 as system libraries (plus trtexec for debugging).
# Why this tag:
#   * TensorRT plans (the experimental back end) only load under the exact TensorRT that built
#     them. `prepare` builds the plans when FLOWIE_BACKEND=tensorrt
#     and `worker` loads them from this same image, so both see TensorRT 10.8.0.43; the Python
#     bindings are pinned to that version in the lock (tensorrt-cu12-bindings==10.8.0.43).
#   * onnxruntime-gpu 1.21 is built against TensorRT 10.8, CUDA 12.x and cuDNN 9: the onnx back end's
#     CUDA and TensorRT execution providers find their libraries in this base.
#   * torch 2.8.0's PyPI wheel is the CUDA 12.8 build, the same CUDA as the base; it brings its own
#     pinned nvidia-*-cu12 runtime wheels, so nothing about it depends on what the base carries.
#   * CUDA 12.8 runs Hopper and Blackwell; it needs an R570+ driver on the host (data-centre GPUs
#     may use the forward-compatible LTS branches listed in the 25.01 release notes).
# Every Python package is pinned and hashed in deploy/docker/requirements-gpu.lock (written by
# deploy/docker/lock.py); the build never resolves, and never downloads model weights: models are
# mounted at /models at run time.
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A venv without pip of its own (the base may lack ensurepip); the base's pip installs into it.
RUN python3 -m venv --without-pip /opt/flowie

WORKDIR /src
COPY deploy/docker/requirements-gpu.lock deploy/docker/tensorrt-shim.lock ./deploy/docker/
# The second step installs, without dependencies, the facenet-pytorch wheel (only for the MTCNN
# weights it ships; never imported) and NVIDIA's `tensorrt-cu12` sdist, which only adds the `tensorrt` import name over the
# bindings; with the variable set and --no-deps it neither installs a second libnvinfer nor runs
# a nested pip against NVIDIA's index.
RUN python3 -m pip --python /opt/flowie/bin/python install \
        --no-deps --require-hashes -r deploy/docker/requirements-gpu.lock \
    && NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 /opt/flowie/bin/python -m pip install \
        --no-deps --no-build-isolation --require-hashes -r deploy/docker/tensorrt-shim.lock

# The source (what .dockerignore lets through: pyproject, README, the Python packages, deploy/docker).
COPY . ./
RUN /opt/flowie/bin/python -m pip install --no-deps --no-build-isolation . \
    && /opt/flowie/bin/python deploy/docker/check_env.py

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="flowie-serve" \
      org.opencontainers.image.description="FlowIE (CVPR 2024) rectified-flow photo restoration service" \
      org.opencontainers.image.licenses="Apache-2.0"

# Non-root user with a fixed id, so volume ownership and Kubernetes runAsUser can name it.
RUN groupadd --system --gid 10001 flowie \
    && useradd --system --uid 10001 --gid flowie --home-dir /home/flowie --create-home \
        --shell /usr/sbin/nologin flowie \
    && mkdir -p /models /var/cache/flowie/inductor \
    && chown flowie:flowie /models /var/cache/flowie/inductor

COPY --from=builder /opt/flowie /opt/flowie
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/flowie-healthcheck
COPY --chmod=0755 deploy/docker/prepare.sh /usr/local/bin/flowie-prepare

# The back end measured on a GPU (docs/PERF.md): torch, float16, every stage compiled, CUDA graphs
# (on by default on CUDA). TensorRT and onnxruntime-CUDA (FLOWIE_BACKEND=tensorrt | onnx) are
# experimental: they have never run on a GPU.
ENV PATH=/opt/flowie/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLOWIE_HOST=0.0.0.0 \
    FLOWIE_PORT=8000 \
    FLOWIE_WORKER_METRICS_PORT=9101 \
    FLOWIE_BACKEND=torch \
    FLOWIE_DTYPE=float16 \
    FLOWIE_TORCH_COMPILE=on

USER 10001:10001
WORKDIR /home/flowie
EXPOSE 8000 9101

# /healthz of the API; the compose file and the Kubernetes manifests point workers at their
# metrics port instead (`flowie-healthcheck --port-env FLOWIE_WORKER_METRICS_PORT --path /metrics`).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/flowie/bin/python", "/usr/local/bin/flowie-healthcheck"]

ENTRYPOINT ["flowie"]
CMD ["api"]
