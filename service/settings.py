"""One typed settings object for the service: every field is a `FLOWIE_*` variable and a flag.

``FLOWIE_MAX_QUEUE=32`` and ``--max-queue 32`` set the same field; a flag wins over the
environment. Start-up refuses settings that are unsafe in production (see ``_refuse_unsafe``)
with a message that says what to set.

Light module: pydantic only (the `flowie` parser imports it to build the flags).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "FLOWIE_"
MIN_PRODUCTION_KEY_CHARS = 16


class SettingsError(ValueError):
    """Settings are invalid or unsafe; the message says which variable to set and how."""


def _split_commas(value: Any) -> Any:
    """`a,b , c` -> ["a", "b", "c"]; lists pass through (flags give lists, env vars give strings)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# The networks need this many pixels per side at least (8 latent pixels); a warm-up size below it is a typo.
MIN_WARMUP_SIDE = 64


def warmup_sizes(value: str) -> list[tuple[int, int]]:
    """``"512x512, 768x512"`` -> [(512, 512), (768, 512)] (height x width); ValueError saying what is wrong."""
    sizes = []
    for part in (p.strip() for p in value.split(",")):
        height, _, width = part.partition("x")
        if not (height.isdigit() and width.isdigit()):
            raise ValueError(f"FLOWIE_WARMUP: {part!r} is not HxW (e.g. 512x512); or use auto or off")
        if min(int(height), int(width)) < MIN_WARMUP_SIDE:
            raise ValueError(f"FLOWIE_WARMUP: {part!r} is smaller than {MIN_WARMUP_SIDE} pixels on a side")
        sizes.append((int(height), int(width)))
    return sizes


_COMPILE_OFF = ("off", "false", "0", "no", "")
_COMPILE_ON = ("on", "true", "1", "yes")


def _stage_list(variable: str, value: str, on: tuple[str, ...], words: str = "off, on, all") -> tuple[str, ...]:
    """off | on (= ``on``) | all | a comma list of stages -> the stages; ValueError saying what is wrong."""
    from flowie.stages import STAGES  # light: no torch

    value = value.strip().lower()
    if value in _COMPILE_OFF:
        return ()
    if value in _COMPILE_ON:
        return on
    if value == "all":
        return tuple(STAGES)
    stages = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in stages if name not in STAGES]
    if unknown or not stages:
        raise ValueError(f"{variable}: {', '.join(unknown) or repr(value)} is not a stage; use {words} "
                         f"or a comma list of {', '.join(STAGES)}")
    return stages


def torch_compile_stages(value: str) -> tuple[str, ...]:
    """FLOWIE_TORCH_COMPILE -> the stages to compile (empty: none); ValueError saying what is wrong."""
    from flowie.stages import COMPILE_ON_STAGES

    return _stage_list("FLOWIE_TORCH_COMPILE", value, COMPILE_ON_STAGES)


def channels_last_option(value: str) -> str | tuple[str, ...]:
    """FLOWIE_CHANNELS_LAST -> the torch engines' ``channels_last`` option: "auto" (by device) or the
    stages kept in NHWC memory format; ValueError saying what is wrong."""
    from flowie.stages import CHANNELS_LAST_CPU_STAGES

    if value.strip().lower() == "auto":
        return "auto"
    return _stage_list("FLOWIE_CHANNELS_LAST", value, CHANNELS_LAST_CPU_STAGES, words="auto, off, on, all")


def _normalised_stage_setting(value: Any, parse: Callable[[str], object]) -> str:
    """A stage-list setting's text, checked by ``parse``, with its on/off spellings made canonical."""
    if isinstance(value, bool):
        return "on" if value else "off"
    value = str(value).strip().lower()
    parse(value)  # raises with what is wrong
    return "off" if value in _COMPILE_OFF else "on" if value in _COMPILE_ON else value


class Settings(BaseSettings):
    """FlowIE Serve settings. Field name `max_queue` = env `FLOWIE_MAX_QUEUE` = flag `--max-queue`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    # --- deployment -------------------------------------------------------------------
    env: Literal["development", "production"] = Field(
        "development",
        description="development or production; production refuses unsafe settings at start-up",
    )
    host: str = Field("127.0.0.1", description="address the HTTP server binds")
    port: int = Field(8000, ge=0, le=65535, description="port the HTTP server binds")
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="model directories to serve, one per task (comma-separated; flag --model is "
        "repeatable); none = the bundled demo model in models/demo",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis joining `flowie api` and `flowie worker` (unused by `flowie serve`); "
        "enable AOF persistence there so a restarted Redis keeps accepted jobs",
    )
    redis_max_connections: int = Field(
        32, ge=2, le=10_000,
        description="connections one process opens to Redis at most (waiting requests share one listener)",
    )
    key_prefix: str = Field("flowie", description="prefix of every Redis key (run several services on one Redis)")

    # --- security -------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys, comma-separated; when set, requests need "
        "`Authorization: Bearer KEY` or `X-API-Key: KEY` (health, readiness and metrics stay open)",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="allow FLOWIE_ENV=production without FLOWIE_API_KEYS (a gateway in front authenticates)",
    )
    docs: bool = Field(True, description="serve /docs and /openapi.json")

    # --- request limits -------------------------------------------------------------
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1024,
        description="largest request body in bytes (counted while streaming; base64 JSON gets 4/3 of it)",
    )
    max_pixels: int = Field(
        4096 * 4096, ge=1,
        description="most pixels of the input, of the output and of the padded work size of one image",
    )
    max_queue: int = Field(
        64, ge=1, description="jobs queued + in progress per task before new ones get 429"
    )
    sync_timeout_s: float = Field(
        60.0, gt=0,
        description="seconds POST /enhance waits for its result before answering 202 + Location",
    )
    job_deadline_s: float = Field(
        300.0, gt=0,
        description="seconds from admission after which a job is dropped (504); X-Deadline-S may shorten it",
    )
    result_ttl_s: int = Field(3600, ge=1, description="seconds results of finished jobs are kept")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="seconds a SIGTERM-ed API waits for requests in flight to finish"
    )

    # --- worker ---------------------------------------------------------------------
    device: str = Field("cpu", description="torch device of the worker: cpu or cuda:N (one worker per GPU)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="compute precision; auto = float16 on CUDA (measured: same speed as bf16, 66.6 dB vs fp32 "
        "against bf16's 48.6 dB; docs/PERF.md), float32 on the CPU",
    )
    backend: Literal["torch", "onnx", "tensorrt"] = Field("torch", description="inference back end")
    cuda_graphs: bool = Field(
        True,
        description="torch back end on CUDA: replay every stage as a CUDA graph per input shape "
        "(2.2x faster at batch 1 on an H200, no loss at 16; docs/PERF.md)",
    )
    cudnn_benchmark: bool = Field(
        True,
        description="torch back end on CUDA: cuDNN times its convolution algorithms once per new input shape and "
        "keeps the fastest (the first batch of each shape is slower); the H200 numbers of docs/PERF.md were "
        "measured with it on",
    )
    torch_compile: str = Field(
        "off",
        description="torch back end: torch.compile stages, for long-lived GPU workers (the warm-up pays the compile): "
        "off; on (= all) = every stage: on an H200, compiled under the worker's CUDA graphs, BFR ran 1.66x eager's "
        "images/s at batch 16 (40.3 img/s) and 1.80x at batch 1 (52 ms), for 166-187 s of compile per batch-shape "
        "family on 16 cores (docs/PERF.md); or a comma list of swinir, cond_encoder, flow_unet, vae_decoder",
    )
    channels_last: str = Field(
        "auto",
        description="torch back end: stages whose weights and activations are kept in channels-last (NHWC) memory "
        "format: auto = on the CPU SwinIR, the cond encoder and the VAE decoder (oneDNN's NHWC convolutions ran them "
        "1.1-1.4x faster on 2 cores; docs/PERF.md), on CUDA none (12% slower with fp16 on an H200); "
        "off; on = those three stages on any device; all; or a comma list of stages",
    )
    control_stream: bool = Field(
        True,
        description="torch back end on CUDA: the flow UNet runs FlowIE's ControlNet on a second CUDA stream while "
        "the UNet's down path, which does not need its residuals, runs on the first (same operations, same numbers; "
        "an H200 with CUDA graphs: BFR 1.08x at batch 1, DiffBIR-style 50 steps 1.13x, the same at batch 16; "
        "docs/PERF.md); inert on the CPU and where the flow UNet is compiled",
    )
    host_malloc: Literal["auto", "on", "off"] = Field(
        "auto",
        description="host memory of the process that computes: auto = on when it computes on the CPU: one glibc arena, "
        "large blocks from the heap instead of fresh mmap pages, freed memory kept for reuse, so each stage "
        "of each image does not page-fault its activations in again (the demo on 2 cores: 1.18-1.29x per "
        "request, 1.6x at 16 MP; system time 3.5 s -> 0.1 s per 1024x1024 image; whole-process peak -13% to "
        "+11%; docs/PERF.md, Host memory); the memory stays with the process after a peak instead of going "
        "back to the kernel; off = the C library's defaults; on = also on a GPU worker (not measured there). "
        "glibc only; applied by serve and worker before their threads start, and read from the environment by "
        "enhance, eval and bench",
    )
    tile_batch: int = Field(
        0, ge=0, le=64,
        description="tiles of a large (tiled) image that go through a network in one call, stacked on the batch axis "
        "(times the images of the batch): 0 = auto, 8 on CUDA (a tile at batch 1 leaves a GPU mostly idle: the H200 ran "
        "the flow UNet 2.4x faster per image at batch 4 than at 1) and on the CPU as many as fill one 512x512-pixel "
        "tile's area (1 for official-size tiles; 16 for the demo's 128-pixel UNet tiles, which made its flow UNet 4x "
        "faster on 2 cores); working memory grows with it, not with the image",
    )
    spill_dir: str = Field(
        "auto",
        description="where the worker keeps the SwinIR output of a large (tiled) image while the flow and the "
        "decoder run: auto = on the CPU, outputs over 16 MiB (about 1.4 MP of work size) go to an unlinked file in the "
        "system temp directory, on a GPU host RAM; off = RAM; or a directory (on a disk, not a tmpfs). "
        "Results are the same bits either way (docs/PERF.md, scaling)",
    )
    max_batch: int = Field(4, ge=1, le=64, description="most images the worker runs in one batch")
    face_mode: Literal["auto", "detect", "aligned"] = Field(
        "auto", description="default of the faces field of a face model (task bfr): auto = detect (whole photos, "
        "as the official script), or aligned (each upload is one aligned face)")
    face_detector: Literal["mtcnn"] = Field(
        "mtcnn", description="face detector of whole photos (faces=detect); mtcnn runs offline, its weights come "
        "with the facenet-pytorch wheel")
    background_task: str = Field(
        "", max_length=64, description="task of the served model that restores the background of whole photos "
        "(background=model, the default when set); empty = background=resize by default")
    warmup: str = Field(
        "auto",
        description="work sizes the worker runs once at every batch size up to max_batch before it reports "
        "ready, so that the first requests do not pay CUDA-graph capture, the cuDNN algorithm search or "
        "torch.compile: auto = on CUDA the square of each model's default min_side, on the CPU none; off; or "
        "a comma list of HxW (e.g. 512x512,768x512). On CUDA the size of a large image's tiles (512x512 for the "
        "official models) runs up to FLOWIE_TILE_BATCH images when that is more than max_batch: tiled calls "
        "have those shapes. With FLOWIE_TORCH_COMPILE, one more size (64 taller, 128 wider than the first) runs at "
        "batch 1 and 2, so that torch.compile makes its graphs for any image size during the warm-up instead of "
        "on the first odd-sized request",
    )
    codec_threads: int = Field(
        0, ge=0, le=64,
        description="threads a worker encodes a batch's answers with, and as many again that decode a batch's "
        "uploads (the image codecs release the GIL; a 512x512 PNG takes 10-30 ms). A PNG answer is compressed in "
        "bands, the threads shared out among a batch's answers: a lone answer uses them all (2 threads: 3.1x "
        "faster than Pillow's encoder for 1.5% more bytes; docs/PERF.md); 0 = min(8, CPU cores)",
    )
    encode_overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="encode and store a batch's answers on the codec threads while the next batch computes (one "
        "batch behind at most) instead of before it: auto = on with CUDA, where the PNG encoding would otherwise "
        "add its CPU time to every batch (1.35x images/s at batch 1 and 1.14x at batch 16 on an H200; docs/PERF.md), off on "
        "the CPU, where it is a few per cent of compute and would compete with it for the cores",
    )
    png_compress_level: int = Field(
        1, ge=0, le=9,
        description="zlib level of PNG answers (lossless at every level); 1 encodes a 512x512 photo 3.5x faster "
        "than 6 for 4% more bytes (docs/PERF.md)",
    )
    batch_lookahead: int = Field(
        16, ge=0, le=256,
        description="jobs a worker with a backlog holds to find batch mates for the oldest one (a mixed "
        "workload has many parameter/size groups); 0 = 2 x max_batch. Held jobs keep their decoded uploads in "
        "memory, are heartbeated and are handed back on shutdown; with several workers, lower it if some idle "
        "while another holds a full buffer",
    )
    max_wait_ms: float = Field(
        10.0, ge=0, description="ms the worker waits for more jobs of the same shape before running a batch, "
        "only when more are likely (jobs queued behind its previous batch); a job that finds the worker idle "
        "starts at once"
    )
    visibility_timeout_s: float = Field(
        60.0, gt=0,
        description="seconds without a heartbeat after which another worker reclaims a job",
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="seconds between worker heartbeats (liveness expires after 3 missed)"
    )
    max_deliveries: int = Field(
        3, ge=1, description="deliveries of one job before it is dead-lettered and its client told"
    )
    worker_metrics_port: int = Field(
        9101, ge=0, le=65535, description="port of the worker's own /metrics (0 = none)"
    )
    worker_id: str = Field("", description="consumer name of this worker (empty = host-pid-random)")

    # --- logs -----------------------------------------------------------------------
    log_json: bool = Field(True, description="structured JSON logs (false = plain text)")

    @field_validator("model_dirs", "api_keys", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("torch_compile", mode="before")
    @classmethod
    def _torch_compile(cls, value: Any) -> str:
        return _normalised_stage_setting(value, torch_compile_stages)  # a bool before session 6: still taken

    @field_validator("channels_last", mode="before")
    @classmethod
    def _channels_last(cls, value: Any) -> str:
        return _normalised_stage_setting(value, channels_last_option)

    @field_validator("warmup")
    @classmethod
    def _warmup_sizes(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "off"):
            warmup_sizes(value)  # raises with what is wrong
        return value

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.heartbeat_s * 2 > self.visibility_timeout_s:
            raise ValueError(
                f"FLOWIE_HEARTBEAT_S ({self.heartbeat_s:g}) must be at most half of FLOWIE_VISIBILITY_TIMEOUT_S "
                f"({self.visibility_timeout_s:g}), or live workers' jobs get reclaimed while they compute"
            )
        if self.env != "production":
            return self
        if not self.api_keys and not self.allow_unauthenticated:
            raise ValueError(
                "FLOWIE_ENV=production needs API keys: set FLOWIE_API_KEYS=key1,key2 (at least "
                f"{MIN_PRODUCTION_KEY_CHARS} characters each), or FLOWIE_ALLOW_UNAUTHENTICATED=true "
                "if a gateway in front of the service authenticates"
            )
        short = [k for k in self.api_keys if len(k.get_secret_value()) < MIN_PRODUCTION_KEY_CHARS]
        if short:
            raise ValueError(
                f"FLOWIE_ENV=production: {len(short)} of FLOWIE_API_KEYS is shorter than "
                f"{MIN_PRODUCTION_KEY_CHARS} characters; use long random keys (e.g. `openssl rand -hex 24`)"
            )
        return self

    def api_key_values(self) -> list[str]:
        return [k.get_secret_value() for k in self.api_keys]


# Fields that are lists take one flag per value as well as commas; `model_dirs` is `--model`.
_FLAG_ALIASES = {"model_dirs": ["--model", "--model-dirs"]}
_LIST_FIELDS = {"model_dirs", "api_keys"}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, fields: list[str] | None = None) -> None:
    """One flag per settings field (default: every field); help text = the field description."""
    group = parser.add_argument_group("settings (each flag also reads FLOWIE_<NAME>)")
    for name, info in Settings.model_fields.items():
        if fields is not None and name not in fields:
            continue
        flags = _FLAG_ALIASES.get(name, [flag_name(name)])
        env = ENV_PREFIX + name.upper()
        kwargs: dict[str, Any] = {"dest": f"setting_{name}", "default": argparse.SUPPRESS,
                                  # argparse formats help with %: a literal one ("+10%") must be doubled.
                                  "help": f"{(info.description or '').replace('%', '%%')} [env {env}]"}
        if name in _LIST_FIELDS:
            kwargs["action"] = "append"
            kwargs["metavar"] = "VALUE"
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(*flags, **kwargs)


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Environment, then flags given on the command line, then ``overrides``; SettingsError if bad."""
    given: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("setting_"):
            name = key[len("setting_"):]
            if name in _LIST_FIELDS:
                value = [part for item in value for part in _split_commas(item)]
            given[name] = value
    given.update(overrides)
    return load_settings(**given)


def load_settings(**values: Any) -> Settings:
    """Build Settings; turn pydantic's error into one SettingsError naming the variables."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = ".".join(str(p) for p in error["loc"])
            where = f"{ENV_PREFIX}{loc.upper()} / {flag_name(loc)}: " if loc else ""
            msg = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"{where}{msg}")
        raise SettingsError("; ".join(lines)) from None


def describe_settings() -> list[tuple[str, str, str]]:
    """(env var, default, meaning) for every field: the table in the docs is built from this."""
    rows = []
    for name, info in Settings.model_fields.items():
        default = info.default_factory() if info.default_factory else info.default
        rows.append((ENV_PREFIX + name.upper(), repr(default), info.description or ""))
    return rows


def default_model_dirs(settings: Settings) -> list[Path]:
    """The configured model directories, or the bundled demo model; SettingsError if none exists."""
    if settings.model_dirs:
        return list(settings.model_dirs)
    from flowie.modeldir import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "model.json").is_file():
        raise SettingsError(
            f"no model to serve: the bundled demo model ({DEMO_MODEL_DIR}) is not there; pass "
            "--model DIR (or FLOWIE_MODEL_DIRS) with a model directory made by `flowie convert`."
        )
    return [DEMO_MODEL_DIR]
