"""Shared bits of the benchmarks: machine description, tables, JSON output."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aflora.machine import environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, object]:
    env = environment()
    return {
        "cpu": env["cpu"],
        "cpu_bf16": env["cpu_bf16"],
        "cores": env["cpus"],
        "torch_threads": torch.get_num_threads(),
        "gpu": env["gpu"] or "none",
        "python": env["python"],
        "torch": env["torch"],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": _git_revision(),
    }


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn: Callable[[], object], *, repeats: int, warmup: int = 1, setup: Callable[[], object] | None = None) -> dict[str, float]:
    """Median and spread of `repeats` timed calls after `warmup` untimed ones (seconds); `setup` runs untimed before each."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    samples = []
    for _ in range(repeats):
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "repeats": repeats}


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    print(f"\n{title}\n{line}\n{'-' * len(line)}")
    for row in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    print(f"\nwritten: {path}")
    return path
