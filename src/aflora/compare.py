"""`aflora compare`: several methods (and AFLoRA ablations) × seeds on one identical experiment, one table.

The flow, in order:

    parse_entries / parse_seeds   "aflora,fedit,aflora:ddr=false" and "0,1,2" -> entries and seeds
    plan_comparison               one config per (entry, seed), all validated (load_config + preflight) before any run
    run_comparison                simulate() each run into DIR/<label>/seed<k>/ (or reuse its results.json), then
    summarize -> write_markdown / write_csv / plots   DIR/comparison.md, comparison.csv, accuracy.png, uplink.png

Every run shares the config except `method`, `seed` and the entry's own method options, so for one seed all entries
see the same partitions, public set, evaluation rows, model and budgets. Parsing and the table are pure functions
of plain values and results.json dicts: tested without running anything.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import platform
import statistics
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, ExperimentConfig, flatten, load_config, parse_override
from .tomlwrite import toml_literal
from .values import coerce
from .data import DataError
from .methods import METHODS, method_class, method_options
from .models import ModelError
from .results import load_run

log = logging.getLogger(__name__)

MIB = 2**20
# Settings that may differ between an earlier invocation and this one without changing what a run computes.
IGNORED_FOR_REUSE = ("engine.", "data.data_dir", "model.cache_dir")


# ---------------------------------------------------------------------------- what to run
@dataclass(frozen=True)
class Entry:
    """One compared variant: a method, optionally with some of its options changed (an ablation)."""

    label: str  # as typed, e.g. "aflora:ddr=false+rank_aware_weights=false"; also its folder name
    method: str
    options: dict[str, Any] = field(default_factory=dict)  # overrides of the method's table, typed

    def config_overrides(self) -> list[str]:
        return [f"method={toml_literal(self.method)}", *(f"{self.method}.{k}={toml_literal(v)}" for k, v in self.options.items())]


def parse_entries(spec: str) -> list[Entry]:
    """`--methods`: comma-separated entries, each `method` or `method:key=value+key=value`."""
    entries = [parse_entry(item.strip()) for item in spec.split(",")]
    labels = [e.label for e in entries]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"--methods names {repeated} more than once; give each entry once")
    return entries


def parse_entry(text: str) -> Entry:
    """`aflora:ddr=false+server_tuning=false` -> Entry("aflora", {"ddr": False, "server_tuning": False})."""
    example = "e.g. aflora, fedit or aflora:ddr=false+rank_aware_weights=false"
    if not text:
        raise ConfigError(f"--methods has an empty entry (two commas in a row, or a trailing comma); {example}")
    if any(ch in text for ch in "/\\ \t"):
        raise ConfigError(f"--methods entry {text!r} contains a space or a slash; it also names a folder, so use neither")
    method, _, spec = text.partition(":")
    if method not in METHODS:
        raise ConfigError(f"--methods entry {text!r}: unknown method {method!r}; available methods are {sorted(METHODS)}")
    if ":" in text and not spec:
        raise ConfigError(f"--methods entry {text!r} has nothing after ':'; write {method} alone, or {method}:key=value")
    options_class = method_class(method).options_class
    hints = typing.get_type_hints(options_class)
    known = sorted(f.name for f in dataclasses.fields(options_class))
    options: dict[str, Any] = {}
    for item in spec.split("+") if spec else []:
        if "=" not in item:
            raise ConfigError(f"--methods entry {text!r}: {item!r} is not key=value; {example}")
        key, value = parse_override(item)
        if key not in known:
            raise ConfigError(f"--methods entry {text!r}: {method} has no option {key!r}; its options are {known} "
                              "(other settings apply to every entry: use --set)")
        if key in options:
            raise ConfigError(f"--methods entry {text!r} sets {key!r} twice")
        try:
            options[key] = coerce(value, hints[key], f"{method}.{key}")
        except ConfigError as err:
            raise ConfigError(f"--methods entry {text!r}: {err}") from None
    try:
        method_options(method, options)  # the method's own range checks (e.g. aflora.alpha in [0, 1])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--methods entry {text!r}: {err}") from None
    return Entry(text, method, options)


def parse_seeds(spec: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2]."""
    items = [s.strip() for s in spec.split(",")]
    if not all(s.lstrip("-").isdigit() for s in items):
        raise ConfigError(f"--seeds must be comma-separated integers (e.g. 0,1,2), got {spec!r}")
    seeds = [int(s) for s in items]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds repeats a seed: {spec!r}; give each seed once")
    return seeds


@dataclass
class PlannedRun:
    entry: Entry
    seed: int
    config: ExperimentConfig
    out_dir: Path
    reuse: bool  # results.json from an earlier invocation, for the same config


@dataclass
class Plan:
    entries: list[Entry]
    seeds: list[int]
    out: Path
    runs: list[PlannedRun]

    @property
    def base(self) -> ExperimentConfig:
        return self.runs[0].config


def plan_comparison(config_path: Path | None, overrides: list[str], entries: list[Entry], seeds: list[int], out: Path,
                    *, overwrite: bool = False) -> Plan:
    """Resolve and check every run before the first starts: a typo in the last entry fails in a second."""
    for item in overrides:
        key, _ = parse_override(item)
        if key in ("method", "seed"):
            raise ConfigError(f"--set {item}: compare sets {key} per run; list them with --methods and --seeds instead")
    runs = []
    for seed in seeds:  # seed-major: an interrupted comparison already holds every entry for the first seeds
        for entry in entries:
            where = f"--methods entry {entry.label!r}, seed {seed}"
            run_dir = Path(out) / entry.label / f"seed{seed}"
            try:
                config = load_config(config_path, [*overrides, *entry.config_overrides(), f"seed={seed}"])
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            reuse = (run_dir / "results.json").is_file() and not overwrite
            if reuse:
                _check_reusable(run_dir, config)
            else:
                _preflight(config, where)
            runs.append(PlannedRun(entry, seed, config, run_dir, reuse))
    return Plan(entries, seeds, Path(out), runs)


def _preflight(config: ExperimentConfig, where: str) -> None:
    from .runtime import preflight  # loads torch and the data layer

    try:
        preflight(config)
    except (ConfigError, DataError, ModelError) as err:
        raise type(err)(f"{where}: {err}") from None


def _check_reusable(run_dir: Path, config: ExperimentConfig) -> None:
    """An earlier run is reused only if it ran this very config; anything else is refused, never silently mixed in."""
    try:
        stored = flatten(load_run(run_dir).get("config", {}))
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{run_dir}/results.json is not a results file of `aflora run`; pass --overwrite to run it "
                          "again, or choose another --out") from None
    wanted = flatten(json.loads(json.dumps(config.to_dict())))  # the JSON round trip results.json went through
    # A setting added to aflora after that run, left at its default now, changes nothing that run did.
    defaults = flatten(json.loads(json.dumps(ExperimentConfig().to_dict())))
    differing = sorted(k for k in set(stored) | set(wanted)
                       if stored.get(k) != wanted.get(k) and not k.startswith(IGNORED_FOR_REUSE)
                       and not (k not in stored and k in defaults and wanted.get(k) == defaults[k]))
    if differing:
        shown = ", ".join(f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} now" for k in differing[:5])
        more = f" (and {len(differing) - 5} more)" if len(differing) > 5 else ""
        raise ConfigError(f"{run_dir}/results.json was run with another config ({shown}{more}); "
                          "pass --overwrite to run it again, or choose another --out")


# ---------------------------------------------------------------------------- running
def run_comparison(plan: Plan, *, command: str) -> list[Row]:
    """Run (or reuse) every planned run, then write the table and the overlay plots; returns the table's rows."""
    runs: dict[str, list[dict[str, Any]]] = {e.label: [] for e in plan.entries}
    for i, planned in enumerate(plan.runs, 1):
        name = f"run {i}/{len(plan.runs)}: {planned.entry.label} seed {planned.seed}"
        if planned.reuse:
            log.info("%s: reusing %s (pass --overwrite to run it again)", name, planned.out_dir / "results.json")
        else:
            from .flower.simulation import simulate  # Flower and Ray load only when a run starts

            log.info("%s -> %s", name, planned.out_dir)
            simulate(planned.config, planned.out_dir)
        runs[planned.entry.label].append(load_run(planned.out_dir))
    rows = summarize(runs)
    write_markdown(rows, plan.out / "comparison.md", header=describe(plan, command))
    write_csv(rows, plan.out / "comparison.csv")
    write_plots(runs, plan.out)
    return rows


def write_plots(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    from .plots import accuracy_figure, save_figure, uplink_figure

    return [save_figure(accuracy_figure(runs), out / "accuracy.png"), save_figure(uplink_figure(runs), out / "uplink.png")]


def describe(plan: Plan, command: str) -> list[str]:
    """The markdown's preamble: how to reproduce the table and where it was measured."""
    base = plan.base
    reused = sum(r.reuse for r in plan.runs)
    return [
        f"Command: `{command}`",
        f"Seeds: {', '.join(map(str, plan.seeds))} · rounds: {base.rounds} · local steps: {base.train.local_steps} · "
        f"model: {base.model.name} · dataset: {base.data.dataset} · clients: {base.federation.num_clients} "
        f"(sample fraction {base.federation.sample_fraction}) · partition: {base.data.partition}",
        f"Machine: {machine()}",
        f"Runs: {len(plan.runs)} in `{plan.out}/<label>/seed<k>/`"
        + (f", {reused} of them reused from an earlier invocation (same config)" if reused else ""),
    ]


def machine() -> str:
    import torch

    device = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{platform.platform()}, {os.cpu_count()} CPUs{device}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


# ---------------------------------------------------------------------------- the table
def _final_metric(run: dict[str, Any]) -> float | None:
    final = run["final"]
    return final["accuracy"] if final.get("accuracy") is not None else final.get("loss")


def _round_mean(key: str) -> Callable[[dict[str, Any]], float | None]:
    """Mean over the run's rounds of a per-round value, skipping rounds (or methods) where it is null."""
    def value(run: dict[str, Any]) -> float | None:
        values = [r[key] for r in run["rounds"] if r.get(key) is not None]
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
