"""Experiment tracking: every round's numbers, as they happen, to TensorBoard, MLflow or Weights & Biases.

One hook, a `Tracker` (`log_round(round, metrics)`, `close()`), fed by the server after every round with
`round_metrics` (round 0 is the base model, `initial_metrics`); results.json stays the record of the run,
the trackers are views of it while it runs. `tracking.backends` chooses them:

- "tensorboard" (the default): event files in the run folder; `tensorboard --logdir runs/` shows every run
  under it (an `aflora compare` folder: one curve per method and seed).
- "mlflow": one MLflow run per aflora run, in the experiment `tracking.project`, at $MLFLOW_TRACKING_URI
  (MLflow's default: ./mlruns); the config as its parameters.
- "wandb": one W&B run in the project `tracking.project` ($WANDB_MODE=offline works without an account).

MLflow and W&B are imported only when chosen; a chosen backend that is not installed fails before the run
starts (preflight). The tag names below are the same in every backend.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .costs import client_cost_pct
from .results import RoundRecord

log = logging.getLogger(__name__)

# backend -> (the module it needs, how to install it)
BACKENDS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "mlflow": ("mlflow", "pip install mlflow"),
            "wandb": ("wandb", "pip install wandb")}
RUN_IDS_FILE = "tracking.json"  # in the run folder: the MLflow / W&B run ids, so that --resume continues the same runs


def unknown_backends(backends: list[str]) -> list[str]:
    """A `tracking.backends` value's unknown names, explained (config validation)."""
    return [f"tracking.backends has {name!r}; choose from {sorted(BACKENDS)} (or [] for none)" for name in backends if name not in BACKENDS]


def missing_backends(backends: list[str]) -> list[str]:
    """Chosen backends whose package is not installed, explained. Checked when a run starts (preflight), not when a
    config is read: a run logged to MLflow can still be exported or compared where MLflow is not installed."""
    return [f"tracking.backends has {name!r}, but its package {BACKENDS[name][0]!r} is not installed: {BACKENDS[name][1]}, "
            f"or leave {name!r} out of tracking.backends" for name in backends
            if name in BACKENDS and importlib.util.find_spec(BACKENDS[name][0]) is None]


# ---------------------------------------------------------------------------- what is logged
def round_metrics(record: RoundRecord, base_params: int) -> dict[str, float]:
    """One round's numbers under self-explaining tags (the same in every backend)."""
    ranks = list(record.ranks.values())
    train_losses = [v for v in record.train_loss.values() if math.isfinite(v)]
    metrics: dict[str, float] = {
        "global_model/loss": record.loss,  # the global model on the server's test rows
        "cost/client_cost_percent": client_cost_pct(record.trained_params.values(), base_params),  # mean over this round's clients
        "cost/uplink_bytes": sum(record.uplink_bytes.values()),  # all clients together, this round
        "ranks/mean": sum(ranks) / len(ranks) if ranks else 0.0,  # over clients, each its mean over modules
        **{f"ranks/client_{cid}": rank for cid, rank in record.ranks.items()},
        "clients/replied": len(record.clients),
        "clients/failed": len(record.failures),
        "time/round_seconds": record.round_seconds,
        "time/eval_seconds": record.eval_seconds,
    }
    if record.accuracy is not None:
        metrics["global_model/accuracy"] = record.accuracy
    if train_losses:
        metrics["clients/train_loss_mean"] = sum(train_losses) / len(train_losses)
    metrics.update({f"global_model/{name}": value for name, value in record.extra.items()})  # e.g. global_model/mmlu/accuracy
    metrics.update({f"personalized/{name}": value for name, value in record.personalized.items() if name in ("accuracy", "loss")})
    if record.aggregation_seconds is not None:
        metrics["time/aggregation_seconds"] = record.aggregation_seconds
    if record.server_seconds is not None:
        metrics["time/server_seconds"] = record.server_seconds  # the server's own step after aggregating, incl. the merge
    if record.aggregation_error is not None:
        metrics["server/aggregation_error"] = record.aggregation_error
    metrics.update({f"server/{name}": value for name, value in record.method_diagnostics.items()})
    if record.dp_epsilon is not None:
        metrics["privacy/epsilon"] = record.dp_epsilon
    if record.dp_noise_std is not None:
        metrics["privacy/noise_std"] = record.dp_noise_std
    return {tag: float(value) for tag, value in metrics.items()}


def initial_metrics(initial: Mapping[str, float]) -> dict[str, float]:
    """Round 0: the base model before any round, on the same tags."""
    return {f"global_model/{name}": float(value) for name, value in initial.items()
            if name in ("accuracy", "loss") or "/" in name}


# ---------------------------------------------------------------------------- the hook
class Tracker(Protocol):
    def log_round(self, round_: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class Trackers:
    """Every chosen backend behind the one hook."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_round(self, round_: int, metrics: Mapping[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_round(round_, metrics)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(backends: list[str], out_dir: Path, *, config: Mapping[str, Any], project: str,
                  first_round: int = 1) -> Trackers:
    """The chosen backends, writing for the run in `out_dir`; `first_round` > 1 continues a resumed run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_IDS_FILE
    run_ids: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    trackers: list[Tracker] = []
    for name in backends:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out_dir, config, first_round))
        elif name == "mlflow":
            mlflow_run = MLflowTracker(out_dir, config, project, run_ids.get(name))
            trackers.append(mlflow_run)
            run_ids[name] = mlflow_run.run_id
        elif name == "wandb":
            wandb_run = WandbTracker(out_dir, config, project, run_ids.get(name))
            trackers.append(wandb_run)
            run_ids[name] = wandb_run.run_id
    if run_ids:
        path.write_text(json.dumps(run_ids, indent=2))
    return Trackers(trackers)


class TensorBoardTracker:
    def __init__(self, out_dir: Path, config: Mapping[str, Any], first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run may repeat a round logged before the kill but not checkpointed: purge_step makes
        # TensorBoard drop every event of the earlier files from that round on.
        self.writer = SummaryWriter(log_dir=str(out_dir), purge_step=first_round if first_round > 1 else None)
        if first_round == 1:
            self.writer.add_text("config", "\n".join(f"    {key} = {value!r}" for key, value in config.items()))

    def log_round(self, round_: int, metrics: Mapping[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, round_)
        self.writer.flush()  # a killed run keeps every round it logged

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, out_dir: Path, config: Mapping[str, Any], project: str, run_id: str | None) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(project)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out_dir.name)  # a resumed run continues its MLflow run
        if run_id is None:
            mlflow.log_params({key: str(value)[:500] for key, value in config.items()})  # (older MLflow servers cap values at 500)
        self.run_id: str = run.info.run_id
        log.info("MLflow: run %s in experiment %r at %s", self.run_id, project, mlflow.get_tracking_uri())

    def log_round(self, round_: int, metrics: Mapping[str, float]) -> None:
        self.mlflow.log_metrics(dict(metrics), step=round_)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, out_dir: Path, config: Mapping[str, Any], project: str, run_id: str | None) -> None:
        import wandb

        self.run = wandb.init(project=project, name=out_dir.name, dir=str(out_dir), config=dict(config), id=run_id,
                              resume="allow")  # a resumed run continues its W&B run
        self.run_id: str = self.run.id

    def log_round(self, round_: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=round_)

    def close(self) -> None:
        self.run.finish()

