"""What ran a measurement: timings and precision are only comparable on one kind of machine, so every
results.json, `aflora compare` table and benchmark names it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo, None where there is no such file or field."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith(field))
    except (OSError, StopIteration):
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor field."""
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def environment() -> dict[str, Any]:
    """The machine and software of this process: CPU model and its bf16 support, cores, GPU, versions."""
    import torch

    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),  # empty: no native bf16, float32 is the fast path
        "cpus": os.cpu_count() or 0,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "system": platform.system(),
    }


def machine_line() -> str:
    """One line for a table's header."""
    env = environment()
    gpu = f", GPU {env['gpu']}" if env["gpu"] else ""
    return (f"{env['cpu']}, {env['cpus']} CPUs{gpu}, {platform.platform()}, Python {env['python']}, "
            f"torch {env['torch']}")
