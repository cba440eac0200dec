"""``GET /metrics``: CPU, memory and root file system usage, in envd's field names."""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["MetricsSampler"]

MIB = 1024 * 1024


class MetricsSampler:
    """CPU use is measured between two calls (the first call: since boot), like gopsutil's."""

    def __init__(self) -> None:
        self._last_cpu = _cpu_times()

    def sample(self) -> dict[str, Any]:
        busy, total = _cpu_times()
        last_busy, last_total = self._last_cpu
        self._last_cpu = (busy, total)
        elapsed = total - last_total
        if elapsed <= 0:  # two calls within one tick: fall back to the average since boot
            busy, elapsed, last_busy = busy, total, 0
        cpu_pct = round(100.0 * (busy - last_busy) / elapsed, 2) if elapsed else 0.0
        mem_total, mem_available = _meminfo()
        disk = os.statvfs("/")
        disk_total = disk.f_blocks * disk.f_frsize
        disk_used = (disk.f_blocks - disk.f_bfree) * disk.f_frsize
        mem_used = mem_total - mem_available
        return {
            "ts": int(time.time()),
            "cpu_count": os.cpu_count() or 1,
            "cpu_used_pct": cpu_pct,
            "mem_total": mem_total,
            "mem_used": mem_used,
            "mem_total_mib": mem_total // MIB,
            "mem_used_mib": mem_used // MIB,
            "disk_total": disk_total,
            "disk_used": disk_used,
        }


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies from the aggregate line of /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def _meminfo() -> tuple[int, int]:
    values: dict[bytes, int] = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            if key in (b"MemTotal", b"MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024
    return values.get(b"MemTotal", 0), values.get(b"MemAvailable", 0)
