"""A child process's own peak memory, for the benchmarks that measure conversions in subprocesses."""

from __future__ import annotations

from _common import peak_rss_mb


def own_peak_mb() -> float:
    """This process's own peak resident set size (``VmHWM``), in MB.

    ``ru_maxrss`` is not enough in a child: Linux keeps the larger of the child's peak and the
    parent's memory at ``exec`` time (``setmax_mm_hiwater_rss`` in ``exec_mmap``), so a child started
    by a parent that once held a model reports at least that. ``VmHWM`` belongs to the child's own
    address space. Falls back to ``ru_maxrss`` where ``/proc`` is absent.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()
