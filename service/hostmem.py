"""Host memory of CPU inference: keep freed tensor memory in the process (``EngineConfig.host_malloc``).

glibc's malloc serves large blocks (the activations of a network, tens to hundreds of MiB) with
fresh ``mmap`` pages and unmaps them when they are freed; blocks of a thread other than the main
one come from per-thread arenas that do the same above 64 MiB. Every stage of every image then
touches new pages, and the kernel zero-fills each on its first touch: on the project's 2-core VM
a demo image took 1.2-1.6 million page faults and 2-3.5 s of system time (docs/PERF.md, "Host
memory").

With it on (the engine configuration's default on the CPU), before any thread or network exists, this process asks glibc (``mallopt``)
for one arena, large blocks from the heap instead of ``mmap``, and no trimming of the heap's top:
freed blocks are reused without faults. Peak memory is what the computation needs either way; the
difference is that the memory stays with the process after the peak instead of going back to the
kernel. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import platform

# <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# mallopt takes a C int: 2 GiB - 1 is its largest value. Blocks above it still get their own mapping.
LARGEST = 2**31 - 1

def keep_freed_memory() -> str:
    """Apply the glibc settings to this process; returns what was done (for the log).

    Call it before the process starts threads: glibc fixes the number of arenas when a second
    thread first allocates.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"left to the C library ({platform.system()} {platform.libc_ver()[0] or 'non-glibc'})"
    libc = ctypes.CDLL(None)
    refused = [name for name, param, value in (("arena_max", M_ARENA_MAX, 1),
                                               ("mmap_threshold", M_MMAP_THRESHOLD, LARGEST),
                                               ("trim_threshold", M_TRIM_THRESHOLD, LARGEST))
               if libc.mallopt(param, value) != 1]
    if refused:
        return f"glibc refused {', '.join(refused)}"
    return "kept in the process (glibc: one arena, heap blocks up to 2 GiB, no trimming)"


def apply(keep: bool) -> str:
    """Keep freed memory in the process when ``keep`` (``EngineConfig.host_malloc``); returns what was done."""
    if not keep:
        return "left to the C library (host_malloc=off)"
    return keep_freed_memory()
