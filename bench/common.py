"""Shared bits of the benchmarks: machine description, tables, JSON output."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aflora.machine import environment

RESULTS_DIR = Path(os.environ.get("AFLORA_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options every model benchmark takes: which model, random weights, which device."""
    parser.add_argument("--model", default="smollm2", help="model.name (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--random-init", action="store_true",
                        help="model.random_init: the model's architecture with random weights (timings and memory only; accuracy "
                             "means nothing). For a folder of config.json and tokenizer, e.g. the GPU run's (bench/device)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="model.device")


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [f'model.name="{args.model}"', f"model.random_init={str(args.random_init).lower()}", f'model.device="{args.device}"']


def synchronize() -> None:
    """Wait for the GPU's queued work, so a wall-clock reading after it counts that work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> dict[str, object]:
    env = environment()
    return {
        "cpu": env["cpu"],
        "cpu_bf16": env["cpu_bf16"],
        "cores": env["cpus"],
        "torch_threads": torch.get_num_threads(),
        "gpu": env["gpu"] or "none",
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": env["python"],
        "torch": env["torch"],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": _git_revision(),
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _git_revision() -> str:
    if os.environ.get("AFLORA_GIT_REVISION"):  # a copy of the tree without .git (the GPU machine's): as prepared
        return os.environ["AFLORA_GIT_REVISION"]
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
