"""host_malloc (service/hostmem.py): with it on, large blocks freed by a computing thread stay
in the process and are reused without new page faults; with it off, glibc unmaps them at once."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A thread started after the setting (as the worker's compute thread is) allocates, touches and
# frees a 64 MiB block: how much of it is still resident after the free (kept for reuse, or handed
# back to the kernel), and the page faults of five more rounds (whose count depends on the page
# size the kernel uses: transparent huge pages fault 2 MiB at a time).
CHILD = """
import resource, sys, threading
import numpy as np
from service import hostmem
print(hostmem.apply(sys.argv[1] == "on"))
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
seen = {}
def work():
    block = np.ones(64 * 2**20 // 8)
    with_block = rss_mib()
    del block
    seen["released_mib"] = with_block - rss_mib()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        block = np.ones(64 * 2**20 // 8)
        del block
    seen["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(seen["released_mib"], seen["faults"])
"""


def _run(setting: str) -> tuple[str, float, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, setting], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    said, numbers = done.stdout.strip().splitlines()
    released, faults = numbers.split()
    return said, float(released), int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_of_a_computing_thread_stay_for_reuse_without_page_faults():
    said_on, released_on, faults_on = _run("on")
    said_off, released_off, faults_off = _run("off")
    assert "kept in the process" in said_on and "left to the C library" in said_off
    assert released_off > 48, released_off  # glibc's default: the block's pages go back at once
    assert released_on < 8, released_on  # kept: the next block reuses them
    assert faults_off >= 5 * 16  # at least one fault per 2 MiB huge page of each new block
    assert faults_on < faults_off / 4, (faults_on, faults_off)


@pytest.mark.parametrize("device, expected", [("cpu", True), ("cuda:0", False), ("cuda", False)])
def test_host_malloc_is_on_for_a_process_that_computes_on_the_cpu(device, expected):
    from engines.config import EngineConfig

    assert EngineConfig.for_device(device).host_malloc is expected
    assert EngineConfig.for_device(device, overrides="host_malloc=on").host_malloc is True


def test_flowie_enhance_refuses_a_bad_override_before_it_loads_anything(monkeypatch, capsys, tmp_path):
    from service.cli import main

    monkeypatch.setenv("FLOWIE_ENGINE_OVERRIDES", "host_malloc=maybe")
    assert main(["enhance", str(tmp_path / "missing.png"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "flowie enhance: engine override host_malloc='maybe' is not on or off" in err
