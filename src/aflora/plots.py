"""PNG plots of a run: accuracy per round, every client's rank per round, cumulative uplink bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(run: dict[str, Any], out_dir: Path) -> list[Path]:
    """Draw the three standard plots from a results.json dict; returns the files written."""
    rounds = run["rounds"]
    label = run["method"]
    return [
        _save(_accuracy_figure({label: run}), out_dir / "accuracy.png"),
        _save(_ranks_figure(rounds, label), out_dir / "ranks.png"),
        _save(_uplink_figure({label: run}), out_dir / "uplink.png"),
    ]


def _metric_series(run: dict[str, Any]) -> tuple[str, list[int], list[float]]:
    metric = "accuracy" if run["initial"].get("accuracy") is not None else "loss"
    xs = [0] + [r["round"] for r in run["rounds"]]
    ys = [run["initial"].get(metric)] + [r[metric] for r in run["rounds"]]
    return metric, xs, ys


def _accuracy_figure(runs: dict[str, dict[str, Any]]):
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = "accuracy"
    for label, run in runs.items():
        metric, xs, ys = _metric_series(run)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("round (0 = base model before training)")
    ax.set_ylabel(f"global model {metric}")
    ax.set_title(f"Global {metric} per round")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _ranks_figure(rounds: list[dict[str, Any]], label: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    clients = sorted({int(c) for r in rounds for c in r["ranks"]})
    for cid in clients:
        points = [(r["round"], r["ranks"][str(cid)]) for r in rounds if str(cid) in r["ranks"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=f"client {cid}")
    ax.set_xlabel("round")
    ax.set_ylabel("rank trained (mean over adapted modules)")
    ax.set_yscale("log", base=2)
    ax.set_title(f"{label}: client ranks per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _uplink_figure(runs: dict[str, dict[str, Any]]):
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        total, xs, ys = 0, [0], [0.0]
        for r in run["rounds"]:
            total += sum(r["uplink_bytes"].values())
            xs.append(r["round"])
            ys.append(total / 2**20)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative uplink (MiB, all clients)")
    ax.set_title("Client → server traffic")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
