"""What a run costs the process: peak resident-memory growth (``/proc``, Linux) and CPU time."""

from __future__ import annotations

import ctypes
import gc
import resource
import time

#: Collect garbage before each run, so that its peak-RSS growth is its own (tests turn it off: a
#: full collection of a process holding torch and transformers takes a fraction of a second).
COLLECT_BETWEEN_RUNS = True


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next run's growth is its own."""
    if not COLLECT_BETWEEN_RUNS:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Peak resident-memory growth of a block: VmHWM reset (``/proc/self/clear_refs``, Linux) at
    entry, ``VmHWM - VmRSS(entry)`` at exit, in bytes. None where /proc is not available."""

    def __enter__(self):
        release_memory()
        self.start = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = self.start > 0
        except OSError:
            self.ok = False
        self.growth = None
        return self

    def __exit__(self, *exc):
        if self.ok:
            self.growth = max(0, _rss_kib("VmHWM") - self.start) * 1024
        return False


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime
