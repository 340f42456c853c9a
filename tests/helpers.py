"""Test scaffolding: a small synthetic classification dataset on disk, tiny configs, an engine-free round loop."""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from aflora.checkpoint import load_checkpoint
from aflora.config import ExperimentConfig, load_config
from aflora.intervals import pack_bits, wilson_interval
from aflora.rounds import InProcessTransport, run_round
from aflora.runtime import ClientRuntime, ServerRuntime

LABEL_WORDS = ["World", "Sports", "Business", "Technology"]
TOPIC_WORDS = [
    ["election", "minister", "treaty", "border"],
    ["match", "goal", "league", "coach"],
    ["shares", "profit", "market", "bank"],
    ["software", "chip", "internet", "robot"],
]


def write_topic_dataset(folder: Path, *, train_per_label: int = 30, test_per_label: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """CSV files (text,label) where each label's texts use that label's vocabulary: learnable by a tiny model."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def write(path: Path, per_label: int) -> Path:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for _ in range(per_label):
                for label, words in enumerate(TOPIC_WORDS):
                    writer.writerow([" ".join(rng.choice(words) for _ in range(6)), label])
        return path

    return write(folder / "train.csv", train_per_label), write(folder / "test.csv", test_per_label)


def tiny_config(folder: Path, *overrides: str, model: str = "tiny-llama", train_per_label: int = 30) -> ExperimentConfig:
    train, test = write_topic_dataset(folder, train_per_label=train_per_label)
    return load_config(None, [
        f'data.dataset="{train}"',
        f'data.options.test_path="{test}"',
        f"data.options.label_words={LABEL_WORDS!r}".replace("'", '"'),
        "data.partition=\"iid\"",
        "data.public_size=8",
        "data.eval_size=0",
        "data.max_length=48",
        f'model.name="{model}"',
        "model.precision=\"fp32\"",
        "federation.num_clients=3",
        "federation.client_ranks=[8,4,2]",
        "train.local_steps=2",
        "train.batch_size=4",
        "train.lr=0.01",
        "server.steps=2",
        "server.batch_size=4",
        "rounds=2",
        *overrides,
    ])


def run_inline(config: ExperimentConfig) -> ServerRuntime:
    """Every round without any FL engine (aflora.rounds with its in-process transport). The server comes back
    with the last round's accepted uploads and diagnostics and the client runtime, for tests to look into."""
    server, transport = ServerRuntime(config), InProcessTransport(ClientRuntime(config))
    for round_ in range(1, config.rounds + 1):
        result = run_round(server, transport, round_)
        assert not result.record.failures, f"round {round_}: {result.record.failures}"  # tests expect every client to reply
    server.last_diagnostics, server.last_uploads = result.diagnostics, result.uploads
    server.client_runtime = transport.client
    return server


def write_tiny_config_toml(folder: Path, *overrides: str, model: str = "tiny-llama", train_per_label: int = 30) -> Path:
    """`tiny_config` as an experiment file, for tests that go through the CLI (`--config`)."""
    from aflora.config import flatten
    from aflora.tomlwrite import write_flat_toml

    config = tiny_config(folder, *overrides, model=model, train_per_label=train_per_label)
    return write_flat_toml(flatten(config.to_dict()), folder / "tiny.toml")


TIMING_FIELDS = {"train_seconds", "round_seconds", "eval_seconds", "aggregation_seconds", "server_seconds", "wall_seconds"}


def record_differences(a, b, *, path: str = "") -> list[str]:
    """Where two results.json records differ, timings aside: every other value exactly, floats to the last bit.

    A resumed run and a deployed federation compute exactly what the uninterrupted simulation computes (every
    process computes with the run's fixed thread count, aflora.runtime.model_side.pin_threads), so any difference,
    however small, means something changed what was computed."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path or 'record'}: keys {sorted(a.keys() ^ b.keys())} in only one"]
        return [d for k in a if k not in TIMING_FIELDS for d in record_differences(a[k], b[k], path=f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in record_differences(x, y, path=f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} != {b!r}"]


def kill_run_after_round(config_file: Path, out: Path, round_: int, *, deadline: float) -> int:
    """Start `aflora run`, SIGKILL its whole process group (server and Ray) once its checkpoint holds round
    `round_` or later, and return the checkpoint's round; the run must still have been running."""
    log = out.parent / f"{out.name}.log"  # kept beside the run: why it ended early, if it did
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "aflora", "run", "--config", str(config_file), "--out", str(out)],
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "checkpoint" / "manifest.json").exists() and load_checkpoint(out)[0]["round"] >= round_:
                break
            time.sleep(0.2)
        assert process.poll() is None, (f"the run ended (exit {process.returncode}) before it could be killed; "
                                        f"the end of its output:\n{log.read_text(errors='replace')[-3000:]}")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not (out / "results.json").exists()
    return load_checkpoint(out)[0]["round"]


MIB = 2**20


def fake_run(method: str, seed: int, *, accuracy: float | None, loss: float = 1.0, best: float | None = None,
             cost_pct: float = 0.1, uplink: list[int] = (MIB, MIB), round_seconds: list[float] = (1.0, 3.0),
             aggregation_seconds: list[float] = (0.01, 0.03), server_seconds: list[float | None] = (None, None),
             errors: list[float | None] = (None, None), eval_uplink: int = 0, extra: dict | None = None,
             correct: list[bool] | None = None, rows_id: str | None = None) -> dict:
    """A results.json dict with just the fields the table reads. `correct`: the final evaluation's per-row outcomes
    (the accuracy is then theirs); `rows_id` stands for the hash of the rows it scored (default: the seed's own)."""
    final_eval = {"rows_sha256": rows_id or f"rows of seed {seed}", "rows": 200, "test_rows": 7600, "accuracy": accuracy,
                  "loss": loss}
    if correct is not None:
        accuracy = sum(correct) / len(correct)
        final_eval |= {"rows": len(correct), "accuracy": accuracy, "correct": pack_bits(correct),
                       "accuracy_ci95": wilson_interval(sum(correct), len(correct)).as_list()}
    rounds = [
        {"round": i + 1, "accuracy": accuracy, "loss": loss, "uplink_bytes": {"0": up // 2, "1": up - up // 2},
         "round_seconds": rs, "aggregation_seconds": ag, "server_seconds": ss, "aggregation_error": er,
         "eval_uplink_bytes": eval_uplink, "extra": {k: v[i] for k, v in (extra or {}).items()}}
        for i, (up, rs, ag, ss, er) in enumerate(zip(uplink, round_seconds, aggregation_seconds, server_seconds, errors))
    ]
    return {
        "method": method, "seed": seed, "initial": {"accuracy": None if accuracy is None else 0.25, "loss": 2.0},
        "rounds": rounds,
        "final": {"accuracy": accuracy, "loss": loss, "best_accuracy": best, "client_cost_pct": cost_pct,
                  "uplink_bytes_total": sum(uplink), "accuracy_ci95": final_eval.get("accuracy_ci95"), "eval_rows": final_eval["rows"]},
        "final_eval": final_eval,
    }


def planned_compare_runs(monkeypatch, config: Path, out: Path, *extras: list[str]) -> list[list[str]]:
    """The run labels `aflora compare --config <config> --out <out>` plans with each list of extra arguments
    (run_comparison replaced: nothing runs)."""
    import sys

    from aflora.cli import main

    planned: list[list[str]] = []
    monkeypatch.setattr("aflora.compare.run_comparison",
                        lambda plan, *, command: planned.append([r.entry.label for r in plan.runs]) or [])
    for extra in extras:
        monkeypatch.setattr(sys, "argv", ["aflora", "compare", "--config", str(config), "--out", str(out), *extra])
        main()
    return planned


def assert_compare_tables_refused(base: Path, folder: Path, cases: list[tuple[str, str]]) -> None:
    """Each (lines of a [compare] table, message): `base` with that table is refused with that message."""
    import pytest

    from aflora.compare import compare_table
    from aflora.config import ConfigError

    for lines, message in cases:
        (folder / "bad.toml").write_text(base.read_text() + f"\n[compare]\n{lines}\n")
        with pytest.raises(ConfigError, match=message):
            compare_table(folder / "bad.toml")
