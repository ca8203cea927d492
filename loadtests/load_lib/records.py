"""One JSON line per request: what both load generators write and the report reads.

Fields: ``t`` (unix seconds when the request started), ``name`` (endpoint label), ``status``
(HTTP status; 0 = no answer: connection error or client time-out), ``ms`` (client-side latency,
first byte sent to last byte read), ``bytes`` (response body), ``error``, ``st`` (the answer's
Server-Timing in ms: queue, compute, total), ``ctx`` (what was asked: size, sampler, mode ...),
and for the capacity profile ``step`` / ``rate``.

Pseudo-endpoint ``JOB /enhance [async] end-to-end``: an async job from its POST to the moment a
poll saw it done (resolution: the poll interval), so async users' latency is comparable to sync.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ASYNC_E2E = "JOB /enhance [async] end-to-end"


@dataclass
class Record:
    t: float
    name: str
    status: int
    ms: float
    bytes: int = 0
    error: str = ""
    st: dict[str, float] = field(default_factory=dict)
    ctx: dict[str, Any] = field(default_factory=dict)
    step: int | None = None
    rate: float | None = None

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v not in (None, "", {})}
        data.setdefault("status", self.status)
        return json.dumps(data, separators=(",", ":"))


class RecordWriter:
    """Appends records to a JSONL file; thread- and greenlet-safe (one lock, one write per line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def write(self, record: Record) -> None:
        line = record.to_json() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_records(path: str | Path) -> list[Record]:
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a killed generator
            continue
        records.append(Record(**{k: data.get(k, default) for k, default in (
            ("t", 0.0), ("name", ""), ("status", 0), ("ms", 0.0), ("bytes", 0), ("error", ""), ("st", {}),
            ("ctx", {}), ("step", None), ("rate", None))}))
    return records
