"""`aflora compare`: several methods (and AFLoRA ablations) × seeds on one identical experiment, one table.

The flow, in order:

    compare_table                 the config file's [compare] methods and seeds (--methods / --seeds override them)
    parse_entries / parse_seeds   "aflora,fedit,aflora:ddr=false" and "0,1,2" -> entries and seeds
    parse_grid / expand_grid      --grid "train.lr=0.001,0.002": every entry once per value (compare_grid.py: each
                                  entry's best value, written under the table and to grid.csv)
    parse_across                  --across "data.epsilon=0.2,0.6": the same expansion over a condition of the
                                  experiment (compare_across.py: how each entry and its gap to the reference move,
                                  under the table and in across.csv)
    plan_comparison               one config per (entry, seed), all validated (load_config + preflight) before any run
    run_comparison                simulate() each run into DIR/<label>/seed<k>/ (or reuse its results.json), then
    summarize -> write_markdown / write_csv / plots   DIR/comparison.md, comparison.csv, accuracy.png, uplink.png,
                                  pareto.png; with --reference, each entry's paired difference to that entry; each
                                  entry's time and traffic to a target accuracy on a simulated fleet (--fleet,
                                  --target-accuracy; compare_fleet.py and fleet.py)
                                  (the table half lives in compare_table.py, the statistics in intervals.py)

Every run shares the config except `method`, `seed` and the entry's own changes: its method options and the few
shared settings an entry may vary (ENTRY_SECTIONS, ENTRY_KEYS: learning rates, steps, the server's public data), and
with --across the one condition it varies (ACROSS_KEYS). For one seed all entries therefore see the same evaluation
rows, model and budgets and, unless an entry swaps the public set or --across changes them, the same partitions.
Parsing and the table are pure functions of plain values and results.json dicts: tested without running anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .compare_across import ACROSS_CSV_COLUMNS, across_csv_rows, across_markdown, across_scores
from .compare_fleet import FleetSettings, fleet_settings
from .compare_grid import GRID_CSV_COLUMNS, Grid, grid_choices, grid_csv_rows, grid_markdown
from .compare_table import Row, fleet_section, markdown_table, summarize, write_csv, write_markdown, write_plots, write_rows
from .config import COMPARE, ExperimentConfig, flatten, load_config, parse_override
from .errors import ConfigError, DataError, ModelError
from .machine import machine_line
from .methods import METHODS, method_class, method_options
from .results import load_run
from .run_folder import finish_replacement, prepare_run_folder
from .tomlwrite import toml_literal
from .values import coerce, tomllib

log = logging.getLogger(__name__)

# Settings that may differ between an earlier invocation and this one without changing what a run computes.
IGNORED_FOR_REUSE = ("engine.", "data.data_dir", "model.cache_dir", "tracking.")


# Shared settings one entry may change for itself: each method at its own learning rate from one grid, the server's
# step, an out-of-domain public set. Nothing here changes the test rows, so entries stay paired row by row.
ENTRY_SECTIONS = ("train", "server")
ENTRY_KEYS = ("data.public_dataset",)
# Conditions of the experiment --across may vary for every entry alike: how skewed the clients' data are and how many
# train each round. They change the partitions, not the test rows, so each seed's runs stay paired row by row.
ACROSS_KEYS = ("data.epsilon", "data.dirichlet_alpha", "data.labels_per_client", "federation.sample_fraction")


# ---------------------------------------------------------------------------- what to run
@dataclass(frozen=True)
class Entry:
    """One compared variant: a method, optionally with some of its options changed (an ablation)."""

    label: str  # as typed, e.g. "aflora:ddr=false+rank_aware_weights=false"; also its folder name
    method: str
    options: dict[str, Any] = field(default_factory=dict)  # overrides of the method's table, typed
    settings: dict[str, Any] = field(default_factory=dict)  # ENTRY_SECTIONS / ENTRY_KEYS, e.g. {"train.lr": 0.001}

    def config_overrides(self) -> list[str]:
        return [f"method={toml_literal(self.method)}", *(f"{self.method}.{k}={toml_literal(v)}" for k, v in self.options.items()),
                *(f"{k}={toml_literal(v)}" for k, v in self.settings.items())]


class CompareSettings(NamedTuple):
    """A config file's [compare] table, spelled as --methods / --seeds / --reference / --target-accuracy / --fleet /
    --grid / --across take them; None where unset."""

    methods: str | None = None
    seeds: str | None = None
    reference: str | None = None
    target_accuracy: float | None = None
    fleet: str | None = None
    grid: str | None = None
    across: str | None = None


def compare_table(config_path: Path | None) -> CompareSettings:
    """The config file's [compare] table. A published experiment keeps its entries, seeds and reference there:

        [compare]
        methods = ["aflora", "fedit", "aflora:ddr=false"]
        seeds = [0, 1, 2]
        reference = "aflora"    # each entry's paired difference to this one
        target_accuracy = 0.8   # the fleet table's target (default: 95 % of the best entry's final accuracy)
        fleet = "mixed"         # the simulated device fleet (aflora.fleet.FLEETS)
        grid = "train.lr=0.001,0.002,0.004"   # every entry once per value, and each entry's best (--grid)
        across = "data.epsilon=0.2,0.4,0.6"   # or every entry once per value of a condition (--across)
    """
    if config_path is None or not Path(config_path).is_file():
        return CompareSettings()  # load_config reports a missing file
    try:
        table = tomllib.loads(Path(config_path).read_text()).get(COMPARE, {})
    except tomllib.TOMLDecodeError:
        return CompareSettings()  # load_config reports it, with the position
    example = '[compare] methods = ["aflora", "fedit"], seeds = [0, 1, 2], reference = "aflora"'
    if not isinstance(table, dict) or set(table) - set(CompareSettings._fields):
        raise ConfigError(f"{config_path}: [compare] takes only {', '.join(CompareSettings._fields)}, e.g. {example}; "
                          f"got {table!r}")
    methods, seeds, reference = table.get("methods"), table.get("seeds"), table.get("reference")
    if methods is not None and not (isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods)):
        raise ConfigError(f"{config_path}: [compare] methods must be a non-empty list of entries (strings), e.g. {example}; "
                          f"got {methods!r}")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ConfigError(f"{config_path}: [compare] seeds must be a non-empty list of integers, e.g. {example}; got {seeds!r}")
    if reference is not None and not (isinstance(reference, str) and reference):
        raise ConfigError(f"{config_path}: [compare] reference must name one of the entries, e.g. {example}; got {reference!r}")
    fleet_settings(table.get("fleet"), table.get("target_accuracy"), source=f"{config_path}: [compare] ")  # checks both
    grid, across = table.get("grid"), table.get("across")
    for name, spec, check, like in (("grid", grid, parse_grid, "train.lr=0.001,0.002,0.004"),
                                    ("across", across, parse_across, "data.epsilon=0.2,0.4,0.6")):
        if spec is not None:
            if not isinstance(spec, str):
                raise ConfigError(f'{config_path}: [compare] {name} must be a string like "{like}"; got {spec!r}')
            check(spec)
    if grid is not None and across is not None:
        raise ConfigError(f"{config_path}: [compare] sets both grid and across; {ONE_SWEEP}")
    return CompareSettings(",".join(methods) if methods else None, ",".join(map(str, seeds)) if seeds else None, reference,
                           table.get("target_accuracy"), table.get("fleet"), grid, across)


def parse_entries(spec: str) -> list[Entry]:
    """`--methods`: comma-separated entries, each `method` or `method:key=value+key=value`."""
    entries = [parse_entry(item.strip()) for item in spec.split(",")]
    labels = [e.label for e in entries]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"--methods names {repeated} more than once; give each entry once")
    return entries


def parse_entry(text: str, varied: str = "") -> Entry:
    """`aflora:ddr=false+server_tuning=false` -> Entry("aflora", {"ddr": False, "server_tuning": False});
    `fedit:train.lr=0.001` -> Entry("fedit", settings={"train.lr": 0.001}) (a dotted key is a shared setting).
    `varied`: the one other setting the entry may carry, the --across condition its expansion gave it."""
    example = "e.g. aflora, fedit, aflora:ddr=false+rank_aware_weights=false or fedit:train.lr=0.001"
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
    settings: dict[str, Any] = {}
    for item in spec.split("+") if spec else []:
        if "=" not in item:
            raise ConfigError(f"--methods entry {text!r}: {item!r} is not key=value; {example}")
        key, value = parse_override(item)
        if key.startswith(f"{method}."):  # the method's own table written in full, e.g. aflora.beta: an option
            key = key.removeprefix(f"{method}.")
        if key in options or key in settings:
            raise ConfigError(f"--methods entry {text!r} sets {key!r} twice")
        if "." in key:
            if key.split(".")[0] not in ENTRY_SECTIONS and key not in ENTRY_KEYS and key != varied:
                raise ConfigError(f"--methods entry {text!r}: {key!r} cannot differ between entries; an entry may change "
                                  "only train.*, server.* and data.public_dataset, which leave the test rows shared "
                                  "(other settings apply to every entry: use --set)")
            settings[key] = value  # typed and range-checked by load_config when the plan is made
            continue
        if key not in known:
            raise ConfigError(f"--methods entry {text!r}: {method} has no option {key!r}; its options are {known} "
                              "(other settings apply to every entry: use --set)")
        try:
            options[key] = coerce(value, hints[key], f"{method}.{key}")
        except ConfigError as err:
            raise ConfigError(f"--methods entry {text!r}: {err}") from None
    try:
        method_options(method, options)  # the method's own range checks (e.g. aflora.alpha in [0, 1])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--methods entry {text!r}: {err}") from None
    return Entry(text, method, options, settings)


def sets_key(overrides: list[str], key: str) -> bool:
    """Whether one of the --set `key=value` overrides sets `key`."""
    return any(item.partition("=")[0].strip() == key for item in overrides)


ONE_SWEEP = "give one of them (tune with --grid on other seeds, then run --across with each entry at its best rate)"


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """`--grid train.lr=0.001,0.002,0.004` -> ("train.lr", ["0.001", "0.002", "0.004"]): one numeric train.* or
    server.* setting (those an entry may set for itself) and at least two distinct values, sorted by value."""
    key = spec.partition("=")[0].strip()
    if key.split(".")[0] not in ENTRY_SECTIONS or key.count(".") != 1:
        raise ConfigError(f"--grid {spec!r} must be one train.* or server.* setting and its values, "
                          "e.g. --grid train.lr=0.001,0.002,0.004")
    return _sweep_values("--grid", spec, "e.g. --grid train.lr=0.001,0.002,0.004")


def parse_across(spec: str) -> tuple[str, list[str]]:
    """`--across data.epsilon=0.6,0.2` -> ("data.epsilon", ["0.2", "0.6"]): one of ACROSS_KEYS and at least two
    distinct numeric values, sorted by value."""
    example = "e.g. --across data.epsilon=0.2,0.4,0.6"
    if spec.partition("=")[0].strip() not in ACROSS_KEYS:
        raise ConfigError(f"--across {spec!r} must be one of {', '.join(ACROSS_KEYS)} and its values, {example} (a method's "
                          "own settings are tuned with --grid)")
    return _sweep_values("--across", spec, example)


def _sweep_values(option: str, spec: str, example: str) -> tuple[str, list[str]]:
    key, _, text = spec.partition("=")
    key = key.strip()
    if not text:
        raise ConfigError(f"{option} {spec!r} has no values after '='; {example}")
    values = [v.strip() for v in text.split(",")]
    numbers = []
    for value in values:
        parsed = parse_override(f"{key}={value}")[1]
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
            raise ConfigError(f"{option} {spec!r}: {value!r} is not a number; {example}")
        numbers.append(float(parsed))
    if len(set(numbers)) != len(numbers) or len(numbers) < 2:
        raise ConfigError(f"{option} {spec!r} needs at least two different values, each once; {example}")
    return key, [value for _, value in sorted(zip(numbers, values))]


def expand_grid(entries: list[Entry], key: str, values: list[str], option: str = "--grid") -> tuple[list[Entry], Grid]:
    """Every entry once per value, as the entry `<entry>:<key>=<value>` (what --methods would spell), entry by entry;
    for --grid and --across alike."""
    set_already = [e.label for e in entries if key in e.settings]
    if set_already:
        raise ConfigError(f"{option} varies {key}, which the entries {set_already} set themselves; leave it out of them")
    grid = Grid(key, values, [e.label for e in entries])
    varied = key if option == "--across" else ""
    expanded = [parse_entry(grid.entry_with(entry, value), varied) for entry in grid.entries for value in values]
    return expanded, grid


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
    reference: str | None = None  # the entry every other one is compared with, paired (--reference)
    fleet: FleetSettings = field(default_factory=FleetSettings)  # the fleet table's fleet and target
    grid: Grid | None = None  # --grid: the entries are its cells, and the table ends with each entry's best value
    # --across: the entries are its cells; `reference` then names an entry as given (e.g. "aflora"), compared with at
    # each value in the across section instead of in the table
    across: Grid | None = None

    @property
    def base(self) -> ExperimentConfig:
        return self.runs[0].config


def plan_comparison(config_path: Path | None, overrides: list[str], entries: list[Entry], seeds: list[int], out: Path,
                    *, overwrite: bool = False, reference: str | None = None, fleet: FleetSettings | None = None,
                    grid: str | None = None, across: str | None = None) -> Plan:
    """Resolve and check every run before the first starts: a typo in the last entry fails in a second. With a
    grid or an across, every entry runs once per value (expand_grid)."""
    if grid is not None and across is not None:
        raise ConfigError(f"--grid and --across both given; {ONE_SWEEP}")
    sweeps, given = {}, [e.label for e in entries]
    for option, spec, parse in (("--grid", grid, parse_grid), ("--across", across, parse_across)):
        if spec is None:
            continue
        key, values = parse(spec)
        if sets_key(overrides, key):
            raise ConfigError(f"--set and {option} both set {key}; {option} gives it every value, so leave it out of --set")
        entries, sweeps[option] = expand_grid(entries, key, values, option)
    labels = given if "--across" in sweeps else [e.label for e in entries]  # --across compares as given, at each value
    if reference is not None and reference not in labels:
        raise ConfigError(f"--reference {reference!r} is not one of the entries {labels}; name one of them (e.g. --reference "
                          f"{labels[0]}), or add it to --methods")
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
    return Plan(entries, seeds, Path(out), runs, reference, fleet or FleetSettings(), sweeps.get("--grid"), sweeps.get("--across"))


def _preflight(config: ExperimentConfig, where: str) -> None:
    from .runtime.workload import preflight  # loads torch and the data layer

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
def run_comparison(plan: Plan, *, command: str) -> list[str]:
    """Run (or reuse) every planned run, then write the table and the overlay plots; returns what the terminal
    shows: the table, the fleet table and, with a grid or an across, its section."""
    runs: dict[str, list[dict[str, Any]]] = {e.label: [] for e in plan.entries}
    for i, planned in enumerate(plan.runs, 1):
        name = f"run {i}/{len(plan.runs)}: {planned.entry.label} seed {planned.seed}"
        if planned.reuse:
            log.info("%s: reusing %s (pass --overwrite to run it again)", name, planned.out_dir / "results.json")
        else:
            from .flower.simulation import simulate  # Flower and Ray load only when a run starts

            log.info("%s -> %s", name, planned.out_dir)
            write_to = prepare_run_folder(planned.out_dir, overwrite=True)  # what is there is replaced whole, once this run finishes
            simulate(planned.config, write_to)
            finish_replacement(write_to)
        runs[planned.entry.label].append(load_run(planned.out_dir))
    rows = summarize(runs, None if plan.across else plan.reference, plan.fleet)
    sweep = sweep_section(plan, rows, runs)
    write_markdown(rows, plan.out / "comparison.md", header=describe(plan, command), sections=sweep)
    write_csv(rows, plan.out / "comparison.csv")
    write_plots(runs, rows, plan.out)
    fleet = fleet_section(rows)
    return [*markdown_table(rows), *(["", *fleet] if fleet else []), *(["", *sweep] if sweep else [])]


def sweep_section(plan: Plan, rows: list[Row], runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """With --grid, each entry's best value (compare_grid) and grid.csv; with --across, how each entry and its gap to
    the reference move (compare_across) and across.csv; nothing otherwise. Returns comparison.md's section."""
    if not rows:
        return []
    if plan.across is not None:
        benchmarks = [name.partition("/")[0] for name in rows[0].extra if name.endswith("/accuracy")]
        scores = across_scores(plan.across, runs, plan.reference, rows[0].metric, benchmarks)
        write_rows(ACROSS_CSV_COLUMNS, across_csv_rows(plan.across, scores, plan.reference), plan.out / "across.csv")
        return across_markdown(plan.across, scores, plan.seeds, plan.reference)
    if plan.grid is None:
        return []
    choices = grid_choices(plan.grid, rows, runs)
    write_rows(GRID_CSV_COLUMNS, grid_csv_rows(plan.grid, choices), plan.out / "grid.csv")
    return grid_markdown(plan.grid, choices, plan.seeds, rows[0].metric)


def describe(plan: Plan, command: str) -> list[str]:
    """The markdown's preamble: how to reproduce the table and where it was measured."""
    base = plan.base
    reused = sum(r.reuse for r in plan.runs)
    return [
        f"Command: `{command}`",
        f"Seeds: {', '.join(map(str, plan.seeds))} · rounds: {base.rounds} · local steps: {base.train.local_steps} · "
        f"model: {base.model.name} · dataset: {base.data.dataset} · clients: {base.federation.num_clients} "
        f"(sample fraction {base.federation.sample_fraction}) · partition: {base.data.partition} · test rows per round: "
        f"{base.data.eval_size or 'all'}, in the final evaluation: {base.data.final_eval_rows() or 'all'}",
        f"Machine: {machine_line()}",
        f"Runs: {len(plan.runs)} in `{plan.out}/<label>/seed<k>/`"
        + (f", {reused} of them reused from an earlier invocation (same config)" if reused else ""),
    ]
