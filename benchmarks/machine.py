"""Which machine a benchmark's numbers came from: every figure names its CPU kind and date."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def machine() -> dict[str, str]:
    """Date, cores and CPU model, and whether the CPU has bfloat16 (AVX-512) or AVX2 only."""
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {cpu_model()}",
        "cpu_flags": "avx512_bf16" if "avx512_bf16" in flags else "avx2 (no bfloat16)",
    }
