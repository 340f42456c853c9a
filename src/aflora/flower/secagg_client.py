"""SecAgg+ on the client: Flower's `secaggplus_mod` around the train handler (the server side and why the
bridge looks as it does: aflora.flower.secagg). Only flwr is imported, so a ClientApp process stays light."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS


def secure_aggregation_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ messages; plain train messages pass straight through (the mod
    itself would refuse them), so one ClientApp serves runs with and without secure aggregation."""
    if is_secure_round(message.content):
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def is_secure_round(content: RecordDict) -> bool:
    """Whether a train message comes from the SecAgg+ workflow (its reply must then be a FitRes for the mod)."""
    return RECORD_KEY_CONFIGS in content.config_records
