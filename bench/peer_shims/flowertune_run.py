"""Run Flower's LLM fine-tuning example (adap/flower, examples/flowertune-llm) unchanged, on this CPU, on given data.

Started by bench/peers.py with the example's own virtual environment's python:

    python flowertune_run.py --app PATH --data FOLDER --timings FILE --set key=value ...

`--app` is a local copy of examples/flowertune-llm; `--set` are the example's own run-config keys (as in
`flwr run . --run-config "k=v"`), applied over its pyproject.toml. Nothing of the example's code is copied or edited.
Its ServerApp runs as it is; its ClientApp's train function is called from a one-line ClientApp of this module, so
that every Ray worker imports this module, and with it these run-time adaptations:

1. No 4-bit quantisation: `BitsAndBytesConfig(load_in_4bit=True)` needs bitsandbytes' CUDA kernels, so the example's
   `get_model` receives no quantisation config and loads the plain model (its dtype, bf16, as it asks; PEFT's
   `prepare_model_for_kbit_training`, which the example calls, then casts it to float32 as it does for any model).
2. The clients' data: `FederatedDataset` (the Hugging Face hub, IID partitions of alpaca-gpt4) is replaced by the
   exported files FOLDER/<num partitions>/local_training_<partition id>.json, the same rows every method gets; the
   example's `load_data` still reads them and renames `output` to `response` itself.
3. Timers: the strategy calls the example's evaluate function after every round (it only saves the model), which
   marks the rounds' ends; each client's model load, training and the bytes of the PEFT state dict it sends back go
   to --timings (JSON lines, one per event, from whichever process).

The run goes through Flower's simulation runtime in this process (`flwr.simulation.run_simulation._run_simulation`,
what `flwr run` ends in, given the run config that `flwr run --run-config` would give).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

APP_DIR = os.environ["FLOWERTUNE_APP"]
DATA_DIR = os.environ["FLOWERTUNE_DATA"]
TIMINGS = os.environ["FLOWERTUNE_TIMINGS"]
sys.path.insert(0, APP_DIR)

import datasets  # noqa: E402
import flowertune_llm.client_app as their_client  # noqa: E402
import flowertune_llm.dataset as their_dataset  # noqa: E402
import flowertune_llm.models as their_models  # noqa: E402


def note(event: str, **fields) -> None:
    with open(TIMINGS, "a") as f:
        f.write(json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **fields}) + "\n")


their_models.BitsAndBytesConfig = lambda **_: None  # (1)


class ExportedPartitions:  # (2)
    def __init__(self, dataset: str, partitioners: dict) -> None:
        self.num_partitions = partitioners["train"].num_partitions

    def load_partition(self, partition_id: int, split: str) -> datasets.Dataset:
        path = os.path.join(DATA_DIR, str(self.num_partitions), f"local_training_{partition_id}.json")
        with open(path) as f:
            return datasets.Dataset.from_list(json.load(f))


their_dataset.FederatedDataset = ExportedPartitions
_get_model, _state_dict, _trainer = their_client.get_model, their_client.get_peft_model_state_dict, their_client.SFTTrainer


def timed_get_model(cfg):  # (3)
    started = time.time()
    model = _get_model(cfg)
    note("client_model_loaded", seconds=time.time() - started)
    return model


def counted_state_dict(model, *a, **kw):
    state = _state_dict(model, *a, **kw)
    note("client_upload", bytes=sum(t.numel() * t.element_size() for t in state.values()))
    return state


class TimedTrainer(_trainer):
    def train(self, *a, **kw):
        started = time.time()
        result = super().train(*a, **kw)
        note("client_trained", seconds=time.time() - started, steps=int(result.global_step))
        return result


their_client.get_model, their_client.get_peft_model_state_dict, their_client.SFTTrainer = (
    timed_get_model, counted_state_dict, TimedTrainer)

app = ClientApp()


@app.train()
def train(msg, context: Context):
    return their_client.train(msg, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--set", action="append", default=[], help="run-config key=value (the example's keys)")
    args = parser.parse_args()

    from pathlib import Path

    import flowertune_llm.server_app as their_server
    from flwr.common.config import get_fused_config_from_dir, parse_config_args
    from flwr.simulation.run_simulation import NOOP_FEDERATION_ID, SUPERLINK_NODE_ID, _run_simulation
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    get_evaluate_fn = their_server.get_evaluate_fn

    def timed_get_evaluate_fn(*a, **kw):
        evaluate = get_evaluate_fn(*a, **kw)

        def timed_evaluate(server_round, arrays):
            note("round_end", round=server_round)  # called after each round's aggregation (round 0: before any)
            result = evaluate(server_round, arrays)
            note("saved", round=server_round)
            return result

        return timed_evaluate

    their_server.get_evaluate_fn = timed_get_evaluate_fn
    overrides = parse_config_args([" ".join(args.set)]) if args.set else {}
    run = Run.create_empty(run_id=1)  # as run_simulation() makes one, plus the run config `flwr run` would pass
    run.primary_task_id, run.federation_id, run.override_config = 1, NOOP_FEDERATION_ID, overrides
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    run_config = get_fused_config_from_dir(Path(APP_DIR), overrides)
    if run_config["model.gradient-checkpointing"] or run_config["train.training-arguments.gradient-checkpointing"]:
        raise SystemExit("flowertune: set model.gradient-checkpointing=false and train.training-arguments.gradient-checkpointing="
                         "false: without 4-bit loading the inputs never require grad, and every client would fail")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    cores = os.cpu_count() or 1
    note("start")
    _run_simulation(num_supernodes=args.clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE, client_app=app,
                    server_app=their_server.app, backend_config={
                        "client_resources": {"num_cpus": cores, "num_gpus": 0.0},
                        "init_args": {"num_cpus": cores, "num_gpus": 0, "include_dashboard": False, "logging_level": "ERROR"}},
                    server_app_context=context, app_dir=APP_DIR, run=run, is_app=True)
    note("finished")


if __name__ == "__main__":
    main()
