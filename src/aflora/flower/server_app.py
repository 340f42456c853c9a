"""Flower ServerApp: build the server runtime from the run config, run aflora.rounds' loop with the Flower
transport (messages through the Grid), track and checkpoint every round, write the outputs.
`flwr run .` enters through `app`; `aflora run` through `run_federation`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..base_sync import MergeStore
from ..checkpoint import load_checkpoint, restore, save_checkpoint
from ..config import ExperimentConfig, config_from_flat, flatten
from ..logs import configure_logging
from ..outputs import write_outputs
from ..results import RunRecord
from ..rounds import run_rounds
from ..runtime.server import ServerRuntime
from ..runtime.workload import Workload, preflight
from ..tracking import initial_metrics, open_trackers, round_metrics
from .transport import FlowerTransport

log = logging.getLogger(__name__)


def run_federation(grid: Grid, config: ExperimentConfig, out_dir: Path, workload: Workload | None = None,
                   *, resume: bool = False, checkpoint_file: str | None = None, shared_disk: bool = False,
                   max_in_flight: int | None = None) -> RunRecord:
    """All rounds of one experiment (or the rounds left after the checkpoint in out_dir, with resume: the latest,
    or `checkpoint_file`, a file name in out_dir/checkpoint).

    With `shared_disk` (simulation: clients on this machine), every round's global update is also kept
    in out_dir/merges, where any worker process can catch up from. `max_in_flight` overrides
    engine.max_in_flight (the simulation knows its number of workers)."""
    started = time.perf_counter()
    runtime = ServerRuntime(config, workload or preflight(config))
    if shared_disk:
        runtime.merge_store = MergeStore(Path(out_dir).resolve() / "merges")
    workload = runtime.workload
    log.info(
        "%s on %s (%s): %d clients with %s rows, public set %d rows, %d test rows",
        config.method, workload.bundle.name, workload.bundle.source, config.federation.num_clients,
        [len(rows) for rows in workload.client_rows], len(workload.public_rows), len(workload.test_rows),
    )
    record = RunRecord(
        method=config.method,
        model=config.model.name,
        dataset=workload.bundle.name,
        num_clients=config.federation.num_clients,
        seed=config.seed,
        config=config.to_dict(),
        base_params=runtime.side.host.base_param_count,
    )
    done = 0
    if resume:
        state, saved = load_checkpoint(out_dir, checkpoint_file)
        done = restore(runtime, state)
        if runtime.merge_store is not None:  # a fresh store for fresh workers
            for round_, update in runtime.merges.by_round.items():
                runtime.merge_store.save(round_, update)
        record = RunRecord.from_json(saved)
        started -= record.final.get("wall_seconds_so_far", 0.0)
        log.info("resuming %s after round %d of %d", out_dir, done, config.rounds)

    def round_done(round_: int) -> None:
        # Tracked before the checkpoint: a kill in between repeats the round on resume, which TensorBoard then shows
        # once (purge_step); the other order would lose the round from the trackers.
        if round_ == 1:
            trackers.log_round(0, initial_metrics(record.initial))
        trackers.log_round(round_, round_metrics(record.rounds[-1], record.base_params))
        record.final["wall_seconds_so_far"] = time.perf_counter() - started
        save_checkpoint(out_dir, round_, runtime, record)

    log.info("method %s, %d clients, ranks %s", config.method, config.federation.num_clients, config.federation.client_ranks)
    transport = FlowerTransport(grid, config, max_in_flight=config.engine.max_in_flight if max_in_flight is None else max_in_flight)
    transport.connect()
    trackers = open_trackers(config.tracking.backends, out_dir, config=flatten(config.to_dict()), project=config.tracking.project,
                             first_round=done + 1)
    try:
        run_rounds(runtime, transport, record, done + 1, config.rounds, on_round_end=round_done)
    finally:
        trackers.close()
    record.finish(wall_seconds=time.perf_counter() - started, final_ranks=runtime.method.client_ranks(),
                  precision=runtime.side.precision)
    write_outputs(out_dir, record, runtime)
    return record


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: [tool.flwr.app.config] (+ --run-config) is the experiment."""
    flat = dict(context.run_config)
    # The ServerApp process does not run in the caller's folder: default to a fixed place and say where.
    out_dir = Path(str(flat.pop("out-dir", "") or Path.home() / "aflora-runs" / f"flwr-{context.run_id}")).expanduser().resolve()
    config = config_from_flat(flat)
    configure_logging(config.engine.verbose)
    run_federation(grid, config, out_dir)
    log.info("results written to %s", out_dir)
