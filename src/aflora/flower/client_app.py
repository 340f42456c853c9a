"""Flower ClientApp: hand the server's message to the client's work, return the reply.

This module imports only Flower: a SuperNode starts a process for every message, and answering "which
client are you" must not wait for torch. Train and evaluate messages go to aflora.flower.client_work, in
this process or, when the node config names a `client-worker` socket, in the node's long-lived client
worker (aflora.flower.client_worker), which keeps the model loaded for the run. In simulation every
ClientApp in a worker process shares that process's runtime (one base model).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .secagg_client import secure_aggregation_mod

app = ClientApp()

LOCAL_STATE = "aflora.local_state"  # what a client keeps between rounds, in Flower's per-node Context


def client_id_of(node_config: dict) -> int:
    try:
        return int(node_config["partition-id"])
    except KeyError:
        raise RuntimeError(
            "this SuperNode has no partition-id; start it with --node-config \"partition-id=<k> num-partitions=<K>\""
        ) from None


@app.query("identify")
def identify(message: Message, context: Context) -> Message:
    content = RecordDict({"identity": ConfigRecord({"client_id": client_id_of(context.node_config)})})
    return Message(content=content, reply_to=message)


def _work(kind: str, message: Message, context: Context):
    """client_work's answer for this message: from the node's client worker if it has one, else computed here."""
    kept = context.state.array_records.get(LOCAL_STATE)
    arguments = (message.content, kept, dict(context.node_config), context.run_id)
    if worker := context.node_config.get("client-worker"):
        from .client_worker import ask

        return ask(Path(str(worker)), kind, *arguments)
    from . import client_work

    return getattr(client_work, kind)(*arguments)


@app.train(mods=[secure_aggregation_mod])
def train(message: Message, context: Context) -> Message:
    # What the client keeps between rounds lives in the Context, not in a process: in simulation the next
    # round may run in another worker, in deployment in another ClientApp process.
    content, keep = _work("train", message, context)
    if keep is not None:
        context.state[LOCAL_STATE] = keep
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Personalized evaluation: the client's own model on its local test rows."""
    return Message(content=_work("evaluate", message, context), reply_to=message)

