"""FLOWIE_HOST_MALLOC (service/hostmem.py): with it on, large blocks freed by a computing thread stay
in the process and are reused without new page faults; with it off, glibc unmaps them at once."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from service import hostmem

ROOT = Path(__file__).resolve().parents[2]

# A thread started after the setting (as the worker's compute thread is) allocates, touches and
# frees a 64 MiB block: how much of it is still resident after the free (kept for reuse, or handed
# back to the kernel), and the page faults of five more rounds (whose count depends on the page
# size the kernel uses: transparent huge pages fault 2 MiB at a time).
CHILD = """
import resource, sys, threading
import numpy as np
from service import hostmem
print(hostmem.apply(sys.argv[1], "cpu"))
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


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", True), ("auto", None, True), ("auto", "cuda:0", False), ("auto", "cuda", False),
    ("on", "cuda:1", True), ("off", "cpu", False),
])
def test_auto_means_a_process_that_computes_on_the_cpu(setting, device, expected):
    assert hostmem.wanted(setting, device) is expected


def test_an_unknown_setting_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="FLOWIE_HOST_MALLOC must be one of auto, on, off"):
        hostmem.wanted("yes", "cpu")


def test_flowie_enhance_refuses_an_unknown_setting_before_it_loads_anything(monkeypatch, capsys, tmp_path):
    from service.cli import main

    monkeypatch.setenv("FLOWIE_HOST_MALLOC", "yes")
    assert main(["enhance", str(tmp_path / "missing.png"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "flowie enhance: FLOWIE_HOST_MALLOC must be one of auto, on, off, got 'yes'" in err
