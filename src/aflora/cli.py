"""Command line: `aflora run`, `aflora compare`, `aflora export`, `aflora config`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .errors import CheckpointError, ConfigError, DataError, FederationError, ModelError, OutputError, RoundAborted
from .logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated LoRA fine-tuning of LLMs on heterogeneous clients.")
err = Console(stderr=True, soft_wrap=True)  # never break an error message mid-sentence

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="Experiment TOML file (see configs/)")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config value: key=value, repeatable")]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Local datasets folder (same as data.data_dir / $AFLORA_DATA_DIR)")]


def _overrides(sets: list[str] | None, data_dir: Path | None) -> list[str]:
    overrides = list(sets or [])
    if data_dir is not None:
        overrides.append(f'data.data_dir="{data_dir}"')
    return overrides


def _load_config(config: Path | None, sets: list[str] | None, data_dir: Path | None):
    """The experiment with its overrides; imported here so that `aflora --help` does not load torch."""
    from .config import load_config

    return load_config(config, _overrides(sets, data_dir))


def _check_out(out: Path, option: str = "--out") -> None:
    """Refuse an output folder that cannot be written before any work starts (not after round 1)."""
    from .folders import unwritable_folder_reason

    problem = unwritable_folder_reason(out)
    if problem:
        raise ConfigError(f"{option} {out}: {problem}; choose a folder path (it is created if missing)")


def _preflight(experiment):
    """Model layers, data and partitions checked before an engine, a federation or a model starts; the workload."""
    from .runtime.workload import preflight

    return preflight(experiment)


@app.command()
def run(
    config: ConfigOption = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output folder for results, plots and the adapter", show_default="runs/latest")] = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the run (or anything else) in --out; the old run stays until the new one has finished")] = False,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue the run in this folder from its last checkpoint (or from a checkpoint file in its checkpoint/)")] = None,
) -> None:
    """Run one federated experiment on Flower's simulation engine (or resume one)."""
    from .run_folder import finish_replacement, prepare_run_folder, run_folder

    checkpoint_file = None
    if resume is not None:
        _refuse_ignored_beside_resume(resume, config=config, out=out, overwrite=overwrite)
        experiment, out, checkpoint_file = _resumed_experiment(resume, set_, data_dir)
    else:
        out = out or Path("runs/latest")
        experiment = _load_config(config, set_, data_dir)
        _check_out(out)
        if not overwrite:
            prepare_run_folder(out, overwrite=False)  # refuses a folder that holds anything (writes nothing), before slower checks
    configure_logging(experiment.engine.verbose)
    workload = _preflight(experiment)
    from .flower.simulation import simulate  # Flower and Ray load only when a run starts

    if resume is not None:
        simulate(experiment, out, workload, resume=True, checkpoint_file=checkpoint_file)
        out = finish_replacement(out)  # a resumed `<out>.replacing` now replaces its `<out>`
    else:  # only now is anything written: with --overwrite, the folder beside --out that the new run goes to
        with run_folder(out, overwrite=overwrite) as write_to:
            simulate(experiment, write_to, workload, resume=False)
    err.print(f"[green]results, plots and adapter written to {escape(str(out))}[/green]")


def _refuse_ignored_beside_resume(resume: Path, *, config: Path | None, out: Path | None, overwrite: bool) -> None:
    """--resume continues a run in its folder with its own config: options that would be ignored are refused instead."""
    folder = resume.parent.parent if resume.is_file() else resume  # a checkpoint file sits in <folder>/checkpoint/
    ignored = [name for name, given in (("--config", config is not None), ("--overwrite", overwrite),
                                        ("--out", out is not None and out.absolute() != folder.absolute())) if given]
    if ignored:
        raise ConfigError(f"--resume {resume} continues that run in its folder with the config saved in its checkpoint, so "
                          f"{' and '.join(ignored)} would be ignored: drop {'them' if len(ignored) > 1 else 'it'} (change rounds, "
                          "data.data_dir, engine.* or tracking.* with --set), or start a new run without --resume")


def _resumed_experiment(path: Path, sets: list[str] | None, data_dir: Path | None):
    """The checkpointed run's own config, its folder and the checkpoint file to continue from (None: the latest);
    only rounds (to extend), where data lives, engine.* and tracking.* may change."""
    from .checkpoint import load_checkpoint
    from .config import config_from_tree, parse_override, set_dotted
    from .run_folder import CHECKPOINT_DIR, RESULTS_FILE, unfinished_replacement

    if not path.exists():
        raise ConfigError(f"--resume {path}: no such folder or file; pass the --out folder of a run that finished at least one "
                          f"round (or a checkpoint file in its {CHECKPOINT_DIR}/)")
    folder, checkpoint_file = path, None
    if path.is_file():  # --resume runs/x/checkpoint/round_3.pt
        if path.parent.name != CHECKPOINT_DIR:
            raise ConfigError(f"--resume takes a run folder or a checkpoint file in its {CHECKPOINT_DIR}/ folder, got {path}")
        folder, checkpoint_file = path.parent.parent, path.name
    _, record = load_checkpoint(folder, checkpoint_file)
    tree = record["config"]
    for item in _overrides(sets, data_dir):
        key, value = parse_override(item)
        if key not in ("rounds", "data.data_dir") and not key.startswith(("engine.", "tracking.")):
            raise ConfigError(f"--resume continues the same experiment: {key} cannot change (only rounds, data.data_dir, engine.*, "
                              "tracking.*)")
        set_dotted(tree, key, value)
    experiment = config_from_tree(tree)
    done = record["rounds"][-1]["round"] if record["rounds"] else 0
    if experiment.rounds < done:
        raise ConfigError(f"--resume {path}: its checkpoint already holds {done} rounds, more than rounds = {experiment.rounds}; "
                          f"pass --set rounds=N with N > {done} to extend it")
    if experiment.rounds == done and (folder / RESULTS_FILE).exists():
        replacement = unfinished_replacement(folder)
        raise ConfigError(f"{folder} already finished all {experiment.rounds} rounds; pass --set rounds=N to extend it"
                          + (f" (the unfinished run that will replace it is in {replacement}: --resume {replacement})"
                             if replacement else ""))
    return experiment, folder, checkpoint_file


@app.command()
def compare(
    methods: Annotated[str | None, typer.Option(
        "--methods", "-m",
        help="Comma-separated entries: a method, or method:key=value[+key=value...] for an ablation of its options or "
             "its own train.*, server.* or data.public_dataset, e.g. aflora,fedit,aflora:ddr=false+rank_aware_weights=false,"
             "fedit:train.lr=0.0005 (default: the config's [compare] methods)")] = None,
    config: ConfigOption = None,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="Comma-separated seeds; every entry runs with each (default: the config's [compare] seeds, else 0)")] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output folder: <label>/seed<k>/ per run, comparison.md/.csv, plots")] = Path("runs/compare"),
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    overwrite: Annotated[bool, typer.Option(
        help="Run again the runs whose results.json is already in --out (default: reuse them)")] = False,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="An entry (e.g. aflora) every other one is compared with on the same seeds and test rows: the "
                            "difference, its 95 % interval and ahead / level / behind (default: the config's [compare] reference)")] = None,
    target_accuracy: Annotated[float | None, typer.Option(
        "--target-accuracy", help="The fleet table's target: each entry's simulated fleet time and bytes until a round reaches "
                                  "this accuracy (default: the config's [compare] target_accuracy, else 95 % of the best "
                                  "entry's final accuracy; docs/fleet.md)")] = None,
    fleet: Annotated[str | None, typer.Option(
        "--fleet", help="The simulated device fleet that times each run: mixed (phones, laptops, edge GPUs by budget) or "
                        "phones (default: the config's [compare] fleet, else mixed; docs/fleet.md)")] = None,
    grid: Annotated[str | None, typer.Option(
        "--grid", help="One train.* or server.* setting and its values, e.g. train.lr=0.001,0.002,0.004: every entry runs once "
                       "per value (as <entry>:train.lr=<value>) and the table ends with each entry's best value and the "
                       "--methods that runs each at it (default: the config's [compare] grid)")] = None,
    across: Annotated[str | None, typer.Option(
        "--across", help="One condition of the experiment and its values, e.g. data.epsilon=0.2,0.4,0.6 (or data.dirichlet_alpha, "
                         "data.labels_per_client, federation.sample_fraction): every entry runs once per value, and the "
                         "table ends with how each entry's final metric, and its gap to --reference, moves from value to "
                         "value, paired (default: the config's [compare] across)")] = None,
) -> None:
    """Run several methods (and ablations) × seeds on one identical experiment; write a comparison table and plots."""
    from .compare import compare_table, parse_entries, parse_seeds, plan_comparison, run_comparison, sets_key
    from .compare_fleet import fleet_settings

    configure_logging()
    in_file = compare_table(config)
    methods, seeds = methods or in_file.methods, seeds or in_file.seeds or "0"
    if methods is None:
        raise ConfigError("aflora compare needs the entries to run: pass --methods (e.g. --methods aflora,fedit), or use a "
                          "config whose [compare] table lists them (e.g. configs/table2_ag_news.toml)")
    _check_out(out)
    on_fleet = fleet_settings(fleet or in_file.fleet, in_file.target_accuracy if target_accuracy is None else target_accuracy)
    entries = parse_entries(methods)
    overrides = _overrides(set_, data_dir)
    grid = grid or (None if across else in_file.grid)
    # The file's across yields to a --set of its setting (one value of it, run alone) and to a --grid
    file_across = in_file.across if in_file.across and not grid and not sets_key(
        overrides, in_file.across.partition("=")[0].strip()) else None
    # The file's reference, unless --methods left it out or a grid runs: a grid compares each entry's values with
    # its own best, and its entries are `<entry>:train.lr=<value>`, none of them the file's entry as named
    if reference is None and not grid and in_file.reference in [e.label for e in entries]:
        reference = in_file.reference
    plan = plan_comparison(config, overrides, entries, parse_seeds(seeds), out, overwrite=overwrite, reference=reference,
                           fleet=on_fleet, grid=grid, across=across or file_across)
    configure_logging(plan.base.engine.verbose)
    typer.echo("\n".join(run_comparison(plan, command=shlex.join(["aflora", *sys.argv[1:]]))))
    tables = ", ".join(["comparison.md", "comparison.csv", *(["grid.csv"] if plan.grid else []), *(["across.csv"] if plan.across else [])])
    err.print(f"[green]table, plots and {len(plan.runs)} runs written to {escape(str(out))} ({tables})[/green]")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Option("--run", help="--out folder of a finished run")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged model (safetensors); new or empty")],
    overwrite: Annotated[bool, typer.Option(help="Replace what --out holds (only once the merged model is written)")] = False,
) -> None:
    """Merge a run's global adapter into its base model and save a standalone model."""
    from .outputs import export_merged_model

    configure_logging()
    _check_out(out)
    export_merged_model(run_dir, out, overwrite=overwrite)
    err.print(f"[green]merged model written to {escape(str(out))}[/green]")


@app.command()
def partition(
    config: ConfigOption = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for client_<k>.jsonl, task.json, manifest.json; new or empty")] = Path("shards"),
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace what --out holds (only once every file is written)")] = False,
) -> None:
    """Write each client's rows to its own file, for SuperNodes that must see only their own data."""
    from .deployment.shards import write_shards
    from .run_folder import written_aside

    experiment = _load_config(config, set_, data_dir)
    _check_out(out)
    with written_aside(out, overwrite=overwrite, what="client data files") as folder:
        paths = write_shards(experiment, folder)
    err.print(f"[green]{len(paths)} client files written to {escape(str(out))}[/green] "
              f"(SuperNode k: --node-config \"partition-id=k data-file={out}/client_k.jsonl\")")


@app.command("config")
def show_config(
    keys: Annotated[list[str] | None, typer.Argument(
        help="Show only these keys or tables, e.g. train aflora.beta (default: all)", show_default=False)] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Every key with its type and help, every method's options included (set or not)")] = False,
) -> None:
    """Print the resolved experiment configuration (after overrides) as TOML-like key = value lines."""
    from .config import describe_keys, flatten

    experiment = _load_config(config, set_, data_dir)
    if explain:
        rows = [(row.key, f"{row.key} = {row.value!r}  ({row.type})\n    {row.help}") for row in describe_keys(experiment)]
    else:
        rows = [(key, f"{key} = {value!r}") for key, value in flatten(experiment.to_dict()).items()]
    wanted = [key.strip().strip(".") for key in keys or []]
    unmatched = [key for key in wanted if not any(_under(row_key, key) for row_key, _ in rows)]
    if unmatched:
        hint = "" if explain else " (a method's options show with --explain even when the config does not set them)"
        raise ConfigError(f"no config key is or starts with {', '.join(map(repr, unmatched))}{hint}; "
                          "`aflora config --explain` lists every key")
    for key, line in rows:
        if not wanted or any(_under(key, prefix) for prefix in wanted):
            typer.echo(line)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


@app.command("list")
def list_choices() -> None:
    """The methods, datasets (with aliases and options) and partition schemes a config can name."""
    from .data.partition import PARTITION_SCHEMES
    from .data.readers.local_file import FILE_OPTIONS
    from .data.registry import registered_datasets
    from .methods import METHODS

    lines = ["methods (method = ..., options: `aflora config --explain <method>`):"]
    lines += [f"  {name:<12} {cls.summary}" for name, cls in sorted(METHODS.items())]
    lines += ["", "datasets (data.dataset = ..., data.test_dataset, data.extra_eval; options: data.options.<key>):"]
    for dataset in registered_datasets():
        lines.append(f"  {dataset.name:<12} {dataset.summary}")
        if dataset.aliases:
            lines.append(f"  {'':<12}   aliases: {', '.join(dataset.aliases)}")
        lines += [f"  {'':<12}   option {key}: {option.help}" for key, option in dataset.options.items()]
    lines.append(f"  {'<file>':<12} a local csv/tsv/jsonl/json/parquet file of text and labels")
    lines += [f"  {'':<12}   option {key}: {option.help}" for key, option in FILE_OPTIONS.items()]
    lines += ["", "partition schemes (data.partition = ...):"]
    lines += [f"  {name:<12} {summary}" for name, summary in PARTITION_SCHEMES.items()]
    typer.echo("\n".join(lines))


federation_app = typer.Typer(no_args_is_help=True, help=(
    "A real Flower federation on this machine: TLS SuperLink, one authenticated SuperNode per client, `flwr run` "
    "(docs/deployment.md)."))
app.add_typer(federation_app, name="federation")
StateOption = Annotated[Path, typer.Option(
    "--state", help="Folder for the federation's certificates, keys, data files, logs and FLWR_HOME")]
FEDERATION_STATE = Path("runs/federation")


def _federation_call(action, *args, **kwargs):
    """Run one deployment step; its errors end the command with their message, and SIGTERM stops what it started."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the `finally` that stops the processes
    configure_logging()
    try:
        return action(*args, **kwargs)
    except FederationError as error:
        err.print("[red]error:[/red]", escape(str(error)))
        sys.exit(1)


@federation_app.command("up")
def federation_up(
    config: ConfigOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    state: StateOption = FEDERATION_STATE,
) -> None:
    """Start a SuperLink and one SuperNode per client (federation.num_clients) and leave them running."""
    from . import deployment

    experiment = _load_config(config, set_, data_dir)
    _check_out(state, "--state")
    _preflight(experiment)
    federation = _federation_call(deployment.up, experiment, state)
    err.print("[green]federation up[/green]:", escape(
        f"SuperLink {federation.address}, {federation.partitions} SuperNodes. "
        f"Submit runs with `aflora federation run --state {state} --config ... --out ...`; "
        f"Flower's CLI: `FLWR_HOME={federation.layout.flwr_home} flwr supernode ls`; "
        f"stop with `aflora federation down --state {state}`"))


@federation_app.command("run")
def federation_run(
    config: ConfigOption = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output folder for results, plots and the adapter")] = Path("runs/federation-run"),
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    state: StateOption = FEDERATION_STATE,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run before stopping it")] = 4 * 3600.0,
    overwrite: Annotated[bool, typer.Option(help="Replace the results already in --out")] = False,
) -> None:
    """`flwr run` one experiment on the federation that is up in --state (else on a new one, stopped afterwards)."""
    from . import deployment

    experiment = _load_config(config, set_, data_dir)
    _check_out(out)
    _check_out(state, "--state")
    _preflight(experiment)
    _federation_call(deployment.run_once, experiment, out, state, timeout=timeout, overwrite=overwrite)
    err.print(f"[green]results, plots and adapter written to {escape(str(out))}[/green]")


@federation_app.command("down")
def federation_down(state: StateOption = FEDERATION_STATE) -> None:
    """Stop the federation's SuperNodes and SuperLink (certificates, keys and logs stay in --state)."""
    from . import deployment

    stopped = _federation_call(deployment.down, state)
    err.print(escape(f"stopped: {', '.join(stopped)}" if stopped else f"nothing was running in {state}"))


@federation_app.command("status")
def federation_status(state: StateOption = FEDERATION_STATE) -> None:
    """The federation's processes and its SuperNodes as the SuperLink sees them."""
    from . import deployment

    typer.echo(_federation_call(deployment.describe, state))


@federation_app.command("worker")
def federation_worker(
    socket: Annotated[Path, typer.Option("--socket", help="The socket named by client-worker in the SuperNode's node config")],
) -> None:
    """Serve one SuperNode's client work with the model loaded once (started by `up`; by hand beside a SuperNode of
    your own: add client-worker=\"<socket>\" to its --node-config)."""
    from .flower.client_worker import serve

    configure_logging()
    serve(socket)


def main(argv: list[str] | None = None) -> None:
    """The `aflora` command (`argv`: its arguments, default sys.argv[1:]); a user's error ends it with exit code 2
    and one message, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except (ConfigError, DataError, ModelError, OutputError, CheckpointError, FileNotFoundError) as error:
        err.print("[red]error:[/red]", escape(str(error)))
        sys.exit(2)
    except RoundAborted as error:
        err.print("[red]run stopped:[/red]", escape(str(error)) + ". The checkpoint of the last completed round is intact: "
                  "continue with `aflora run --resume <the --out folder>`.")
        sys.exit(3)
    except typer.Abort:
        sys.exit(130)
    except Exception as error:  # click's usage errors arrive here in non-standalone mode
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
