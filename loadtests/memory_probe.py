"""Peak memory of one process while it runs a measured call: host (RSS) or CUDA allocator."""

from __future__ import annotations

import ctypes
import gc
import resource


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CpuMemory:
    """RSS probes for this process (bytes). ``reset_peak`` needs Linux >= 4.0 clear_refs."""

    kind = "cpu_rss"

    def __init__(self):
        self.can_reset = self._try_reset()
        self._libc = None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            pass

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _proc_status_kib("VmHWM") is not None
        except OSError:
            return False

    def trim(self) -> None:
        gc.collect()
        if self._libc is not None and hasattr(self._libc, "malloc_trim"):
            self._libc.malloc_trim(0)

    def current(self) -> int:
        kib = _proc_status_kib("VmRSS")
        return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def reset_peak(self) -> None:
        if self.can_reset:
            self._try_reset()

    def peak(self) -> int:
        """Peak RSS since the last reset (or since process start without clear_refs)."""
        kib = _proc_status_kib("VmHWM") if self.can_reset else None
        if kib is None:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return kib * 1024


class CudaMemory:
    kind = "cuda_allocated"
    can_reset = True

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def trim(self) -> None:
        gc.collect()
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.empty_cache()

    def current(self) -> int:
        return int(self.torch.cuda.memory_allocated(self.device))

    def reset_peak(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        self.torch.cuda.synchronize(self.device)
        return int(self.torch.cuda.max_memory_allocated(self.device))

    def peak_reserved(self) -> int:
        return int(self.torch.cuda.max_memory_reserved(self.device))


# ---------------------------------------------------------------------------- child process
