"""The run's record: sections with a status, written to ``<out>/gpu_bench.json`` after each one."""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

SCHEMA = "flowie-gpu-bench/2"
ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[gpu_bench] {msg}", flush=True)


def clean(obj):
    """JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def psnr_db(out: torch.Tensor, ref: torch.Tensor, goal_db: float = 40.0) -> dict:
    """PSNR of images in [0, 1] (clamped first) against ``ref``; ``ok`` at ``goal_db`` or above."""
    out, ref = out.double(), ref.double()
    nonfinite = int((~torch.isfinite(out)).sum())
    if nonfinite:
        return {"nonfinite": nonfinite, "exact": False, "psnr_db": None, "ok": False}
    mse = float(((out.clamp(0, 1) - ref.clamp(0, 1)) ** 2).mean())
    if mse == 0:
        return {"nonfinite": 0, "exact": True, "psnr_db": math.inf, "ok": True}
    value = 10 * math.log10(1 / mse)
    return {"nonfinite": 0, "exact": False, "psnr_db": value, "ok": value >= goal_db}


class Report:
    """Sections run in order; one that would start after ``time_limit_s`` is recorded as skipped."""

    def __init__(self, out_dir: Path, time_limit_s: float, started: float):
        self.out_dir, self.deadline = out_dir, started + time_limit_s
        self.data: dict = {"schema": SCHEMA, "sections": []}
        out_dir.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        path = self.out_dir / "gpu_bench.json"
        path.with_suffix(".tmp").write_text(json.dumps(clean(self.data), indent=1, allow_nan=False))
        path.with_suffix(".tmp").replace(path)

    def section(self, name: str, fn: Callable[[dict], None], skip: str | None = None,
                record: dict | None = None) -> None:
        """Run ``fn(record)`` unless ``skip`` (a reason) or the time is up; errors are recorded, not raised.
        ``record``: where its results go (default ``data[name]``)."""
        rec = {"name": name}
        self.data["sections"].append(rec)
        if skip is None and self.remaining() <= 0:
            skip = "time limit reached"
        if skip:
            rec.update(status="skipped", reason=skip)
            log(f"{name}: skipped ({skip})")
            self.save()
            return
        t0 = time.monotonic()
        body = self.data.setdefault(name, {}) if record is None else record
        try:
            fn(body)
            rec["status"] = "done"
        except Exception as exc:  # noqa: BLE001 - one section's failure leaves the others their numbers
            rec.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc()[-4000:])
            log(f"{name}: ERROR {rec['error'][:300]}")
        finally:
            rec["s"] = round(time.monotonic() - t0, 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.save()


def environment(device: torch.device, argv: list[str]) -> dict:
    """What the numbers belong to: the card, the stack, the command and the date."""
    meta = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, "-m", "loadtests.gpu_bench", *argv]),
            "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "git": _git_head()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    gpu_mib=props.total_memory // 2**20, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), nvidia_smi=_nvidia_smi())
    return meta


def _nvidia_smi() -> str | None:
    query = "name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15)
    except OSError:
        return None
    return f"{query} = {res.stdout.strip()}" if res.returncode == 0 else None


def _git_head() -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return res.stdout.strip() or None
