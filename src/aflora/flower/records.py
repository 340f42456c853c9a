"""Method records <-> Flower RecordDicts. The only place that knows how messages are laid out."""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..base_sync import BaseSync
from ..lora.factors import Adapter, adapter_from_tensors, adapter_tensors
from ..methods import Instruction, Upload


def tensors_to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def arrays_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Copies in torch's own memory (64-byte aligned). The arrays Flower hands over are numpy's, 16-byte aligned at
    addresses that change from run to run, and MKL promises run-to-run equal results only on aligned arrays."""
    return {key: tensor.clone() for key, tensor in record.to_torch_state_dict().items()}


def merges_to_arrays(merges: dict[int, Adapter]) -> ArrayRecord:
    """Base-model merges keyed 'round/factor/module' (AFLoRA's B_global·A', FLoRA's stacked update)."""
    return tensors_to_arrays({f"{round_}/{key}": tensor for round_, adapter in merges.items()
                              for key, tensor in adapter_tensors(adapter).items()})


def arrays_to_merges(record: ArrayRecord) -> dict[int, Adapter]:
    by_round: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in arrays_to_tensors(record).items():
        round_, factor_key = key.split("/", 1)
        by_round.setdefault(int(round_), {})[factor_key] = tensor
    return {round_: adapter_from_tensors(tensors) for round_, tensors in by_round.items()}


def instruction_content(instruction: Instruction, sync: BaseSync, experiment: dict[str, Any]) -> RecordDict:
    return RecordDict({
        "instruction": tensors_to_arrays(instruction.tensors),
        "merges": merges_to_arrays(sync.merges),
        "meta": ConfigRecord({
            "client_id": instruction.client_id,
            "round": instruction.round,
            "config": json.dumps(instruction.config),
            "merged_rounds": json.dumps(sync.merged_rounds),
            "merge_store": sync.store,
            "experiment": json.dumps(experiment, sort_keys=True),
        }),
    })


def read_instruction(content: RecordDict) -> tuple[Instruction, BaseSync, str]:
    meta = content.config_records["meta"]
    instruction = Instruction(
        client_id=int(meta["client_id"]),
        round=int(meta["round"]),
        tensors=arrays_to_tensors(content.array_records["instruction"]),
        config=json.loads(str(meta["config"])),
    )
    sync = BaseSync(arrays_to_merges(content.array_records["merges"]), json.loads(str(meta["merged_rounds"])), str(meta["merge_store"]))
    return instruction, sync, str(meta["experiment"])


def upload_content(upload: Upload) -> RecordDict:
    return RecordDict({
        "upload": tensors_to_arrays(upload.tensors),
        "meta": ConfigRecord({
            "client_id": upload.client_id,
            "num_examples": upload.num_examples,
            "trained_params": upload.trained_params,
            "ranks": json.dumps(upload.ranks),
        }),
        "metrics": MetricRecord({k: float(v) for k, v in upload.metrics.items()}),
    })


def read_upload(content: RecordDict) -> Upload:
    meta = content.config_records["meta"]
    return Upload(
        client_id=int(meta["client_id"]),
        num_examples=int(meta["num_examples"]),
        tensors=arrays_to_tensors(content.array_records["upload"]),
        ranks={k: int(v) for k, v in json.loads(str(meta["ranks"])).items()},
        trained_params=int(meta["trained_params"]),
        metrics=dict(content.metric_records["metrics"]),
    )


# ---------------------------------------------------------------------------- SecAgg+ replies
def secure_upload_content(clear: Upload, summands: list[torch.Tensor]) -> RecordDict:
    """A train reply for SecAgg+'s client mod, which reads it as a legacy FitRes (aflora.flower.secagg):

    - parameters: the summands p_k·pad(B'_k) in module order; the mod quantizes and masks them, then
      empties every ArrayRecord of the reply, so nothing else may travel as arrays;
    - num_examples 1: the mod multiplies by num_examples / max_weight (max_weight is 1), while the real
      weights are already folded in, per module;
    - metrics: the clear part of the upload (ids, sizes, ranks, metrics, next_mask as safetensors bytes)."""
    fields = {
        "client_id": clear.client_id,
        "num_examples": clear.num_examples,
        "trained_params": clear.trained_params,
        "ranks": json.dumps(clear.ranks),
        "metrics": json.dumps(clear.metrics),
        "tensors": save_tensors({k: v.detach().cpu().contiguous() for k, v in clear.tensors.items()}),
    }
    parameters = ndarrays_to_parameters([t.detach().cpu().numpy() for t in summands])
    return fitres_to_recorddict(FitRes(Status(Code.OK, ""), parameters, num_examples=1, metrics=fields), keep_input=False)


def read_secure_upload(fields: dict[str, Any]) -> Upload:
    """The clear part of a SecAgg+ reply, as the SecAgg+ workflow hands it over (FitRes.metrics)."""
    return Upload(
        client_id=int(fields["client_id"]),
        num_examples=int(fields["num_examples"]),
        tensors=dict(load_tensors(bytes(fields["tensors"]))),
        ranks={k: int(v) for k, v in json.loads(str(fields["ranks"])).items()},
        trained_params=int(fields["trained_params"]),
        metrics={k: float(v) for k, v in json.loads(str(fields["metrics"])).items()},
    )
