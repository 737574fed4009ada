"""The machine a benchmark's figures were measured on (CPU model, cores, load): every figure is
printed beside it, because CPUs differ (AVX2 vs AMX) and so does what else runs."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo (what ``lscpu`` shows), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """``<CPU model>, <N> cores``."""
    return f"{cpu_model()}, {os.cpu_count()} cores"
