"""The table of `aflora compare`: columns with 95 % intervals, paired differences to a reference entry, the fleet
table (time and bytes to a target accuracy on a simulated fleet: compare_fleet), comparison.md / comparison.csv,
overlay and Pareto plots.

Everything here is a pure function of results.json dicts (label -> one per seed), so it is tested without
running anything: :func:`summarize` makes one :class:`Row` per label (and, given a reference, each row's paired
difference to it: :func:`paired_difference`), :func:`write_markdown` and :func:`write_csv` write them,
:func:`write_plots` draws the runs' curves over each other and final accuracy against client cost.
The statistics themselves are aflora.intervals.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compare_fleet import MEASURES, RATIOS, FleetRow, FleetSettings, fleet_markdown, fleet_rows
from .errors import ConfigError
from .intervals import Interval, Stat, paired_bootstrap, t_interval, unpack_bits, verdict

MIB = 2**20


def _final_metric(run: dict[str, Any]) -> float | None:
    final = run["final"]
    return final["accuracy"] if final.get("accuracy") is not None else final.get("loss")


def _final_interval(run: dict[str, Any]) -> list[float] | None:
    return run["final"].get("accuracy_ci95")


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
    key: str  # comparison.csv writes <key>_mean, <key>_std, <key>_ci95_low and <key>_ci95_high
    title: str  # comparison.md header
    spec: str  # format of the numbers in comparison.md
    value: Callable[[dict[str, Any]], float | None]  # one run's number (None: not defined for this method)
    hide_zero: bool = False  # leave out of comparison.md when every row is 0
    # An accuracy: comparison.md shows its 95 % interval, with one seed the run's own (Wilson, from results.json)
    interval: Callable[[dict[str, Any]], list[float] | None] | None = None


FINAL = Column("final", "final {metric} [95 % CI]", ".4f", _final_metric, interval=_final_interval)
COLUMNS = [
    FINAL,
    Column("best_accuracy", "best accuracy [95 % CI]", ".4f", lambda run: run["final"].get("best_accuracy"),
           interval=lambda run: run["final"].get("best_accuracy_ci95")),
    # Blank for runs made before results.json kept it, and for tasks without labels
    Column("balanced_accuracy", "balanced accuracy", ".4f", lambda run: run.get("final_eval", {}).get("balanced_accuracy")),
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
    """A benchmark from data.extra_eval (e.g. "mmlu/accuracy"): its score in the final evaluation (in the last
    round for runs made before aflora had one)."""
    benchmark, _, score = name.partition("/")

    def final(run: dict[str, Any]) -> dict[str, Any] | None:
        return run.get("final_eval", {}).get("extra", {}).get(benchmark)

    def value(run: dict[str, Any]) -> float | None:
        if final(run) is not None:
            return final(run).get(score)
        return run["rounds"][-1].get("extra", {}).get(name) if run["rounds"] else None

    def interval(run: dict[str, Any]) -> list[float] | None:
        return (final(run) or {}).get("accuracy_ci95")
    return Column(f"final_{name}", f"final {name}" + (" [95 % CI]" if score == "accuracy" else ""), ".4f", value,
                  interval=interval if score == "accuracy" else None)


def extra_names(runs: list[dict[str, Any]]) -> list[str]:
    return sorted({name for run in runs if run["rounds"] for name in run["rounds"][-1].get("extra", {})})


def table_columns(extra: list[str]) -> list[Column]:
    """The fixed columns, then one per extra benchmark of the table (blank in rows whose runs lack it)."""
    return COLUMNS + [extra_column(name) for name in extra]


def columns_of(rows: list[Row]) -> list[Column]:
    return table_columns(rows[0].extra if rows else [])


@dataclass
class Row:
    label: str
    method: str
    seeds: list[int]
    metric: str  # "accuracy", or "loss" where the task has no accuracy (instruction tuning)
    stats: dict[str, Stat]  # column key -> mean, std and 95 % interval over seeds
    finals: list[float | None]  # the final metric per seed, in `seeds` order
    extra: list[str] = field(default_factory=list)  # extra benchmarks of the whole table, e.g. ["mmlu/accuracy"]
    eval_rows: int | None = None  # test rows of the final evaluation (data.final_eval_size)
    reference: str = ""  # the entry every row is compared with (--reference), if any
    difference: Interval | None = None  # this entry's final metric minus the reference's, paired (None: not computable)
    verdict: str = ""  # ahead / level / behind the reference ("reference" on its own row)
    paired_on: str = ""  # what the difference was paired on, e.g. "3 seeds, t" or "2000 rows of seed 0, bootstrap"
    fleet: FleetRow | None = None  # time and traffic to the target on a simulated fleet (compare_fleet); None: not timeable
    majority: list[float | None] = field(default_factory=list)  # per seed: the score of always answering the commonest label


def column_stat(column: Column, runs: list[dict[str, Any]]) -> Stat:
    """Over the seeds' runs; with one seed, the run's own interval (Wilson) where the column has one."""
    own = column.interval(runs[0]) if column.interval and len(runs) == 1 else None
    return Stat.of([column.value(run) for run in runs], own)


def summarize(runs: dict[str, list[dict[str, Any]]], reference: str | None = None, fleet: FleetSettings | None = None) -> list[Row]:
    """label -> its runs' results.json dicts (one per seed) -> one row per label, in the given order; with a
    reference label, every other row also gets its paired difference to that entry. Each row also gets its time
    and traffic to the target accuracy on the simulated fleet (`fleet`, default: the default fleet and target)."""
    rows = []
    extra = extra_names([run for seeds in runs.values() for run in seeds])
    columns = table_columns(extra)
    for label, seeds in runs.items():
        if not seeds:
            raise ValueError(f"no finished runs for {label!r}")
        metric = "accuracy" if all(run["final"].get("accuracy") is not None for run in seeds) else "loss"
        finals = [run["final"].get(metric) for run in seeds]  # one metric for every seed of a label
        stats = {c.key: column_stat(c, seeds) for c in columns}
        if metric == "loss":  # a label whose seeds do not all have an accuracy compares the loss of every seed
            stats["final"] = Stat.of(finals)
        rows.append(Row(label, seeds[0]["method"], [run["seed"] for run in seeds], metric, stats, finals, extra,
                        seeds[0]["final"].get("eval_rows"),
                        majority=[run.get("final_eval", {}).get("majority_label_accuracy") for run in seeds]))
    if reference is not None:
        for row in rows:
            row.reference = reference
            if row.label == reference:
                row.verdict = "reference"
                continue
            row.difference, row.paired_on = paired_difference(row.label, runs[row.label], reference, runs[reference], row.metric)
            row.verdict = verdict(row.difference, higher_is_better=row.metric == "accuracy")
    timed = fleet_rows(runs, fleet or FleetSettings(), reference)
    if timed is not None:
        for row in rows:
            row.fleet = timed[row.label]
    return rows


# ---------------------------------------------------------------------------- paired differences
def paired_difference(label: str, entry: list[dict[str, Any]], reference: str, reference_runs: list[dict[str, Any]],
                      metric: str) -> tuple[Interval | None, str]:
    """The entry's final metric minus the reference's, on the same seeds and test rows, with a 95 % interval:
    over 2 or more shared seeds, the t-interval of the per-seed differences; with one seed, the paired bootstrap
    over its test rows (accuracy only: losses are not kept per row). Returns (interval, what it was paired on)."""
    by_seed = {run["seed"]: run for run in reference_runs}
    pairs = [(run, by_seed[run["seed"]]) for run in entry if run["seed"] in by_seed]
    if not pairs:
        raise ConfigError(f"`{label}` (seeds {[run['seed'] for run in entry]}) shares no seed with the reference `{reference}` "
                          f"(seeds {sorted(by_seed)}); paired differences need both run with the same seeds")
    for run, ref in pairs:
        _check_same_rows(label, run, reference, ref)
    left_out = f", {len(entry) - len(pairs)} unpaired seed(s) left out" if len(pairs) < len(entry) else ""
    if len(pairs) >= 2:
        return t_interval([run["final"][metric] - ref["final"][metric] for run, ref in pairs]), f"{len(pairs)} seeds, t{left_out}"
    run, ref = pairs[0]
    final, ref_final = run["final_eval"], ref["final_eval"]
    if metric != "accuracy" or "correct" not in final or "correct" not in ref_final:
        return None, f"seed {run['seed']} only: no per-row outcomes to pair{left_out}"
    n = final["rows"]
    return (paired_bootstrap(unpack_bits(final["correct"], n), unpack_bits(ref_final["correct"], n)),
            f"{n} rows of seed {run['seed']}, bootstrap{left_out}")


def _check_same_rows(label: str, run: dict[str, Any], reference: str, ref: dict[str, Any]) -> None:
    """Refuses to pair runs whose final evaluations scored different test rows (or that cannot show theirs)."""
    where = f"`{label}` seed {run['seed']} with the reference `{reference}` seed {ref['seed']}"
    missing = [name for name, r in ((label, run), (reference, ref)) if "rows_sha256" not in r.get("final_eval", {})]
    if missing:
        raise ConfigError(f"cannot pair {where}: the results.json of {missing} records no final evaluation (a run made before "
                          "aflora kept one); run it again with --overwrite, or leave out --reference")
    a, b = run["final_eval"], ref["final_eval"]
    if a["rows_sha256"] != b["rows_sha256"]:
        raise ConfigError(f"cannot pair {where}: their final evaluations scored different test rows ({a['rows']} of "
                          f"{a['test_rows']} vs {b['rows']} of {b['test_rows']}); give both runs the same data settings "
                          "(dataset, data.eval_size, data.final_eval_size) and seed")


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
    reference = rows[0].reference if rows else ""
    after_final = 3  # entry, seeds, final: the paired difference goes next to what it compares
    titles = ["entry", "seeds", *(c.title.format(metric=metric) for c in columns)]
    if reference:
        titles[after_final:after_final] = [f"Δ {metric} vs `{reference}` [95 % CI]", f"vs `{reference}`"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] + ["---:"] * (len(titles) - 1)) + "|"]
    for row in rows:
        numbers = [row.stats[c.key].format(c.spec, interval=c.interval is not None) for c in columns]
        cells = [f"`{row.label}`", str(len(row.seeds)), *numbers]
        if reference:
            cells[after_final:after_final] = [format_difference(row), row.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_difference(row: Row) -> str:
    d = row.difference
    if d is None:
        return "—" if row.verdict == "reference" else ""
    return f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def footnotes(rows: list[Row]) -> list[str]:
    """What the numbers of comparison.md are, how each interval was computed."""
    eval_rows = sorted({row.eval_rows for row in rows if row.eval_rows})
    notes = [
        "Accuracies: mean [95 % interval]; with one seed the Wilson interval over the run's test rows, with several the "
        "t-interval over seeds (mean ± t·s/√n, which holds the test-row noise too: each seed samples its own rows). "
        "Other columns: mean ± sample standard deviation over seeds (± only with 2 or more). Final is the global "
        "model's final evaluation" + (f" on {' / '.join(map(str, eval_rows))} test rows" if eval_rows else "")
        + " (data.final_eval_size); best is the best round on the per-round rows, chosen on the test rows and so "
        "optimistic. Client cost % is the mean share of the base model's parameters a client trains per round; uplink "
        "is the total client → server traffic; round s excludes evaluation; aggregation s and server step s are the "
        "server's time per round to aggregate and for its own update (e.g. AFLoRA's A tuning, incl. the merge); "
        "aggregation error is ‖ΔW_global − Σ p_k B_k A_k‖ / ‖Σ p_k B_k A_k‖ per round, blank where the method does "
        "not define it.",
    ]
    majority = majority_by_seed(rows)
    if majority:
        notes += ["", "Balanced accuracy is the mean of the final evaluation's per-label recalls (results.json keeps each "
                  "label's), 1/K for a model that gives every row the same answer. Always answering the most common label "
                  "of the same rows scores " + ", ".join(f"{value:.4f} (seed {seed})" for seed, value in majority.items())
                  + ": a final accuracy near that with a balanced accuracy near 1/K learned the label shares, not the task."]
    reference = rows[0].reference if rows else ""
    if reference:
        paired = "; ".join(f"`{row.label}`: {row.paired_on}" for row in rows if row.paired_on)
        notes += ["", f"Δ is each entry's final metric minus `{reference}`'s on the same seeds and test rows, with a 95 % "
                  "interval: over 2 or more seeds the t-interval of the per-seed differences, with one seed a paired "
                  "bootstrap over the test rows (10,000 resamples, fixed seed). Ahead / behind only when the interval "
                  "excludes 0 (for a loss, lower is ahead), else level. Paired on: " + paired + "."]
    return notes


def majority_by_seed(rows: list[Row]) -> dict[int, float]:
    """seed -> the majority-label score of its final evaluation's rows, from whichever run recorded it."""
    found = {seed: value for row in rows for seed, value in zip(row.seeds, row.majority) if value is not None}
    return dict(sorted(found.items()))


def fleet_section(rows: list[Row]) -> list[str]:
    """The fleet table and its notes (compare_fleet); nothing where no run could be timed."""
    timed = [row for row in rows if row.fleet is not None]
    return fleet_markdown([row.label for row in timed], [row.fleet for row in timed], timed[0].reference) if timed else []


def write_markdown(rows: list[Row], path: Path, *, header: list[str], sections: list[str] = ()) -> Path:
    """comparison.md: the header lines, the table and its notes, the finals per seed, the fleet table, then
    `sections` (e.g. the grid's: compare_grid)."""
    metric = rows[0].metric if rows else "accuracy"
    seeds = sorted({s for row in rows for s in row.seeds})
    lines = [
        f"# Comparison: {', '.join(row.label for row in rows)}",
        "",
        *(f"- {line}" for line in header),
        "",
        *markdown_table(rows),
        "",
        *footnotes(rows),
    ]
    if len(seeds) > 1:
        lines += ["", f"Final {metric} per seed:", "",
                  "| entry | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|" + "---:|" * len(seeds)]
        for row in rows:
            by_seed = dict(zip(row.seeds, row.finals))
            lines.append(f"| `{row.label}` | " + " | ".join("" if by_seed.get(s) is None else f"{by_seed[s]:.4f}" for s in seeds) + " |")
    fleet = fleet_section(rows)
    if fleet:
        lines += ["", *fleet]
    if sections:
        lines += ["", *sections]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


STAT_PARTS = ("mean", "std", "ci95_low", "ci95_high")
PAIRED = ["reference", "difference", "difference_ci95_low", "difference_ci95_high", "verdict", "paired_on"]
FLEET = ["fleet", "target_accuracy", "target_reached_seeds", *(f"{m.key}_{part}" for m in MEASURES for part in STAT_PARTS),
         *(f"{name}_vs_reference" for name in RATIOS)]


def csv_columns(rows: list[Row] = ()) -> list[str]:
    return ["label", "method", "seeds", "metric", "eval_rows",
            *(f"{c.key}_{part}" for c in columns_of(list(rows)) for part in STAT_PARTS), *PAIRED, *FLEET]


def fleet_cells(fleet: FleetRow | None) -> list[Any]:
    if fleet is None:
        return [None] * len(FLEET)
    stats = [fleet.stats[m.key] for m in MEASURES]
    return [fleet.fleet, fleet.target, fleet.reached, *(v for s in stats for v in (s.mean, s.std, s.low, s.high)),
            *(fleet.vs_reference.get(name) for name in RATIOS)]


def write_csv(rows: list[Row], path: Path) -> Path:
    """Every column for every row (blank where undefined), full precision; seeds as '0 1 2'."""
    lines = []
    for row in rows:
        numbers = [row.stats[c.key] for c in columns_of(rows)]
        d = row.difference
        paired = [row.reference, *interval_cells(d), row.verdict, row.paired_on]
        lines.append([row.label, row.method, " ".join(map(str, row.seeds)), row.metric, row.eval_rows,
                      *(v for s in numbers for v in (s.mean, s.std, s.low, s.high)), *paired, *fleet_cells(row.fleet)])
    return write_rows(csv_columns(rows), lines, path)


def interval_cells(interval: Interval | None) -> list[float | None]:
    """A CSV's estimate, low and high cells (blank where nothing was compared)."""
    return [interval.estimate, interval.low, interval.high] if interval else [None] * 3


def write_rows(columns: list[str], rows: list[list[Any]], path: Path) -> Path:
    """A CSV file: None as a blank cell, numbers at full precision (repr), strings as they are."""
    def cell(value: Any) -> str:
        return "" if value is None else value if isinstance(value, str) else repr(value)

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([cell(v) for v in row] for row in rows)
    return path


def write_plots(runs: dict[str, list[dict[str, Any]]], rows: list[Row], out: Path) -> list[Path]:
    """accuracy.png and uplink.png (the runs' curves over each other) and pareto.png (final metric vs client cost)."""
    from .plots import ParetoPoint, accuracy_figure, pareto_figure, save_figure, uplink_figure

    points = [ParetoPoint(row.label, row.stats["client_cost_pct"].mean, row.stats["final"].mean, row.stats["final"].low,
                          row.stats["final"].high) for row in rows if row.stats["final"].mean is not None]
    metric = rows[0].metric if rows else "accuracy"
    return [save_figure(accuracy_figure(runs), out / "accuracy.png"), save_figure(uplink_figure(runs), out / "uplink.png"),
            save_figure(pareto_figure(points, metric), out / "pareto.png", integer_x=False)]
