"""Command line: `aflora run`, `aflora compare`, `aflora export`, `aflora config`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .config import ConfigError, load_config
from .data import DataError
from .logs import configure_logging
from .models import ModelError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Federated LoRA fine-tuning of LLMs on heterogeneous clients.")
err = Console(stderr=True, soft_wrap=True)  # never break an error message mid-sentence

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="Experiment TOML file (see configs/)")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config value: key=value, repeatable")]
DataDirOption = Annotated[Optional[Path], typer.Option("--data-dir", help="Local datasets folder (same as data.data_dir / $AFLORA_DATA_DIR)")]


def _overrides(sets: list[str] | None, data_dir: Path | None) -> list[str]:
    overrides = list(sets or [])
    if data_dir is not None:
        overrides.append(f'data.data_dir="{data_dir}"')
    return overrides


@app.command()
def run(
    config: ConfigOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for results, plots and the adapter")] = Path("runs/latest"),
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the results already in --out")] = False,
) -> None:
    """Run one federated experiment on Flower's simulation engine."""
    experiment = load_config(config, _overrides(set_, data_dir))
    if (out / "results.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a finished run (results.json); choose another --out or pass --overwrite")
    configure_logging(experiment.engine.verbose)
    from .flower.simulation import simulate  # Flower and Ray load only when a run starts

    simulate(experiment, out)
    err.print(f"[green]results, plots and adapter written to {out}[/green]")


@app.command()
def compare(
    methods: Annotated[str, typer.Option(
        "--methods", "-m",
        help="Comma-separated entries: a method, or method:key=value[+key=value...] for an ablation of its options, "
             "e.g. aflora,fedit,aflora:ddr=false+rank_aware_weights=false")],
    config: ConfigOption = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds; every entry runs with each")] = "0",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: <label>/seed<k>/ per run, comparison.md/.csv, plots")] = Path("runs/compare"),
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    overwrite: Annotated[bool, typer.Option(help="Run again the runs whose results.json is already in --out (default: reuse them)")] = False,
) -> None:
    """Run several methods (and ablations) × seeds on one identical experiment; write a comparison table and plots."""
    from .compare import markdown_table, parse_entries, parse_seeds, plan_comparison, run_comparison

    configure_logging()
    plan = plan_comparison(config, _overrides(set_, data_dir), parse_entries(methods), parse_seeds(seeds), out, overwrite=overwrite)
    configure_logging(plan.base.engine.verbose)
    rows = run_comparison(plan, command=shlex.join(["aflora", *sys.argv[1:]]))
    typer.echo("\n".join(markdown_table(rows)))
    err.print(f"[green]table, plots and {len(plan.runs)} runs written to {out} (comparison.md, comparison.csv)[/green]")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Option("--run", help="--out folder of a finished run")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged model (safetensors)")],
) -> None:
    """Merge a run's global adapter into its base model and save a standalone model."""
    from .outputs import export_merged_model

    configure_logging()
    export_merged_model(run_dir, out)
    err.print(f"[green]merged model written to {out}[/green]")


@app.command()
def partition(
    config: ConfigOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for client_<k>.jsonl, task.json, manifest.json")] = Path("shards"),
    set_: SetOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Write each client's rows to its own file, for SuperNodes that must see only their own data."""
    from .shards import write_shards

    paths = write_shards(load_config(config, _overrides(set_, data_dir)), out)
    err.print(f"[green]{len(paths)} client files written to {out}[/green] (SuperNode k: --node-config \"partition-id=k data-file={out}/client_k.jsonl\")")


@app.command("config")
def show_config(config: ConfigOption = None, set_: SetOption = None, data_dir: DataDirOption = None) -> None:
    """Print the resolved experiment configuration (after overrides) as TOML-like key = value lines."""
    from .config import flatten

    for key, value in flatten(load_config(config, _overrides(set_, data_dir)).to_dict()).items():
        typer.echo(f"{key} = {value!r}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except (ConfigError, DataError, ModelError, FileNotFoundError) as error:
        err.print(f"[red]error:[/red] {error}")
        sys.exit(2)
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
