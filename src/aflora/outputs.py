"""Everything a finished run leaves in --out: results.json, rounds.csv, plots, the PEFT adapter, a table."""

from __future__ import annotations

import logging
from pathlib import Path

from peft import PeftModel
from rich.console import Console
from rich.table import Table

from .config import config_from_tree
from .lora.export import save_peft_adapter
from .models import load_model
from .plots import plot_run
from .results import RunRecord, load_run
from .run_folder import written_aside
from .runtime.server import ServerRuntime

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def write_outputs(out_dir: Path, record: RunRecord, runtime: ServerRuntime) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_run(record.to_json(), out_dir)
    adapter = runtime.merges.exported_adapter(runtime.method.global_adapter())
    if adapter:
        host = runtime.side.host
        save_peft_adapter(
            adapter,
            out_dir / ADAPTER_DIR,
            base_model=runtime.config.model.name,
            conv1d_modules={name for name in adapter if host.is_conv1d(name)},
        )
    record.write(out_dir)  # last: a folder with results.json holds a finished run (compare reuses it)
    print_summary(record)


def export_merged_model(run_dir: Path, out_dir: Path, *, overwrite: bool = False) -> None:
    """Load a run's base model, apply its PEFT adapter with stock PEFT, merge and save (safetensors) into a new or
    empty `out_dir` (with `overwrite`, replace what it holds once the model is written)."""
    run = load_run(run_dir)
    adapter_dir = Path(run_dir) / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no PEFT adapter; was the run finished?")
    config = config_from_tree(run["config"])
    with written_aside(Path(out_dir), overwrite=overwrite, what="the merged model", source=Path(run_dir)) as folder:
        model, tokenizer = load_model(config.model.name, cache_dir=config.model.cache_dir or None, seed=config.seed,
                                      random_init=config.model.random_init)
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def print_summary(record: RunRecord, console: Console | None = None) -> None:
    console = console or Console(stderr=True, width=max(Console(stderr=True).width, 110))
    metric = "accuracy" if record.initial.get("accuracy") is not None else "loss"
    table = Table(title=f"{record.method} on {record.dataset} ({record.model}, {record.num_clients} clients, seed {record.seed})")
    table.add_column("round", justify="right")
    table.add_column(metric, justify="right")
    table.add_column("ranks per client (mean over modules)")
    table.add_column("client cost %", justify="right")
    table.add_column("uplink MiB", justify="right")
    table.add_column("round s", justify="right")
    table.add_row("0", _fmt(record.initial.get(metric)), "base model", "", "", "")
    for r in record.rounds:
        cost = 100.0 * sum(r.trained_params.values()) / max(len(r.trained_params), 1) / record.base_params
        ranks = " ".join(f"{v:.0f}" for v in r.ranks.values())
        table.add_row(str(r.round), _fmt(getattr(r, metric)), ranks, f"{cost:.4f}",
                      f"{sum(r.uplink_bytes.values()) / 2**20:.2f}", f"{r.round_seconds:.1f}")
    console.print(table)
    final = record.final
    interval = final.get("accuracy_ci95") if metric == "accuracy" else None
    scored = (f" (95 % interval {interval[0]:.4f}–{interval[1]:.4f})" if interval else "") + \
        (f" on {final['eval_rows']} test rows" if final.get("eval_rows") else "")
    console.print(
        f"final {metric} {_fmt(final.get(metric))}{scored} | client cost {final['client_cost_pct']:.4f}% of "
        f"{record.base_params:,} parameters | uplink {final['uplink_bytes_total'] / 2**20:.2f} MiB | "
        f"final ranks {[round(v, 1) for v in final['ranks'].values()]} | {final['wall_seconds']:.0f} s"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
