"""The across section of `aflora compare --across data.epsilon=0.2,0.4,0.6`: how each entry's final metric moves
with one condition of the experiment (the clients' heterogeneity, their participation), and whether its gap to the
reference moves with it: the question of the paper's Fig. 4 (does AFLoRA keep its lead as the data get more skewed?).

compare.expand_grid runs every entry once per value, as the entry `<entry>:data.epsilon=<value>`; here, from those
runs, for each entry its mean final metric at each value and its paired change from the first value to each other;
with a reference entry, each other entry's paired difference to the reference at every value, and the change of that
gap from the first value to the last (a difference of differences over the seeds). The same again for each extra
benchmark's accuracy (e.g. MMLU beside Dolly's loss: benchmark_runs). Every difference is paired on the same seeds
and test rows (compare_table.paired_difference refuses runs that scored different rows). Pure functions of
results.json dicts, like compare_table.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean
from typing import Any

from .compare_grid import Grid
from .compare_table import interval_cells, paired_difference
from .intervals import Interval, t_interval, verdict

Runs = dict[str, list[dict[str, Any]]]


@dataclass
class Shift:
    """A paired difference and what it was paired on (compare_table.paired_difference)."""

    difference: Interval | None
    paired_on: str


@dataclass
class AcrossRow:
    entry: str  # as given to --methods, e.g. "fedit"
    means: list[float]  # the mean final metric over the seeds at each value
    shifts: list[Shift]  # at each value after the first: the metric there minus at the first value


@dataclass
class GapRow:
    entry: str
    gaps: list[Shift]  # at each value: the entry's final metric minus the reference's
    changes: list[Shift]  # at each value after the first: (the gap there) − (the gap at the first value), over the seeds


@dataclass
class AcrossScore:
    """One score's rows: the task's final metric, or an extra benchmark's accuracy."""

    name: str  # "loss", "accuracy", "mmlu accuracy"
    metric: str  # "accuracy" (higher is better) or "loss"
    rows: list[AcrossRow]
    gaps: list[GapRow]  # every entry but the reference against it; empty without a reference


def direction(difference: Interval | None) -> str:
    """'higher' or 'lower' only when the interval excludes 0; else 'level' ('' where nothing could be paired)."""
    if difference is None:
        return ""
    return "level" if not difference.excludes(0.0) else ("higher" if difference.low > 0 else "lower")


def benchmark_runs(runs: Runs, benchmark: str) -> Runs | None:
    """Each run as if its final evaluation were that of an extra benchmark (results.json's final_eval.extra.<name>,
    e.g. "mmlu"), so that the functions here pair it like the task's own; None where a run did not record it."""
    mapped: Runs = {}
    for label, seeds in runs.items():
        scored = [run.get("final_eval", {}).get("extra", {}).get(benchmark) for run in seeds]
        if any(final is None or final.get("accuracy") is None for final in scored):
            return None
        mapped[label] = [{"seed": run["seed"], "final": {"accuracy": final["accuracy"]}, "final_eval": final}
                         for run, final in zip(seeds, scored)]
    return mapped


def across_rows(across: Grid, runs: Runs, metric: str) -> list[AcrossRow]:
    """Each entry's final `metric` ("accuracy" or "loss") at every value and its change from the first value, in the
    order the entries were given."""
    found = []
    for entry in across.entries:
        labels = [across.entry_with(entry, value) for value in across.values]
        first = labels[0]
        shifts = [Shift(*paired_difference(label, runs[label], first, runs[first], metric)) for label in labels[1:]]
        found.append(AcrossRow(entry, [fmean(run["final"][metric] for run in runs[label]) for label in labels], shifts))
    return found


def gap_rows(across: Grid, runs: Runs, reference: str, metric: str) -> list[GapRow]:
    """Every other entry against `reference` (one of across.entries) at each value, and the change of that gap."""
    ref_labels = [across.entry_with(reference, value) for value in across.values]
    found = []
    for entry in across.entries:
        if entry == reference:
            continue
        labels = [across.entry_with(entry, value) for value in across.values]
        gaps = [Shift(*paired_difference(label, runs[label], ref, runs[ref], metric)) for label, ref in zip(labels, ref_labels)]
        changes = [gap_change(runs, [labels[0], labels[i]], [ref_labels[0], ref_labels[i]], metric)
                   for i in range(1, len(labels))]
        found.append(GapRow(entry, gaps, changes))
    return found


def gap_change(runs: Runs, labels: list[str], ref_labels: list[str], metric: str) -> Shift:
    """(entry − reference at the last of `labels`) − (entry − reference at the first), per seed that all four ran,
    and the t-interval of those over the seeds; left blank with fewer than 2 such seeds (the one-seed bootstrap of
    compare_table pairs two runs, not four)."""
    four = [labels[0], labels[-1], ref_labels[0], ref_labels[-1]]
    finals = [{run["seed"]: run["final"][metric] for run in runs[label]} for label in four]
    seeds = sorted(set.intersection(*(set(f) for f in finals)))
    if len(seeds) < 2:
        return Shift(None, f"{len(seeds)} seed(s) in common: needs 2 or more")
    first, last, ref_first, ref_last = finals
    changes = [(last[s] - ref_last[s]) - (first[s] - ref_first[s]) for s in seeds]
    return Shift(t_interval(changes), f"{len(seeds)} seeds, t")


def _cell(shift: Shift, words: str) -> str:
    d = shift.difference
    return "" if d is None else f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}] {words}"


def across_scores(across: Grid, runs: Runs, reference: str | None, metric: str, benchmarks: list[str] = ()) -> list[AcrossScore]:
    """The task's final `metric`, then each of `benchmarks` (extra benchmarks' accuracy) that every run recorded:
    each entry across the values and, with a reference, each other entry's gap to it."""
    scored = [(metric, metric, runs)]
    for benchmark in benchmarks:
        mapped = benchmark_runs(runs, benchmark)
        if mapped is not None:
            scored.append((f"{benchmark} accuracy", "accuracy", mapped))
    return [AcrossScore(name, kind, across_rows(across, these, kind),
                        [] if reference is None else gap_rows(across, these, reference, kind))
            for name, kind, these in scored]


def across_markdown(across: Grid, scores: list[AcrossScore], seeds: list[int], reference: str | None) -> list[str]:
    """comparison.md's across section: for each score, each entry at every value and (with a reference) every gap
    to it."""
    lines = [f"## Across {across.key}"]
    for score in scores:
        lines += ["", *across_tables(across, score, seeds, reference)]
    lines += ["", "The values change what the clients train on (or how many train), not the test rows, so every run of a "
              "seed is scored on the same rows. Higher / lower, ahead / behind only where the interval excludes 0; level "
              "is not the same as equal: at few seeds it can hide a real change."]
    return lines


def across_tables(across: Grid, score: AcrossScore, seeds: list[int], reference: str | None) -> list[str]:
    """One score's two tables: each entry across the values; each entry's gap to the reference across them."""
    first, last = across.values[0], across.values[-1]
    what = f"final {score.name}"
    lines = [f"Each entry's {what} at each value of `{across.key}` (mean over seeds {', '.join(map(str, seeds))}), "
             f"and its change from {across.key} = {first} to each other value, paired [95 % interval].", "",
             "| entry | " + " | ".join(across.values) + " | " + " | ".join(f"{v} − {first}" for v in across.values[1:]) + " |",
             "|---|" + "---:|" * len(across.values) + "---|" * (len(across.values) - 1)]
    for row in score.rows:
        lines.append(f"| `{row.entry}` | " + " | ".join(f"{mean:.4f}" for mean in row.means) + " | "
                     + " | ".join(_cell(shift, direction(shift.difference)) for shift in row.shifts) + " |")
    paired = sorted({shift.paired_on for row in score.rows for shift in row.shifts})
    if reference is not None:
        better = "higher" if score.metric == "accuracy" else "lower"
        lines += ["", f"Each entry's {what} minus `{reference}`'s at the same value [95 % interval], ahead / level / "
                  f"behind as in the table above ({better} is ahead), and the change of that gap from {first} to {last}: "
                  f"(the gap at {last}) − (the gap at {first}) over the seeds, higher / lower only when its interval "
                  "excludes 0.", "",
                  "| entry | " + " | ".join(f"− `{reference}` at {v}" for v in across.values) + f" | gap at {last} − at {first} |",
                  "|---|" + "---|" * (len(across.values) + 1)]
        for row in score.gaps:
            cells = [_cell(g, verdict(g.difference, higher_is_better=score.metric == "accuracy")) for g in row.gaps]
            change = row.changes[-1]
            cells.append(_cell(change, direction(change.difference)) or change.paired_on)
            lines.append(f"| `{row.entry}` | " + " | ".join(cells) + " |")
        paired = sorted({*paired, *(g.paired_on for row in score.gaps for g in row.gaps)})
    return [*lines, "", f"Paired on: {'; '.join(paired)}."]


ACROSS_CSV_COLUMNS = ["score", "entry", "setting", "value", "mean",
                      "minus_first", "minus_first_low", "minus_first_high", "minus_first_direction",
                      "reference", "minus_reference", "minus_reference_low", "minus_reference_high", "verdict",
                      "gap_minus_first", "gap_minus_first_low", "gap_minus_first_high", "gap_minus_first_direction", "paired_on"]


def across_csv_rows(across: Grid, scores: list[AcrossScore], reference: str | None) -> list[list[Any]]:
    """across.csv: one row per score, entry and value, full precision: the mean; its change from the first value;
    its gap to the reference there; and how that gap changed from the first value (blank where undefined)."""
    def numbers(shift: Shift | None, words: str) -> list[Any]:
        d = shift.difference if shift else None
        return [*interval_cells(d), words if d else None]

    out = []
    for score in scores:
        gaps = {row.entry: row for row in score.gaps}
        for row in score.rows:
            gap_row = gaps.get(row.entry)
            for i, (value, mean) in enumerate(zip(across.values, row.means)):
                shift = row.shifts[i - 1] if i else None
                gap = gap_row.gaps[i] if gap_row else None
                change = gap_row.changes[i - 1] if gap_row and i else None
                said = verdict(gap.difference, higher_is_better=score.metric == "accuracy") if gap else ""
                paired = sorted({s.paired_on for s in (shift, gap, change) if s and s.difference})
                out.append([score.name, row.entry, across.key, value, mean,
                            *numbers(shift, direction(shift.difference) if shift else ""),
                            reference if gap else None, *numbers(gap, said),
                            *numbers(change, direction(change.difference) if change else ""), "; ".join(paired) or None])
    return out
