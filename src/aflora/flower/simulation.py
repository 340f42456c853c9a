"""`aflora run`: the same ServerApp/ClientApp on Flower's simulation engine, in this process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from ..config import ExperimentConfig
from ..logs import quiet_flower
from ..results import RunRecord
from ..runtime.workload import Workload, preflight
from .client_app import app as client_app
from .server_app import run_federation

log = logging.getLogger(__name__)


def simulate(config: ExperimentConfig, out_dir: Path, workload: Workload | None = None, *, resume: bool = False,
             checkpoint_file: str | None = None) -> RunRecord:
    """Run the experiment with one virtual SuperNode per client; returns the run's record. With `resume`, continue
    the run in out_dir from its latest checkpoint (or `checkpoint_file`, a file name in out_dir/checkpoint).

    Model spec, data and partitions are checked first (`preflight`), so bad input fails before Ray starts.
    """
    workload = workload or preflight(config)
    quiet_flower(config.engine.verbose)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning; CPU runs
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # one line per client, not "repeated 9x"
    finished: list[RunRecord] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # With all of a round's train messages out at once, the server would hold every client's instruction
        # and reply (several copies each) while the workers take them one by one: memory grew with clients.
        in_flight = config.engine.max_in_flight or 2 * simulated_workers(config)
        finished.append(run_federation(grid, config, out_dir, workload, resume=resume, checkpoint_file=checkpoint_file,
                                       shared_disk=True, max_in_flight=in_flight))

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=config.federation.num_clients,
        backend_config=backend_config(config),
        verbose_logging=config.engine.verbose,
    )
    if not finished:
        raise RuntimeError("the simulation ended before the server finished; see the log above for the client error")
    return finished[0]


def simulated_workers(config: ExperimentConfig) -> int:
    """Clients trained in parallel: cores / client_cpus, and with GPUs at most GPUs / client_gpus."""
    cores = os.cpu_count() or 1
    workers = max(1, cores // min(config.engine.client_cpus, cores))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return min(workers, max(1, int(gpus / config.engine.client_gpus))) if gpus else workers


def backend_config(config: ExperimentConfig) -> dict:
    """Ray workers: cores / client_cpus of them (and GPUs / client_gpus with GPUs), each with one shared base model."""
    cores = os.cpu_count() or 1
    client_cpus = min(config.engine.client_cpus, cores)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": config.engine.client_gpus if gpus else 0.0},
        "init_args": {"num_cpus": cores, "num_gpus": gpus, "include_dashboard": False,
                      "logging_level": "DEBUG" if config.engine.verbose else "ERROR"},
    }
