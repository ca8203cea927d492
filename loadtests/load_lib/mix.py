"""The request mix: what a load-test user sends to POST /enhance, and the bytes of each request.

Everything is configured by ``FLOWIE_LOAD_*`` environment variables (so the locust process and
the asyncio generator read the same mix); ``MixConfig.from_env`` documents each one.

Nominal sizes are the product's (256² … 1024²). On the CPU a 1024² image through even the tiny
model takes many seconds, so ``FLOWIE_LOAD_SCALE`` shrinks every side (0.25: 64² … 256²) and the
``min_side`` form field (default: ``max(128, 512 x scale)``, the model's own default being 512) keeps
the padded work size small. The report states the scale, the min_side and the resulting sizes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

# name:weight lists ------------------------------------------------------------------------
DEFAULT_SIZES = "256x256:3,512x512:4,768x512:1.5,1024x1024:1.5"
DEFAULT_SAMPLERS = "mean_value:5,one_step:2,euler:1.5,restore_only:1.5"
DEFAULT_FORMATS = "png:5,jpeg:3.5,webp:1.5"
DEFAULT_INPUTS = "jpeg:7,png:3"
MIN_WORK_SIDE = 128  # service.imaging.MIN_WORK_SIDE: the networks need 128 px per side


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """``"a:3,b:1,c"`` -> [("a", 3.0), ("b", 1.0), ("c", 1.0)]; weights must be >= 0, one > 0."""
    out: list[tuple[str, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        value = float(weight) if weight.strip() else 1.0
        if value < 0:
            raise ValueError(f"negative weight in {text!r}")
        out.append((name.strip(), value))
    if not out or not any(w > 0 for _, w in out):
        raise ValueError(f"no positive weight in {text!r}")
    return out


def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` -> (width 768, height 512)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


@dataclass
class MixConfig:
    """The mix. Each field reads ``FLOWIE_LOAD_<FIELD>`` in ``from_env``."""

    scale: float = 1.0  # every side x scale (CPU: 0.25)
    min_side: int | None = None  # form field min_side; None = auto (omitted at scale 1, else max(128, 512 x scale))
    sizes: str = DEFAULT_SIZES  # nominal WIDTHxHEIGHT:weight
    samplers: str = DEFAULT_SAMPLERS
    euler_steps: str = "4,8"  # steps of the euler sampler, picked uniformly
    formats: str = DEFAULT_FORMATS  # output_format:weight
    inputs: str = DEFAULT_INPUTS  # upload format:weight
    tasks: str = ""  # comma list; empty = every task GET /models lists
    async_share: float = 0.25  # Prefer: respond-async, then poll GET /jobs/{id}, then GET /jobs/{id}/result
    json_body_share: float = 0.15  # JSON body with base64 instead of multipart
    accept_json_share: float = 0.2  # Accept: application/json (base64 image in JSON)
    poll_s: float = 0.1  # poll interval of async jobs (the service says Retry-After: 1; we poll faster to time them)
    async_timeout_s: float = 300.0  # give up polling after this
    health_weight: float = 1.0  # locust: GET /healthz task weight against 10 for /enhance
    wait: str = "0.2,1.0"  # locust: think time between a user's tasks, min,max seconds
    seed: int = 0  # RNG seed of the mix (each user: seed + user number)
    api_key: str = field(default="", repr=False)  # Authorization: Bearer (FLOWIE_API_KEYS set on the service)

    @classmethod
    def from_env(cls) -> MixConfig:
        config = cls(
            scale=float(_env("FLOWIE_LOAD_SCALE", "1.0")),
            sizes=_env("FLOWIE_LOAD_SIZES", DEFAULT_SIZES),
            samplers=_env("FLOWIE_LOAD_SAMPLERS", DEFAULT_SAMPLERS),
            euler_steps=_env("FLOWIE_LOAD_EULER_STEPS", "4,8"),
            formats=_env("FLOWIE_LOAD_FORMATS", DEFAULT_FORMATS),
            inputs=_env("FLOWIE_LOAD_INPUTS", DEFAULT_INPUTS),
            tasks=_env("FLOWIE_LOAD_TASKS", ""),
            async_share=float(_env("FLOWIE_LOAD_ASYNC_SHARE", "0.25")),
            json_body_share=float(_env("FLOWIE_LOAD_JSON_BODY_SHARE", "0.15")),
            accept_json_share=float(_env("FLOWIE_LOAD_ACCEPT_JSON_SHARE", "0.2")),
            poll_s=float(_env("FLOWIE_LOAD_POLL_S", "0.1")),
            async_timeout_s=float(_env("FLOWIE_LOAD_ASYNC_TIMEOUT_S", "300")),
            health_weight=float(_env("FLOWIE_LOAD_HEALTH_WEIGHT", "1")),
            wait=_env("FLOWIE_LOAD_WAIT", "0.2,1.0"),
            seed=int(_env("FLOWIE_LOAD_SEED", "0")),
            api_key=_env("FLOWIE_LOAD_API_KEY", ""),
        )
        min_side = _env("FLOWIE_LOAD_MIN_SIDE", "auto")
        config.min_side = None if min_side == "auto" else int(min_side)
        config.validate()
        return config

    def to_env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` return this config (for the locust subprocess)."""
        env = {
            "FLOWIE_LOAD_SCALE": repr(self.scale), "FLOWIE_LOAD_SIZES": self.sizes,
            "FLOWIE_LOAD_SAMPLERS": self.samplers, "FLOWIE_LOAD_EULER_STEPS": self.euler_steps,
            "FLOWIE_LOAD_FORMATS": self.formats, "FLOWIE_LOAD_INPUTS": self.inputs, "FLOWIE_LOAD_TASKS": self.tasks,
            "FLOWIE_LOAD_ASYNC_SHARE": repr(self.async_share),
            "FLOWIE_LOAD_JSON_BODY_SHARE": repr(self.json_body_share),
            "FLOWIE_LOAD_ACCEPT_JSON_SHARE": repr(self.accept_json_share), "FLOWIE_LOAD_POLL_S": repr(self.poll_s),
            "FLOWIE_LOAD_ASYNC_TIMEOUT_S": repr(self.async_timeout_s),
            "FLOWIE_LOAD_HEALTH_WEIGHT": repr(self.health_weight), "FLOWIE_LOAD_WAIT": self.wait,
            "FLOWIE_LOAD_SEED": str(self.seed),
            "FLOWIE_LOAD_MIN_SIDE": "auto" if self.min_side is None else str(self.min_side),
        }
        if self.api_key:
            env["FLOWIE_LOAD_API_KEY"] = self.api_key
        return env

    def validate(self) -> None:
        if not 0.01 <= self.scale <= 4:
            raise ValueError(f"scale must be in [0.01, 4], got {self.scale}")
        for share in (self.async_share, self.json_body_share, self.accept_json_share):
            if not 0 <= share <= 1:
                raise ValueError(f"shares must be in [0, 1], got {share}")
        for name, _ in parse_weighted(self.sizes):
            parse_size(name)
        self.think_range()
        self.steps_choices()
        parse_weighted(self.samplers)
        parse_weighted(self.formats)
        parse_weighted(self.inputs)

    def think_range(self) -> tuple[float, float]:
        low, _, high = self.wait.partition(",")
        lo, hi = float(low), float(high or low)
        if lo < 0 or hi < lo:
            raise ValueError(f"wait must be MIN,MAX seconds with 0 <= MIN <= MAX, got {self.wait!r}")
        return lo, hi

    def steps_choices(self) -> list[int]:
        steps = [int(s) for s in self.euler_steps.split(",") if s.strip()]
        if not steps or not all(1 <= s <= 50 for s in steps):
            raise ValueError(f"euler steps must be 1..50, got {self.euler_steps!r}")
        return steps

    def effective_min_side(self) -> int | None:
        if self.min_side is not None:
            return self.min_side
        if self.scale >= 1.0:
            return None  # the model's default
        return max(MIN_WORK_SIDE, int(round(512 * self.scale)))

    def actual_sizes(self) -> list[dict[str, Any]]:
        """Nominal size, the size sent, its weight and the padded work size (for the report)."""
        out = []
        min_side = self.effective_min_side()
        total = sum(w for _, w in parse_weighted(self.sizes))
        for name, weight in parse_weighted(self.sizes):
            w, h = parse_size(name)
            sw, sh = scaled(w, h, self.scale)
            out.append({"nominal": f"{w}x{h}", "sent": f"{sw}x{sh}", "share": round(weight / total, 4),
                        "work": "x".join(map(str, work_size(sw, sh, min_side))) if min_side is not None
                        else "model default"})
        return out

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "api_key"}
        out["api_key_set"] = bool(self.api_key)
        out["effective_min_side"] = self.effective_min_side()
        out["size_table"] = self.actual_sizes()
        return out


def scaled(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(16, int(round(width * scale))), max(16, int(round(height * scale)))


def work_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The service's padded work size (service.imaging.plan_sizes at upscale 1), width x height."""
    w, h = width, height
    if min_side > 0 and min(w, h) < min_side:
        if h <= w:
            h, w = min_side, -(-w * min_side // h)
        else:
            w, h = min_side, -(-h * min_side // w)
    return -(-w // 64) * 64, -(-h // 64) * 64


# --- images ----------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def image_bytes(width: int, height: int, fmt: str) -> bytes:
    """A deterministic photo-like picture (smooth shapes + grain) encoded as ``fmt`` (jpeg | png | webp)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width * 7919 + height)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(1, width - 1), y / max(1, height - 1), (x + y) / max(1, width + height - 2)], axis=2)
    for _ in range(6):  # a few soft blobs ("faces", "objects")
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.1, 0.35) * min(width, height)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2)))[..., None]
        base = base * (1 - 0.6 * blob) + 0.6 * blob * rng.uniform(0, 1, 3).astype(np.float32)
    base += rng.normal(0, 0.04, base.shape).astype(np.float32)  # grain: a degraded photo
    pixels = (np.clip(base, 0, 1) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    pil_format = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    kwargs = {"quality": 85} if fmt in ("jpeg", "webp") else {}
    Image.fromarray(pixels).save(buffer, format=pil_format, **kwargs)
    return buffer.getvalue()


# --- one request -----------------------------------------------------------------------------
@dataclass
class RequestSpec:
    """One POST /enhance of the mix."""

    task: str | None
    width: int
    height: int
    nominal: str
    sampler: str
    steps: int | None
    output_format: str
    mode: str  # sync | async
    body: str  # multipart | json
    accept_json: bool
    input_format: str
    min_side: int | None

    @property
    def name(self) -> str:
        """The endpoint label in the statistics."""
        return f"POST /enhance [{self.mode}]"

    def fields(self) -> dict[str, str]:
        out = {"sampler": self.sampler, "output_format": self.output_format}
        if self.task:
            out["task"] = self.task
        if self.steps is not None:
            out["steps"] = str(self.steps)
        if self.min_side is not None:
            out["min_side"] = str(self.min_side)
        return out

    def context(self) -> dict[str, Any]:
        return {"nominal": self.nominal, "size": f"{self.width}x{self.height}", "sampler": self.sampler,
                "steps": self.steps, "mode": self.mode, "body": self.body, "accept_json": self.accept_json,
                "output_format": self.output_format, "task": self.task or ""}

    def build(self, api_key: str = "") -> tuple[bytes, dict[str, str]]:
        """(body bytes, headers) of this request."""
        image = image_bytes(self.width, self.height, self.input_format)
        headers = {"X-Request-ID": "load-" + uuid.uuid4().hex[:16]}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if self.accept_json:
            headers["Accept"] = "application/json"
        if self.mode == "async":
            headers["Prefer"] = "respond-async"
        if self.body == "json":
            payload: dict[str, Any] = {"image": base64.b64encode(image).decode("ascii")}
            for key, value in self.fields().items():
                payload[key] = int(value) if key in ("steps", "min_side") else value
            headers["Content-Type"] = "application/json"
            return json.dumps(payload).encode(), headers
        body, content_type = multipart(self.fields(), ("image", f"upload.{self.input_format}", image,
                                                       f"image/{self.input_format}"))
        headers["Content-Type"] = content_type
        return body, headers


def multipart(fields: dict[str, str], file: tuple[str, str, bytes, str]) -> tuple[bytes, str]:
    """A multipart/form-data body (built here so every HTTP client sends the same bytes)."""
    boundary = "----flowieload" + uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    name, filename, data, media = file
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                 f"Content-Type: {media}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Mix:
    """Draws RequestSpecs from a MixConfig with its own RNG (one per user)."""

    def __init__(self, config: MixConfig, tasks: list[str] | None = None, rng_seed: int | None = None,
                 force_mode: str | None = None) -> None:
        self.config = config
        self.rng = random.Random(config.seed if rng_seed is None else rng_seed)
        listed = [t.strip() for t in config.tasks.split(",") if t.strip()]
        self.tasks = listed or list(tasks or []) or [None]  # None: omit the field (the service's default task)
        self.sizes = [(parse_size(n), w) for n, w in parse_weighted(config.sizes)]
        self.samplers = parse_weighted(config.samplers)
        self.formats = parse_weighted(config.formats)
        self.inputs = parse_weighted(config.inputs)
        self.steps = config.steps_choices()
        self.min_side = config.effective_min_side()
        self.force_mode = force_mode

    def _pick(self, weighted: list[tuple[Any, float]]) -> Any:
        return self.rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted], k=1)[0]

    def next(self) -> RequestSpec:
        c = self.config
        (w, h) = self._pick(self.sizes)
        sw, sh = scaled(w, h, c.scale)
        sampler = self._pick(self.samplers)
        mode = self.force_mode or ("async" if self.rng.random() < c.async_share else "sync")
        return RequestSpec(
            task=self.rng.choice(self.tasks), width=sw, height=sh, nominal=f"{w}x{h}", sampler=sampler,
            steps=self.rng.choice(self.steps) if sampler == "euler" else None,
            output_format=self._pick(self.formats), mode=mode,
            body="json" if self.rng.random() < c.json_body_share else "multipart",
            accept_json=self.rng.random() < c.accept_json_share, input_format=self._pick(self.inputs),
            min_side=self.min_side)


# --- response headers ------------------------------------------------------------------------
def parse_server_timing(value: str | None) -> dict[str, float]:
    """``"queue;dur=1.2, compute;dur=3.4, total;dur=5.6"`` -> {"queue": 1.2, ...} in milliseconds."""
    out: dict[str, float] = {}
    for metric in (value or "").split(","):
        name, *params = [p.strip() for p in metric.split(";")]
        for param in params:
            key, _, number = param.partition("=")
            if key.strip().lower() == "dur":
                try:
                    out[name] = float(number.strip().strip('"'))
                except ValueError:
                    pass
    return out
