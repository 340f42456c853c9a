"""The table of `aflora compare`: columns, mean ± std over seeds, comparison.md / comparison.csv, overlay plots.

Everything here is a pure function of results.json dicts (label -> one per seed), so it is tested without
running anything: :func:`summarize` makes one :class:`Row` per label, :func:`write_markdown` and :func:`write_csv`
write it, :func:`write_plots` draws the runs' curves over each other.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 2**20


def _final_metric(run: dict[str, Any]) -> float | None:
    final = run["final"]
    return final["accuracy"] if final.get("accuracy") is not None else final.get("loss")


def _round_mean(key: str) -> Callable[[dict[str, Any]], float | None]:
    """Mean over the run's rounds of a per-round value (a record field or one of the method's own diagnostics),
    skipping rounds (or methods) where it is null."""
    def per_round(r: dict[str, Any]) -> float | None:
        return r.get(key, r.get("method_diagnostics", {}).get(key))

    def value(run: dict[str, Any]) -> float | None:
        values = [per_round(r) for r in run["rounds"] if per_round(r) is not None]
        return statistics.fmean(values) if values else None
    return value


@dataclass(frozen=True)
class Column:
    key: str  # comparison.csv writes <key>_mean and <key>_std
    title: str  # comparison.md header
    spec: str  # format of the numbers in comparison.md
    value: Callable[[dict[str, Any]], float | None]  # one run's number (None: not defined for this method)
    hide_zero: bool = False  # leave out of comparison.md when every row is 0


COLUMNS = [
    Column("final", "final {metric}", ".4f", _final_metric),
    Column("best_accuracy", "best accuracy", ".4f", lambda run: run["final"].get("best_accuracy")),
    Column("client_cost_pct", "client cost %", ".4f", lambda run: run["final"]["client_cost_pct"]),
    Column("uplink_mib", "uplink MiB", ".3f", lambda run: run["final"]["uplink_bytes_total"] / MIB),
    Column("round_seconds", "round s", ".2f", _round_mean("round_seconds")),
    Column("aggregation_seconds", "aggregation s", ".4f", _round_mean("aggregation_seconds")),
    Column("server_seconds", "server step s", ".3f", _round_mean("server_seconds")),
    Column("aggregation_error", "aggregation error", ".3g", _round_mean("aggregation_error")),
    Column("truncation_loss", "truncation loss", ".3g", _round_mean("truncation_loss")),
    Column("a_fused_change", "fused-A change", ".3g", _round_mean("a_fused_change")),
    Column("eval_uplink_mib", "eval-only uplink MiB", ".3f",
           lambda run: sum(r.get("eval_uplink_bytes", 0) for r in run["rounds"]) / MIB, hide_zero=True),
]


def extra_column(name: str) -> Column:
    """A benchmark from data.extra_eval (e.g. "mmlu/accuracy"): its score in the run's last round."""
    def value(run: dict[str, Any]) -> float | None:
        return run["rounds"][-1].get("extra", {}).get(name) if run["rounds"] else None
    return Column(f"final_{name}", f"final {name}", ".4f", value)


def extra_names(runs: list[dict[str, Any]]) -> list[str]:
    return sorted({name for run in runs if run["rounds"] for name in run["rounds"][-1].get("extra", {})})


def table_columns(extra: list[str]) -> list[Column]:
    """The fixed columns, then one per extra benchmark of the table (blank in rows whose runs lack it)."""
    return COLUMNS + [extra_column(name) for name in extra]


def columns_of(rows: list[Row]) -> list[Column]:
    return table_columns(rows[0].extra if rows else [])


@dataclass
class Stat:
    mean: float | None
    std: float | None  # sample standard deviation over seeds; None with fewer than 2 values

    @classmethod
    def of(cls, values: list[float | None]) -> Stat:
        present = [v for v in values if v is not None]
        if not present:
            return cls(None, None)
        return cls(statistics.fmean(present), statistics.stdev(present) if len(present) >= 2 else None)

    def format(self, spec: str) -> str:
        if self.mean is None:
            return ""
        return f"{self.mean:{spec}}" if self.std is None else f"{self.mean:{spec}} ± {self.std:{spec}}"


@dataclass
class Row:
    label: str
    method: str
    seeds: list[int]
    metric: str  # "accuracy", or "loss" where the task has no accuracy (instruction tuning)
    stats: dict[str, Stat]  # column key -> mean ± std over seeds
    finals: list[float | None]  # the final metric per seed, in `seeds` order
    extra: list[str] = field(default_factory=list)  # extra benchmarks of the whole table, e.g. ["mmlu/accuracy"]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> list[Row]:
    """label -> its runs' results.json dicts (one per seed) -> one row per label, in the given order."""
    rows = []
    extra = extra_names([run for seeds in runs.values() for run in seeds])
    columns = table_columns(extra)
    for label, seeds in runs.items():
        if not seeds:
            raise ValueError(f"no finished runs for {label!r}")
        metric = "accuracy" if all(run["final"].get("accuracy") is not None for run in seeds) else "loss"
        finals = [run["final"].get(metric) for run in seeds]  # one metric for every seed of a label
        stats = {c.key: Stat.of([c.value(run) for run in seeds]) for c in columns} | {"final": Stat.of(finals)}
        rows.append(Row(label, seeds[0]["method"], [run["seed"] for run in seeds], metric, stats, finals, extra))
    return rows


def markdown_columns(rows: list[Row]) -> list[Column]:
    """Columns with something to show: none that is blank everywhere, the eval-only uplink only where non-zero."""
    def shown(c: Column) -> bool:
        means = [row.stats[c.key].mean for row in rows]
        return any(m is not None for m in means) and not (c.hide_zero and not any(means))
    return [c for c in columns_of(rows) if shown(c)]


def markdown_table(rows: list[Row]) -> list[str]:
    metrics = {row.metric for row in rows}
    metric = metrics.pop() if len(metrics) == 1 else "accuracy or loss"
    columns = markdown_columns(rows)
    titles = ["entry", "seeds", *(c.title.format(metric=metric) for c in columns)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] + ["---:"] * (len(titles) - 1)) + "|"]
    for row in rows:
        cells = [f"`{row.label}`", str(len(row.seeds)), *(row.stats[c.key].format(c.spec) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(rows: list[Row], path: Path, *, header: list[str]) -> Path:
    metric = rows[0].metric if rows else "accuracy"
    seeds = sorted({s for row in rows for s in row.seeds})
    lines = [
        f"# Comparison: {', '.join(row.label for row in rows)}",
        "",
        *(f"- {line}" for line in header),
        "",
        *markdown_table(rows),
        "",
        "Mean ± sample standard deviation over seeds (± only with 2 or more seeds). Final and best are the global "
        "model's; client cost % is the mean share of the base model's parameters a client trains per round; uplink "
        "is the total client → server traffic; round s excludes evaluation; aggregation s and server step s are the "
        "server's time per round to aggregate and for its own update (e.g. AFLoRA's A tuning, incl. the merge); "
        "aggregation error is ‖ΔW_global − Σ p_k B_k A_k‖ / ‖Σ p_k B_k A_k‖ per round, blank where the method does "
        "not define it.",
    ]
    if len(seeds) > 1:
        lines += ["", f"Final {metric} per seed:", "",
                  "| entry | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---:|" * len(seeds)]
        for row in rows:
            by_seed = dict(zip(row.seeds, row.finals))
            lines.append(f"| `{row.label}` | " + " | ".join("" if by_seed.get(s) is None else f"{by_seed[s]:.4f}" for s in seeds) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_columns(rows: list[Row] = ()) -> list[str]:
    return ["label", "method", "seeds", "metric", *(f"{c.key}_{part}" for c in columns_of(list(rows)) for part in ("mean", "std"))]


def write_csv(rows: list[Row], path: Path) -> Path:
    """Every column for every row (blank where undefined), full precision; seeds as '0 1 2'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(csv_columns(rows))
        for row in rows:
            numbers = [row.stats[c.key] for c in columns_of(rows)]
            writer.writerow([row.label, row.method, " ".join(map(str, row.seeds)), row.metric,
                             *("" if v is None else repr(v) for s in numbers for v in (s.mean, s.std))])
    return path


def write_plots(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    from .plots import accuracy_figure, save_figure, uplink_figure

    return [save_figure(accuracy_figure(runs), out / "accuracy.png"), save_figure(uplink_figure(runs), out / "uplink.png")]
