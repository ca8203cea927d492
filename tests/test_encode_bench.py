"""loadtests/encode_bench.py: it times every format it promises and reports sizes that make sense."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("encode_bench", ROOT / "loadtests" / "encode_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encode_bench_prints_a_row_per_format_level_and_thread_count(capsys):
    bench = load_bench()
    assert bench.main(["--size", "128", "--batch", "2", "--threads", "1,2", "--levels", "6,1", "--repeats", "1"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"(png level \d|pillow level \d|jpeg|webp)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", line)
        if match:
            rows[(match[1], int(match[2]))] = (float(match[3]), float(match[4]), int(match[5]))
    names = ("png level 6", "pillow level 6", "png level 1", "pillow level 1", "jpeg", "webp")
    assert set(rows) == {(name, threads) for name in names for threads in (1, 2)}
    for ms_batch, ms_image, _ in rows.values():
        assert ms_batch > 0 and abs(ms_image - ms_batch / 2) < 0.1
    # zlib level 6 compresses harder than level 1; JPEG and WebP are lossy and far smaller than PNG
    assert rows[("png level 6", 1)][2] < rows[("png level 1", 1)][2]
    assert rows[("jpeg", 1)][2] < rows[("png level 6", 1)][2] and rows[("webp", 1)][2] < rows[("png level 6", 1)][2]
    # the worker's banded PNG stays within a few per cent of Pillow's file at the same level
    for level in (1, 6):
        ours, pillows = rows[(f"png level {level}", 1)][2], rows[(f"pillow level {level}", 1)][2]
        assert 0.9 * pillows < ours < 1.15 * pillows
