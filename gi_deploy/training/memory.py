"""Peak memory of a stretch of work: CUDA's allocator peak on a GPU, the resident-set peak
(above the starting level) on CPU, sampled from ``/proc/self/statm`` by a background thread."""

from __future__ import annotations

import ctypes
import gc
import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MIB = 1024 * 1024


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def cpu_baseline() -> int | None:
    """Resident set size after handing freed heap back to the OS (glibc ``malloc_trim``), so a
    later peak measures what the work itself allocates, not what an earlier run left cached."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline is merely less tight
    return _rss_bytes()


class PeakMemory:
    """``with PeakMemory(device) as m: ...``, then ``m.peak_mib``: on CUDA the allocator's peak
    (``max_memory_allocated``, tensors only); on CPU the peak resident set size above ``baseline``
    (bytes, e.g. :func:`cpu_baseline` taken before the model was built; default: the level at
    entry), sampled every ``interval`` seconds; without /proc, the process-lifetime peak RSS."""

    def __init__(self, device: torch.device | str, baseline: int | None = None, interval: float = 0.005):
        self.device = torch.device(device)
        self.baseline = baseline
        self.interval = interval
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = self._peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        start = _rss_bytes()
        if start is None:
            return self
        self._start = self.baseline if self.baseline is not None else start
        self._peak = start
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes() or 0
            self.peak_mib = (max(self._peak, rss) - self._start) / MIB
        else:  # no /proc: the process-lifetime peak where the platform has one (ru_maxrss: KiB on Linux)
            try:
                import resource
            except ImportError:  # Windows
                return
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
