"""PNG plots of a run: accuracy per round, every client's rank per round, cumulative uplink bytes.

`accuracy_figure` and `uplink_figure` overlay several labelled runs; a label may also carry several seeds of
the same experiment, drawn as their mean with a shaded min–max band (`aflora compare`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Run = dict[str, Any]  # a results.json dict
Runs = Mapping[str, Run | list[Run]]  # label -> one run, or the same experiment over several seeds


def plot_run(run: Run, out_dir: Path) -> list[Path]:
    """Draw the three standard plots from a results.json dict; returns the files written."""
    rounds = run["rounds"]
    label = run["method"]
    return [
        save_figure(accuracy_figure({label: run}), out_dir / "accuracy.png"),
        save_figure(_ranks_figure(rounds, label), out_dir / "ranks.png"),
        save_figure(uplink_figure({label: run}), out_dir / "uplink.png"),
    ]


def accuracy_figure(runs: Runs):
    """Global accuracy per round (loss for instruction tasks, which have none), round 0 = the base model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = "accuracy"
    for label, seeds in _seeds_by_label(runs):
        metric = _metric(seeds[0])
        _plot_seeds(ax, label, [_metric_series(run, metric) for run in seeds])
    ax.set_xlabel("round (0 = base model before training)")
    ax.set_ylabel(f"global model {metric}")
    ax.set_title(f"Global {metric} per round")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def uplink_figure(runs: Runs):
    """Cumulative client → server bytes (all clients), in MiB."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, seeds in _seeds_by_label(runs):
        _plot_seeds(ax, label, [_cumulative_uplink_mib(run) for run in seeds])
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative uplink (MiB, all clients)")
    ax.set_title("Client → server traffic")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def save_figure(fig, path: Path) -> Path:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _seeds_by_label(runs: Runs) -> list[tuple[str, list[Run]]]:
    return [(label, value if isinstance(value, list) else [value]) for label, value in runs.items()]


def _metric(run: Run) -> str:
    return "accuracy" if run["initial"].get("accuracy") is not None else "loss"


def _metric_series(run: Run, metric: str) -> dict[int, float]:
    series = {0: run["initial"].get(metric)} | {r["round"]: r[metric] for r in run["rounds"]}
    return {x: y for x, y in series.items() if y is not None}


def _cumulative_uplink_mib(run: Run) -> dict[int, float]:
    total, series = 0, {0: 0.0}
    for r in run["rounds"]:
        total += sum(r["uplink_bytes"].values())
        series[r["round"]] = total / 2**20
    return series


def _plot_seeds(ax, label: str, series: list[dict[int, float]]) -> None:
    """One line: the value itself for one seed; the mean over seeds with a min–max band for several."""
    xs = sorted(set().union(*series))
    values = [[s[x] for s in series if x in s] for x in xs]
    means = [sum(v) / len(v) for v in values]
    (line,) = ax.plot(xs, means, marker="o", label=label if len(series) == 1 else f"{label} (mean of {len(series)} seeds)")
    if len(series) > 1:
        ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2, linewidth=0)


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
