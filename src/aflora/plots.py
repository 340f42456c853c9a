"""PNG plots of a run: accuracy per round, every client's rank per round, cumulative uplink bytes; and for
`aflora compare`, final accuracy against client cost (`pareto_figure`).

`accuracy_figure` and `uplink_figure` overlay several labelled runs; a label may also carry several seeds of
the same experiment, drawn as their mean. Accuracy bands are 95 % intervals (aflora.intervals): one run's
Wilson interval over its test rows, or the t-interval over seeds; uplink bands span the seeds' min to max.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .intervals import t_interval  # noqa: E402

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
        series = [_metric_series(run, metric) for run in seeds]
        band = _t_band(series) if len(seeds) > 1 else _wilson_band(seeds[0]) if metric == "accuracy" else {}
        _plot_mean(ax, label, series, band)
    ax.set_xlabel("round (0 = base model before training)")
    ax.set_ylabel(f"global model {metric}")
    ax.set_title(f"Global {metric} per round (bands: 95 % intervals)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def uplink_figure(runs: Runs):
    """Cumulative client → server bytes (all clients), in MiB."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, seeds in _seeds_by_label(runs):
        series = [_cumulative_uplink_mib(run) for run in seeds]
        _plot_mean(ax, label, series, _range_band(series) if len(seeds) > 1 else {})
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative uplink (MiB, all clients)")
    ax.set_title("Client → server traffic")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


class ParetoPoint(NamedTuple):
    label: str
    client_cost_pct: float
    value: float  # final accuracy (or loss)
    low: float | None  # its 95 % interval
    high: float | None


def pareto_figure(points: Sequence[ParetoPoint], metric: str = "accuracy"):
    """Final accuracy against client cost %, one point per method with its 95 % interval; the dashed line joins the
    Pareto front (no other method is both cheaper and better)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for point in points:
        below, above = ([point.value - point.low], [point.high - point.value]) if point.low is not None else (None, None)
        ax.errorbar([point.client_cost_pct], [point.value], yerr=None if below is None else [below, above], fmt="o", capsize=4,
                    label=point.label)
    front = pareto_front(points, higher_is_better=metric == "accuracy")
    ax.plot([p.client_cost_pct for p in front], [p.value for p in front], linestyle="--", color="grey", linewidth=1,
            drawstyle="steps-post", label="Pareto front")
    ax.set_xlabel("client cost %\n(parameters a client trains per round, share of the base model)")
    ax.set_ylabel(f"final {metric} (95 % interval)")
    ax.set_title(f"Final {metric} vs client cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def pareto_front(points: Sequence[ParetoPoint], *, higher_is_better: bool = True) -> list[ParetoPoint]:
    """The points no other point beats on both cost (lower) and value, by increasing cost."""
    sign = 1 if higher_is_better else -1
    front: list[ParetoPoint] = []
    for point in sorted(points, key=lambda p: (p.client_cost_pct, -sign * p.value)):
        if not front or sign * point.value > sign * front[-1].value:
            front.append(point)
    return front


def save_figure(fig, path: Path, *, integer_x: bool = True) -> Path:
    for ax in fig.axes if integer_x else ():
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


Band = dict[int, tuple[float, float]]  # round -> (low, high)


def _plot_mean(ax, label: str, series: list[dict[int, float]], band: Band) -> None:
    """One line: the value itself for one seed, the mean over seeds for several; `band` shaded around it."""
    xs = sorted(set().union(*series))
    means = [sum(values) / len(values) for values in _values_by_round(series, xs)]
    (line,) = ax.plot(xs, means, marker="o", label=label if len(series) == 1 else f"{label} (mean of {len(series)} seeds)")
    if band:
        shaded = sorted(band)
        ax.fill_between(shaded, [band[x][0] for x in shaded], [band[x][1] for x in shaded], color=line.get_color(), alpha=0.2,
                        linewidth=0)


def _values_by_round(series: list[dict[int, float]], xs: list[int]) -> list[list[float]]:
    return [[s[x] for s in series if x in s] for x in xs]


def _t_band(series: list[dict[int, float]]) -> Band:
    """The 95 % t-interval over seeds, at every round that 2 or more seeds reached."""
    xs = sorted(set().union(*series))
    band: Band = {}
    for x, values in zip(xs, _values_by_round(series, xs)):
        if len(values) >= 2:
            interval = t_interval(values)
            band[x] = (interval.low, interval.high)
    return band


def _wilson_band(run: Run) -> Band:
    """One run's Wilson intervals as recorded in results.json (absent in runs made before aflora kept them)."""
    records = [(0, run["initial"])] + [(r["round"], r) for r in run["rounds"]]
    return {x: tuple(r["accuracy_ci95"]) for x, r in records if r.get("accuracy_ci95")}


def _range_band(series: list[dict[int, float]]) -> Band:
    xs = sorted(set().union(*series))
    return {x: (min(values), max(values)) for x, values in zip(xs, _values_by_round(series, xs))}


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
