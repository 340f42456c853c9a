"""The protocol every federated method follows, and the plain records it exchanges.

A round, in the order the data flows:

    server  instruct(client, round_)     -> Instruction   (tensors + scalars for one client)
    client  local_job(instruction)       -> TrainSpec     (adapter to install, what trains, penalty)
    client  (generic local training loop trains the adapter on local data)
    client  upload(instruction, trained) -> Upload
    server  aggregate(uploads, round_)
    server  server_update(trainer)       (e.g. AFLoRA tunes A on public data; default: nothing)
    server  round_merge()                -> Adapter merged into every base model, or None
    server  global_adapter()             -> Adapter evaluated on top of the base, or None

Methods see tensors and records only — never Flower, never a model — so their math is tested alone.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..budgets import LocalWorkload, ModelFootprint
from ..lora.factors import FACTORS, Adapter, adapter_from_tensors, adapter_tensors, tensor_key
from ..values import coerce

Scalar = bool | int | float | str


@dataclass(frozen=True)
class ClientSpec:
    """What the server knows about a client before training: its budget and its data size."""

    client_id: int
    max_rank: int  # the largest rank its resources allow (AFLoRA's r_k^1)
    num_examples: int  # |D_k|
    memory_mb: float | None = None  # device budgets, when given (aflora.budgets derives max_rank from them)
    uplink_mb: float | None = None
    compute_speed: float = 1.0  # relative to the slowest device class (LEGEND's capacity model)


@dataclass
class Instruction:
    """The server's message to one client for one round."""

    client_id: int
    round: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Scalar] = field(default_factory=dict)


# A penalty receives the live factor parameters {module: {factor name: Parameter}} and returns a scalar loss
# (factor names: aflora.lora.factors.FACTORS).
Penalty = Callable[[Mapping[str, Mapping[str, torch.nn.Parameter]]], torch.Tensor]


@dataclass
class TrainSpec:
    """A local training job: install `adapter`, train the factors named in `trainable`."""

    adapter: Adapter
    trainable: frozenset[str]
    scaling: float = 1.0  # LoRA's alpha/r for methods that use it; the host keeps factors scale-free
    penalty: Penalty | None = None
    # Factors whose Adam step is normalised by one second moment per module's tensor instead of per entry
    # (aflora.training.TensorwiseAdam): their entries keep the gradients' relative sizes (AFLoRA's Λ, which DDR reads).
    tensorwise: frozenset[str] = frozenset()
    # Learning-rate multiplier per module (default 1): AFLoRA's server step sizes A's steps to its row norm.
    lr_scale: Mapping[str, float] = field(default_factory=dict)

    def trained_params(self) -> int:
        """How many parameters the client fine-tunes (the paper's client-side computation cost)."""
        total = 0
        for factors in self.adapter.values():
            for name in self.trainable:
                tensor = getattr(factors, name)
                total += 0 if tensor is None else tensor.numel()
        return total


@dataclass
class Upload:
    """A client's reply: the tensors it uploads, its data size and the rank it trained per module."""

    client_id: int
    num_examples: int
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]  # module -> rank trained this round
    trained_params: int = 0  # filled in by the client runtime from the TrainSpec
    metrics: dict[str, float] = field(default_factory=dict)
    # Tensors the client keeps for its next round and never sends (FedSA-LoRA's personal B).
    local_state: dict[str, torch.Tensor] = field(default_factory=dict)


# The server-side trainer a method may call (AFLoRA's A tuning): trains a spec on the public set.
ServerTrainer = Callable[[TrainSpec], Adapter]


class FederatedMethod(ABC):
    """One federated LoRA method. Server-side state lives on the instance; client-side calls are pure."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line: the paper and what sets the method apart (`aflora list` shows it)
    options_class: ClassVar[type]
    # Which factors a client trains and uploads: drives budget-derived ranks (aflora.budgets) before any model is
    # loaded, at the parameter counts aflora.lora.factors.FACTORS gives each factor.
    trained_factors: ClassVar[frozenset[str]]
    uploaded_factors: ClassVar[frozenset[str]]
    heterogeneous: ClassVar[bool] = True  # False: one rank for every client (the smallest budget, or options.rank)
    # True: the method turns device budgets into its own per-client configuration (LEGEND's depth and
    # ranks) instead of the generic largest-rank-that-fits (aflora.budgets).
    configures_from_budgets: ClassVar[bool] = False
    # Whether the aggregate equals Σ_k p_k B_k A_k (up to float rounding): True (exact), False (an approximation,
    # e.g. FedIT's product of averages), None (no single global product, e.g. FedSA-LoRA's personal B). Every
    # method declares it; tests check it against the measured `aggregation_error`.
    exact_aggregation: ClassVar[bool | None]
    # True: client-level DP applies (aflora.privacy): uploads are the client's whole update, the aggregate is
    # a weighted sum that can take uniform weights (`use_uniform_weights`) and Gaussian noise (`add_aggregate_noise`).
    supports_dp: ClassVar[bool] = False
    # True: SecAgg+ applies (aflora.secure_aggregation): the method implements secure_weights, secure_summands
    # and aggregate_secure (a test checks the flag and the hooks agree).
    supports_secure_aggregation: ClassVar[bool] = False
    # The kinds of instruction tensor (the key's part before "/", e.g. "mask") whose values expected_upload and
    # check_upload read; of every other tensor the server keeps only shape and dtype until the reply (`receipt`).
    checked_kinds: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        options: Any,
        *,
        module_shapes: Mapping[str, tuple[int, int]],
        clients: list[ClientSpec],
        seed: int,
        footprint: ModelFootprint | None = None,
        workload: LocalWorkload | None = None,
    ):
        self.options = options
        self.module_shapes = dict(module_shapes)  # module -> (out_features, in_features)
        self.clients = {c.client_id: c for c in clients}
        self.seed = seed
        self.footprint = footprint  # the model's size facts, for methods with a cost model (None in math tests)
        self.workload = workload
        self._uniform_weights = False

    def use_uniform_weights(self) -> None:
        """Client-level DP (aflora.privacy): aggregate with weights 1/m over the m accepted clients from now on.

        Data-dependent weights (|D_k|, log(1+r_k)) would leak through the weights and break the sensitivity bound."""
        if not self.supports_dp:
            raise NotImplementedError(f"{self.name} does not support client-level DP (supports_dp is False); "
                                      "run it without privacy.clip_norm")
        self._uniform_weights = True

    @property
    def uniform_weights(self) -> bool:
        """Whether `use_uniform_weights` was called (the server runs with client-level DP)."""
        return self._uniform_weights

    @property
    def r_max(self) -> int:
        """The largest client rank (r_max): the width of zero-padded global factors (AFLoRA's A, HETLoRA's A and B)."""
        return max(c.max_rank for c in self.clients.values())

    @classmethod
    def needs_public_data(cls, options: Any) -> bool:
        """Whether the server trains on a public set (checked before a run starts)."""
        return False

    # ---- server side
    @abstractmethod
    def init_server_state(self) -> None:
        """Create the global state (called once, on the server only)."""

    @abstractmethod
    def instruct(self, client_id: int, round_: int) -> Instruction: ...

    @abstractmethod
    def aggregate(self, uploads: list[Upload], round_: int) -> None: ...

    def add_aggregate_noise(self, std: float, generator: torch.Generator) -> None:
        """DP: add N(0, std²) to every entry of what `aggregate` just produced (methods with supports_dp)."""
        raise NotImplementedError(f"{self.name} does not support client-level DP (supports_dp is False); "
                                  "run it without privacy.clip_norm")

    # ---- SecAgg+ (aflora.secure_aggregation; methods with supports_secure_aggregation implement all three)
    def secure_weights(self, client_ids: list[int]) -> dict[int, dict[str, float]]:
        """Server, before training: each asked client's weight p_k per module, sent to it in the clear."""
        raise self._no_secure_aggregation("secure_weights")

    def secure_summands(self, instruction: Instruction, upload: Upload, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Client, after training: its weighted contribution per module, equal-shaped across clients (SecAgg+ sums them)."""
        raise self._no_secure_aggregation("secure_summands")

    def aggregate_secure(self, sums: Mapping[str, torch.Tensor], uploads: list[Upload],
                         weights: Mapping[int, Mapping[str, float]], round_: int) -> None:
        """Server: `aggregate`'s work from SecAgg+'s sum of the summands and the uploads' clear parts."""
        raise self._no_secure_aggregation("aggregate_secure")

    def _no_secure_aggregation(self, hook: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__}.{hook} is not implemented: {self.name} does not support SecAgg+ "
                                   "(supports_secure_aggregation is False); run it with secagg.enabled = false")

    def server_update(self, trainer: ServerTrainer | None) -> None:  # noqa: B027 - an optional hook, not abstract
        """Work the server does after aggregating (default: none)."""

    def round_merge(self) -> Adapter | None:
        """Low-rank update to merge into every base model at the end of the round (default: none)."""
        return None

    def global_adapter(self) -> Adapter | None:
        """Adapter that sits on top of the (merged) base model for evaluation and export (default: none)."""
        return None

    def client_ranks(self) -> dict[int, dict[str, int]]:
        """Each client's current rank per module, as the server sees it (for results)."""
        return {}

    # ---- what a correct reply looks like (checked by the server before aggregating)
    @abstractmethod
    def expected_upload(self, instruction: Instruction) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every tensor key a correct reply to `instruction` carries, with its shape and dtype
        (evaluation-only `eval/` tensors included)."""

    def check_upload(self, upload: Upload, instruction: Instruction) -> str | None:
        """Method-specific sense checks beyond shapes (e.g. a mask that grows); a reason, or None if fine."""
        return None

    def receipt(self, instruction: Instruction) -> Instruction:
        """What the server keeps of a sent instruction to check its reply against: the config, the tensors of the
        `checked_kinds`, and of every other tensor its shape and dtype only (torch's meta device: no data). The
        rest went out with the message; kept, it would be every sampled client's copy of the global factors."""
        tensors = {key: tensor if key.split("/", 1)[0] in self.checked_kinds else tensor.to("meta")
                   for key, tensor in instruction.tensors.items()}
        return dataclasses.replace(instruction, tensors=tensors, config=dict(instruction.config))

    def aggregation_error(self) -> float | None:
        """Aggregation exactness, after `aggregate` and before anything the server does next (truncation,
        A tuning): ‖ΔW_aggregate − Σ_k p_k B_k A_k‖_F / ‖Σ_k p_k B_k A_k‖_F over all modules, with the
        method's own weights p_k; None where the method has no single global product (default)."""
        return None

    def round_diagnostics(self) -> dict[str, float]:
        """After `server_update`: what the server's own steps changed, each under its RoundRecord name:
        `truncation_loss` (FlexLoRA: ‖SVD-truncated − exact aggregate‖ / ‖exact aggregate‖), `a_tuning_change`
        and `a_fused_change` (AFLoRA: ‖A_FT − A‖/‖A‖ and ‖A' − A‖/‖A‖). Default: none."""
        return {}

    def evaluation_instruction(self, client_id: int, round_: int) -> Instruction:
        """What a client needs to assemble its own current model (default: the global adapter, if any)."""
        return Instruction(client_id=client_id, round=round_, tensors=adapter_tensors(self.global_adapter() or {}))

    # ---- client side
    def client_model(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> Adapter:
        """The client's own adapter on top of its (merged) base, from `evaluation_instruction` (default: as sent)."""
        return adapter_from_tensors(instruction.tensors)

    @abstractmethod
    def local_job(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> TrainSpec:
        """The training job for one round; `local_state` is what this client kept from its last round."""

    @abstractmethod
    def upload(self, instruction: Instruction, trained: Adapter, num_examples: int) -> Upload: ...

    # ---- helpers shared by methods
    def client_generator(self, instruction: Instruction) -> torch.Generator:
        """Seeded per (run seed, round, client): local randomness is reproducible and independent of scheduling."""
        generator = torch.Generator()
        generator.manual_seed(hash_seed(self.seed, instruction.round, instruction.client_id))
        return generator


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of tuples is stable for ints, but be explicit)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & 0x7FFFFFFFFFFFFFFF
    return value


def options_from_mapping(options_class: type, values: Mapping[str, Any], *, section: str) -> Any:
    """Build a method's options dataclass from a config table: unknown keys and wrong types named clearly."""
    known = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"[{section}] has unknown keys {unknown}; known keys are {sorted(known)}")
    hints = typing.get_type_hints(options_class)
    return options_class(**{key: coerce(value, hints[key], f"{section}.{key}") for key, value in values.items()})


# Upload tensors under this prefix serve only the server's evaluation of a global model (FedSA-LoRA's
# personal B); they are not part of the method's protocol and are costed apart (eval_uplink_bytes).
EVAL_PREFIX = "eval/"


def factor_shapes(shapes: Mapping[str, tuple[int, int]], factors: frozenset[str] | set[str], ranks: Mapping[str, int],
                  *, prefix: str = "") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Expected float32 shapes of uploaded factors, per module at its rank (shapes from aflora.lora.factors.FACTORS)."""
    return {prefix + tensor_key(f, name): (FACTORS[f].shape(*shapes[name], rank), torch.float32)
            for name, rank in ranks.items() for f in sorted(factors)}


def validate_upload(method: FederatedMethod, upload: Upload, instruction: Instruction) -> str | None:
    """Why a reply must be rejected (wrong client, keys, shapes, dtypes, non-finite values, sense checks), or None."""
    if upload.client_id != instruction.client_id:
        return f"reply claims client {upload.client_id} but answers client {instruction.client_id}'s instruction"
    if upload.num_examples <= 0:
        return f"num_examples must be positive, got {upload.num_examples}"
    expected = method.expected_upload(instruction)
    missing, unexpected = sorted(set(expected) - set(upload.tensors)), sorted(set(upload.tensors) - set(expected))
    if missing or unexpected:
        return f"tensor keys differ from the instruction's: missing {missing[:3]}, unexpected {unexpected[:3]}"
    for key, (shape, dtype) in expected.items():
        tensor = upload.tensors[key]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            return f"{key} is {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}"
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{key} holds NaN or Inf values"
    return method.check_upload(upload, instruction)


def factor_tensors(adapter: Adapter, factors: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached copies of the named factors of every module, under their message keys (what a client uploads)."""
    return {tensor_key(f, name): getattr(module, f).detach().clone() for name, module in adapter.items() for f in sorted(factors)}


__all__ = ["EVAL_PREFIX", "ClientSpec", "FederatedMethod", "Instruction", "Penalty", "ServerTrainer", "TrainSpec", "Upload",
           "factor_shapes", "factor_tensors", "hash_seed", "options_from_mapping", "tensor_key", "validate_upload"]
