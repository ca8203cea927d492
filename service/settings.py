"""One typed settings object for the service: every field is a `FLOWIE_*` variable and a flag.

``FLOWIE_MAX_QUEUE=32`` and ``--max-queue 32`` set the same field; a flag wins over the
environment. Start-up refuses settings that are unsafe in production (see ``_refuse_unsafe``)
with a message that says what to set.

Light module: pydantic only (the `flowie` parser imports it to build the flags).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from engines.config import EngineConfig

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


_COMPILE_ALL = ("all", "on")  # FLOWIE_TORCH_COMPILE=all, as before it became on/off


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
        "`Authorization: Bearer KEY` or `X-API-Key: KEY` (health, readiness, metrics and the try-it page's "
        "files stay open)",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="allow FLOWIE_ENV=production without FLOWIE_API_KEYS (a gateway in front authenticates)",
    )
    docs: bool = Field(True, description="serve /docs and /openapi.json")
    web_ui: bool = Field(True, description="serve the try-it page at / (upload a photo, watch it run, compare "
                         "before and after)")

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
    max_stored_results: int = Field(
        1024, ge=1, description="most finished results `flowie serve` keeps for GET /jobs; the oldest go first"
    )
    max_stored_result_mib: int = Field(
        256, ge=1, description="most MiB of result images `flowie serve` keeps for GET /jobs; the oldest go first"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="seconds a SIGTERM-ed API waits for requests in flight to finish"
    )

    # --- worker ---------------------------------------------------------------------
    device: str = Field("cpu", description="torch device of the worker: cpu or cuda:N (one worker per GPU)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="compute precision; auto = float16 for the torch back end on CUDA, float32 otherwise",
    )
    backend: Literal["torch", "onnx", "tensorrt"] = Field(
        "torch", description="inference back end (onnx and tensorrt need `flowie export` / `flowie build-engines`)",
    )
    torch_compile: bool = Field(
        False,
        description="torch back end: run every stage through torch.compile, for long-lived GPU workers "
        "(the warm-up pays minutes of compile)",
    )
    spill_dir: str = Field(
        "auto",
        description="where the worker keeps a large image's SwinIR output while the flow runs: auto (a temp file "
        "on the CPU for large outputs, RAM on a GPU), off (RAM) or a directory on a disk",
    )
    engine_overrides: str = Field(
        "",
        description="advanced: comma list of key=value that replace the engine defaults measured for the device "
        "(e.g. cuda_graphs=off,tile_batch=4; keys in docs/ENGINES.md)",
    )
    max_batch: int = Field(4, ge=1, le=64, description="most images the worker runs in one batch")
    face_mode: Literal["auto", "detect", "aligned"] = Field(
        "auto", description="default of the faces field of a face model (task bfr): auto = detect (whole photos, "
        "as the official script), or aligned (each upload is one aligned face)")
    face_detector: Literal["mtcnn", "retinaface_resnet50", "retinaface_mobile0.25"] = Field(
        "mtcnn", description="face detector of whole photos (faces=detect): mtcnn (weights from the facenet-pytorch "
        "wheel) or facexlib's RetinaFace, whose weights file must be in FLOWIE_FACE_MODELS")
    face_models: str = Field(
        "", max_length=4096, description="directory holding the facexlib weights files the user supplies "
        "(detection_Resnet50_Final.pth, detection_mobilenet0.25_Final.pth, parsing_parsenet.pth); empty = none")
    face_parser: Literal["auto", "none"] = Field(
        "auto", description="paste-back mask of whole photos: auto = ParseNet's face parse when parsing_parsenet.pth "
        "is in FLOWIE_FACE_MODELS, else the offline ellipse; none = always the ellipse")
    background_task: str = Field(
        "", max_length=64, description="task of the served model that restores the background of whole photos "
        "(background=model, the default when set); empty = background=resize by default")
    warmup: str = Field(
        "auto",
        description="work sizes the worker runs at every batch size up to max_batch before it reports ready: "
        "auto (on CUDA each model's default size), off, or a comma list of HxW such as 512x512,768x512",
    )
    batch_lookahead: int = Field(
        16, ge=0, le=256,
        description="jobs a worker with a backlog holds to find batch mates for the oldest one (0 = 2 x max_batch)",
    )
    max_wait_ms: float = Field(
        10.0, ge=0, description="ms the worker waits for batch mates when more jobs are queued behind a batch",
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
    def _torch_compile(cls, value: Any) -> Any:
        return True if isinstance(value, str) and value.strip().lower() in _COMPILE_ALL else value

    @field_validator("engine_overrides")
    @classmethod
    def _engine_overrides(cls, value: str) -> str:
        from engines.config import parse_overrides  # light: no torch

        parse_overrides(value)  # raises with what is wrong
        return value.strip()

    @field_validator("warmup")
    @classmethod
    def _warmup_sizes(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "off"):
            warmup_sizes(value)  # raises with what is wrong
        return value

    @model_validator(mode="after")
    def _face_models_named(self) -> Settings:
        if self.face_detector.startswith("retinaface") and not self.face_models:
            raise ValueError(f"FLOWIE_FACE_DETECTOR={self.face_detector} needs FLOWIE_FACE_MODELS: the directory "
                             "holding facexlib's weights file (docs/FACES.md)")
        return self

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

    def engine_config(self) -> EngineConfig:
        """The engine configuration of this process's device: one place that resolves every auto."""
        from engines.config import EngineConfig

        try:
            return EngineConfig.for_device(self.device, backend=self.backend, dtype=self.dtype,
                                           torch_compile=self.torch_compile, spill_dir=self.spill_dir,
                                           overrides=self.engine_overrides)
        except ValueError as exc:
            raise SettingsError(f"{ENV_PREFIX}ENGINE_OVERRIDES / {ENV_PREFIX}DEVICE / {ENV_PREFIX}SPILL_DIR: {exc}") from None

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
