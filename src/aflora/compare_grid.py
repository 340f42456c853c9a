"""The grid section of `aflora compare --grid train.lr=0.001,0.002,0.004`: which value of one setting each entry does
best with, so that every method gets its own best rate from one grid that is the same for all (docs/reproduction.md).

compare.expand_grid runs every entry once per value, as the entry `<entry>:train.lr=<value>`; here, from those runs'
rows, each entry's value with the best mean final metric over the seeds, whether it lies at an edge of the grid (so
the grid should be extended before it is trusted), which other values are level with it (their paired difference
includes 0), and the `--methods` line that runs each entry at its best. Pure functions of Rows and results.json
dicts, like compare_table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .compare_table import Row, interval_cells, paired_difference
from .intervals import Interval, verdict


@dataclass(frozen=True)
class Grid:
    """One setting tried at several values for every entry."""

    key: str  # e.g. "train.lr"
    values: list[str]  # as typed, in ascending numeric order
    entries: list[str]  # the entries as given to --methods, each run once per value

    def entry_with(self, entry: str, value: str) -> str:
        """The label of `entry` at `value`: `fedit:train.lr=0.001`, `aflora:ddr=false+train.lr=0.001`."""
        return f"{entry}{'+' if ':' in entry else ':'}{self.key}={value}"


@dataclass
class GridChoice:
    entry: str  # as given to --methods, e.g. "fedit"
    means: list[float | None]  # the mean final metric over the seeds at each of Grid.values
    best: str  # the value with the best mean (the higher accuracy, or the lower loss)
    at_edge: bool  # best is the smallest or the largest value tried: a better one may lie beyond
    to_best: list[Interval | None]  # each value's paired difference to the best (None at the best, or where not run)
    paired_on: str  # what those differences were paired on, e.g. "3 seeds, t"
    values: list[str]  # Grid.values
    metric: str  # "accuracy" (higher is better) or "loss"

    def verdicts(self) -> list[str]:
        """At each value: 'best', 'level' (its paired difference to the best includes 0), 'behind', or '' (not run)."""
        higher = self.metric == "accuracy"
        return ["best" if value == self.best else verdict(d, higher_is_better=higher)
                for value, d in zip(self.values, self.to_best)]

    @property
    def level(self) -> list[str]:
        """The other values level with the best."""
        return [value for value, said in zip(self.values, self.verdicts()) if said == "level"]


def grid_choices(grid: Grid, rows: list[Row], runs: dict[str, list[dict[str, Any]]]) -> list[GridChoice]:
    """Each entry's best value, in the order the entries were given."""
    by_label = {row.label: row for row in rows}
    choices = []
    for entry in grid.entries:
        labels = [grid.entry_with(entry, value) for value in grid.values]
        means = [by_label[label].stats["final"].mean for label in labels]
        metric = by_label[labels[0]].metric
        tried = [(mean, i) for i, mean in enumerate(means) if mean is not None]
        if not tried:
            continue
        _, best = max(tried) if metric == "accuracy" else min(tried)
        to_best: list[Interval | None] = [None] * len(labels)
        paired_on = ""
        for i, label in enumerate(labels):
            if i != best and means[i] is not None:
                to_best[i], paired_on = paired_difference(label, runs[label], labels[best], runs[labels[best]], metric)
        choices.append(GridChoice(entry, means, grid.values[best], best in (0, len(grid.values) - 1), to_best,
                                  paired_on, grid.values, metric))
    return choices


def best_entries(grid: Grid, choices: list[GridChoice]) -> str:
    """The --methods value that runs each entry at its best value."""
    return ",".join(grid.entry_with(choice.entry, choice.best) for choice in choices)


GRID_CSV_COLUMNS = ["entry", "setting", "value", "mean", "verdict", "minus_best", "minus_best_low", "minus_best_high",
                    "paired_on", "best_at_edge"]


def grid_csv_rows(grid: Grid, choices: list[GridChoice]) -> list[list[Any]]:
    """grid.csv: one row per entry and value (full precision; the difference to the best blank at the best itself)."""
    rows = []
    for choice in choices:
        for value, mean, said, d in zip(grid.values, choice.means, choice.verdicts(), choice.to_best):
            rows.append([choice.entry, grid.key, value, mean, said, *interval_cells(d), choice.paired_on if d else None,
                         choice.at_edge])
    return rows


def grid_markdown(grid: Grid, choices: list[GridChoice], seeds: list[int], metric: str) -> list[str]:
    """comparison.md's grid section: each entry's mean final metric per value, its best, and how sure that is."""
    lines = [f"## Grid: {grid.key}", "",
             f"Each entry's final {metric} at each value of `{grid.key}` (mean over seeds {', '.join(map(str, seeds))}); "
             "its best in bold.", "",
             "| entry | " + " | ".join(grid.values) + " | best | level with the best |",
             "|---|" + "---:|" * len(grid.values) + "---|---|"]
    for choice in choices:
        cells = ["" if mean is None else (f"**{mean:.4f}**" if value == choice.best else f"{mean:.4f}")
                 for value, mean in zip(grid.values, choice.means)]
        best = choice.best + (" (at the grid's edge: extend it)" if choice.at_edge else "")
        lines.append(f"| `{choice.entry}` | " + " | ".join(cells) + f" | {best} | {', '.join(choice.level) or '—'} |")
    paired = sorted({choice.paired_on for choice in choices if choice.paired_on})
    lines += ["", f"Each entry at its best: `--methods {best_entries(grid, choices)}`", "",
              "Best is the value with the best mean; a value is level with it when their paired difference's 95 % "
              f"interval includes 0 (paired on {'; '.join(paired) or 'nothing: one value only'}), so a best with level "
              "neighbours is a choice among equals. A best at the grid's edge may be beaten beyond it. The values were "
              "chosen on these seeds' test rows: run the table that reports them on other seeds (e.g. the grid on "
              "--seeds 10, the table on --seeds 0,1,2), so that it does not report the very rows that chose them "
              "(other seeds draw other rows of the same test set)."]
    return lines
