"""What both ends of a federated run build from one config, independent of the FL engine.

- `prepare_workload`: data → public split → client partitions (deterministic: every process agrees).
- `ClientRuntime`: one per process; one shared base model; trains whichever client a message names.
- `ServerRuntime`: the server's round: instruct → aggregate → server step → merge → evaluate → record.

Flower's ServerApp/ClientApp (aflora.flower) only move these records between the two.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .budgets import DeviceBudget, LocalWorkload, ModelFootprint, ranks_from_budgets
from .config import ConfigError, ExperimentConfig
from .data import DataError, DatasetBundle, load_bundle, partition, split_public
from .encoding import Encoded, PromptEncoder, training_batches
from .errors import RoundAborted
from .evaluation import evaluate_classification, evaluate_lm_loss
from .lora.factors import Adapter, adapter_from_tensors, adapter_tensors, stack_adapters
from .lora.host import AdapterHost
from .methods import ClientSpec, FederatedMethod, Instruction, TrainSpec, Upload, method_class
from .methods.base import hash_seed, validate_upload
from .models import load_model, resolve_model
from .privacy import PrivacyLedger, clip_upload, noise_std
from .secure_aggregation import SecureSum, attach_weights, error_bound, validate_clear_upload
from .shards import read_shard
from .training import OptimConfig, train_adapter

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- data
@dataclass
class Workload:
    """The federated data layout of one experiment."""

    config: ExperimentConfig
    bundle: DatasetBundle
    client_rows: list[list[int]]  # indices into bundle.train, one list per client
    public_rows: list[int]
    test_rows: list[dict]
    extra_eval: dict[str, DatasetBundle] = field(default_factory=dict)  # name -> bundle with sampled test rows
    client_test_rows: list[list[int]] = field(default_factory=list)  # each client's own held-out rows (may be empty)
    public_bundle: DatasetBundle | None = None  # data.public_dataset (public_rows index its train); None: `bundle`

    @property
    def public_source(self) -> DatasetBundle:
        return self.public_bundle or self.bundle

    @property
    def public_objective(self) -> str:
        """The server's training loss: the task's own, or the LM loss on an out-of-domain instruction set."""
        return "lm" if self.public_bundle is not None else self.objective

    @property
    def objective(self) -> str:
        if self.config.data.objective != "auto":
            return self.config.data.objective
        return "lm" if self.bundle.task.kind == "instruction" else "class_ce"

    def budgets(self) -> list[DeviceBudget] | None:
        fed = self.config.federation
        if not fed.memory_mb:
            return None
        speeds = fed.compute_speed or [1.0] * fed.num_clients
        return [DeviceBudget(m, u, s) for m, u, s in zip(fed.memory_mb, fed.uplink_mb, speeds)]

    def client_specs(self, method: type[FederatedMethod], footprint: ModelFootprint) -> list[ClientSpec]:
        """Clients with their maximum ranks: the configured list, or derived per method from device budgets."""
        budgets = self.budgets()
        ranks = self.config.federation.client_ranks
        if budgets is None:
            return [ClientSpec(cid, ranks[cid], len(rows)) for cid, rows in enumerate(self.client_rows)]
        if not method.configures_from_budgets:  # LEGEND turns budgets into depth and ranks itself
            ranks = ranks_from_budgets(
                budgets, footprint, trained=method.trained_factors, uploaded=method.uploaded_factors,
                batch_size=self.config.train.batch_size, seq_len=self.config.data.max_length,
            )
        return [ClientSpec(cid, r, len(rows), b.memory_mb, b.uplink_mb, b.compute_speed)
                for cid, (r, b, rows) in enumerate(zip(ranks, budgets, self.client_rows))]


def prepare_workload(config: ExperimentConfig) -> Workload:
    data, seed = config.data, config.seed
    bundle = load_bundle(data.dataset, data_dir=data.data_dir or None, test_name=data.test_dataset or None, **data.options)
    public_bundle = load_public_bundle(data)
    if public_bundle is None:
        public_rows, pool = split_public(len(bundle.train), fraction=data.public_fraction, size=data.public_size, seed=seed)
    else:  # out of domain: the task's whole pool stays with the clients
        public_rows, _ = split_public(len(public_bundle.train), fraction=data.public_fraction, size=data.public_size, seed=seed)
        pool = list(range(len(bundle.train)))
    if data.train_size and data.train_size < len(pool):
        pool = sorted(random.Random(hash_seed(seed, 1)).sample(pool, data.train_size))
    labels = bundle.train_labels() if data.partition in ("dirichlet", "k_labels") else None
    categories = bundle.train_categories() if data.partition == "fedit_epsilon" else None
    try:
        client_rows = partition(
            data.partition,
            pool,
            config.federation.num_clients,
            seed=seed,
            labels=None if labels is None else [labels[i] for i in pool],
            categories=None if categories is None else [categories[i] for i in pool],
            alpha=data.dirichlet_alpha,
            epsilon=data.epsilon,
            labels_per_client=data.labels_per_client,
            presplit_clients=bundle.presplit_clients,
        )
    except ValueError as err:  # the partitioners explain what to change; surface it as a data problem
        raise DataError(f"cannot partition {bundle.name} with data.partition={data.partition!r}: {err}") from None
    client_rows, client_test_rows = hold_out_local_tests(client_rows, data.local_test_fraction, seed)
    extra = {name: load_bundle(name, data_dir=data.data_dir or None) for name in data.extra_eval}
    for name, extra_bundle in extra.items():
        if not extra_bundle.task.label_words:
            raise DataError(f"data.extra_eval: {name} has no label words to score; "
                            "extra evaluations must be classification or multiple choice")
        extra_bundle.test = sample_rows(extra_bundle.test, data.eval_size, seed)
    return Workload(config, bundle, client_rows, public_rows, sample_rows(bundle.test, data.eval_size, seed), extra, client_test_rows,
                    public_bundle)


def load_public_bundle(data) -> DatasetBundle | None:
    """The out-of-domain public dataset of data.public_dataset, or None for an in-domain public set."""
    if not data.public_dataset:
        return None
    public = load_bundle(data.public_dataset, data_dir=data.data_dir or None)
    if public.task.kind != "instruction":
        raise DataError(f"data.public_dataset = {data.public_dataset!r} is a {public.task.kind} dataset; an out-of-domain "
                        "public set must be instruction data (e.g. \"dolly\"), or leave it empty for an in-domain slice")
    return public


def node_workload(config: ExperimentConfig, client_id: int, data_file: Path) -> Workload:
    """A deployed client's view: only its own file (`aflora partition`), no other client's rows."""
    task, train, test = read_shard(data_file)
    bundle = DatasetBundle(name=f"node data {data_file.name}", task=task, train=train + test, test=[], source=str(data_file))
    client_rows = [[] for _ in range(config.federation.num_clients)]
    client_test_rows = [[] for _ in range(config.federation.num_clients)]
    client_rows[client_id] = list(range(len(train)))
    client_test_rows[client_id] = list(range(len(train), len(train) + len(test)))
    return Workload(config, bundle, client_rows, public_rows=[], test_rows=[], client_test_rows=client_test_rows)


def hold_out_local_tests(client_rows: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Split every client's rows into (train, its own test set): personalized evaluation data, never trained on."""
    if fraction <= 0:
        return client_rows, [[] for _ in client_rows]
    train, test = [], []
    for cid, rows in enumerate(client_rows):
        if len(rows) < 2:
            raise DataError(f"client {cid} has {len(rows)} row(s): too few to hold out a local test set; lower data.local_test_fraction")
        shuffled = list(rows)
        random.Random(hash_seed(seed, cid, 11)).shuffle(shuffled)
        held = min(len(rows) - 1, max(1, round_half_up(fraction * len(rows))))
        test.append(sorted(shuffled[:held]))
        train.append(sorted(shuffled[held:]))
    return train, test


def sample_rows(rows: list[dict], size: int, seed: int) -> list[dict]:
    """A fixed, seeded subset of evaluation rows (all of them when size is 0 or larger than the set)."""
    if not size or size >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(hash_seed(seed, 2)).sample(range(len(rows)), size))]


def preflight(config: ExperimentConfig) -> Workload:
    """Everything checkable before a model or an engine starts: model spec, data, partitions, method needs."""
    resolve_model(config.model.name)
    workload = prepare_workload(config)
    needs_public = method_class(config.method).needs_public_data(config.method_options())
    if needs_public and (not workload.public_rows or config.server.steps == 0):
        raise ConfigError(
            f"{config.method} tunes on the server's public set, but it is empty or server.steps is 0: set "
            f"data.public_fraction (e.g. 0.02) and server.steps > 0, or {config.method}.server_tuning = false"
        )
    return workload


def autocast_dtype(precision: str, model: torch.nn.Module) -> torch.dtype | None:
    """bf16 autocast where it pays: CUDA with bf16, or CPUs with native bf16 (AVX512-BF16/AMX)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


class ModelSide:
    """A process's shared base model with its adapter host, encoder and the method (client or server)."""

    def __init__(self, workload: Workload) -> None:
        config = workload.config
        self.workload = workload
        if config.engine.threads:
            torch.set_num_threads(config.engine.threads)
        model, self.tokenizer = load_model(
            config.model.name, cache_dir=config.model.cache_dir or None, seed=config.seed, attention=config.model.attention
        )
        if torch.cuda.is_available():
            model = model.to("cuda")
        self.host = AdapterHost(model, config.model.target_modules)
        self.encoder = PromptEncoder(self.tokenizer, workload.bundle.task, config.data.max_length)
        self.autocast = autocast_dtype(config.model.precision, model)
        method = method_class(config.method)
        self.clients = workload.client_specs(method, self.host.footprint())
        self.method: FederatedMethod = method(
            config.method_options(), module_shapes=self.host.module_shapes(), clients=self.clients, seed=config.seed,
            footprint=self.host.footprint(),
            workload=LocalWorkload(config.train.batch_size, config.data.max_length, config.train.local_steps),
        )

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def encode(self, rows: list[dict], objective: str | None = None) -> list[Encoded]:
        objective = objective or self.workload.objective
        encode = self.encoder.encode_lm if objective == "lm" else self.encoder.encode_classification
        return [encode(row) for row in rows]

    @property
    def scoring_objective(self) -> str:
        """How evaluation scores this task: label-word accuracy where there are label words, else LM loss."""
        return "class_ce" if self.encoder.label_token_ids else "lm"

    def evaluate(self, examples: list[Encoded], adapter: Adapter | None, encoder: PromptEncoder | None = None) -> dict[str, float]:
        encoder = encoder or self.encoder
        common = dict(batch_size=self.workload.config.train.eval_batch_size, pad_id=self.pad_id, adapter=adapter,
                      autocast_dtype=self.autocast)
        if encoder.label_token_ids:
            return evaluate_classification(self.host, examples, label_token_ids=encoder.label_token_ids, **common)
        return evaluate_lm_loss(self.host, examples, **common)

    def train(self, spec: TrainSpec, examples: list[Encoded], *, steps: int, batch_size: int, optim: OptimConfig, seed: int,
              on_step=None, objective: str | None = None):
        return train_adapter(
            self.host,
            spec,
            training_batches(examples, batch_size, self.pad_id, seed=seed),
            steps=steps,
            optim=optim,
            objective=objective or self.workload.objective,
            label_token_ids=self.encoder.label_token_ids,
            autocast_dtype=self.autocast,
            on_step=on_step,
        )


# ---------------------------------------------------------------------------- base-model sync
@dataclass
class BaseSync:
    """What a client process needs to bring its copy of the base model up to the global one."""

    merges: dict[int, Adapter]  # the updates this client has not acknowledged yet, by round
    merged_rounds: list[int]  # every round whose update is in the global base model
    store: str = ""  # a folder holding every round's update, when server and clients share a disk (simulation)


class MergeStore:
    """Round updates as files (round_<t>.safetensors): a simulation's shared store, or a SuperNode's state-dir."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, round_: int) -> Path:
        return self.folder / f"round_{round_}.safetensors"

    def save(self, round_: int, adapter: Adapter) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(round_).with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in adapter_tensors(adapter).items()}, tmp)
        tmp.replace(self.path(round_))

    def load(self, round_: int) -> Adapter | None:
        path = self.path(round_)
        return adapter_from_tensors(load_file(path)) if path.is_file() else None


@dataclass
class BaseMerges:
    """Low-rank updates merged into the base model, by round. Every process replays the ones it lacks."""

    by_round: dict[int, Adapter] = field(default_factory=dict)

    def since(self, round_exclusive: int) -> dict[int, Adapter]:
        return {r: a for r, a in sorted(self.by_round.items()) if r > round_exclusive}

    def exported_adapter(self, global_adapter: Adapter | None) -> Adapter | None:
        """All merged rounds plus the live global adapter as one adapter (exact: stacked along the rank)."""
        parts = [a for _, a in sorted(self.by_round.items())] + ([global_adapter] if global_adapter else [])
        return stack_adapters(parts) if parts else None


# ---------------------------------------------------------------------------- client side
class ClientRuntime:
    """One per process; serves every client whose message arrives here, on one shared base model."""

    def __init__(self, config: ExperimentConfig, *, client_id: int | None = None, data_file: Path | None = None,
                 state_dir: Path | None = None) -> None:
        """In simulation every process derives all partitions; a deployed node passes its own `data_file`
        and a `state_dir` that outlives its processes (the round updates it has received)."""
        self.config = config
        self.workload = node_workload(config, client_id, data_file) if data_file else prepare_workload(config)
        self.side = ModelSide(self.workload)
        self.applied_rounds: set[int] = set()
        self.node_store = MergeStore(Path(state_dir) / "merges") if state_dir else None
        self._encoded: dict[int, list[Encoded]] = {}

    def client_examples(self, client_id: int) -> list[Encoded]:
        if client_id not in self._encoded:
            rows = [self.workload.bundle.train[i] for i in self.workload.client_rows[client_id]]
            if not rows:
                raise ValueError(f"client {client_id} has no training data")
            self._encoded[client_id] = self.side.encode(rows)
        return self._encoded[client_id]

    def evaluate(self, instruction: Instruction, sync: BaseSync, local_state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """The client's own model (e.g. FedSA-LoRA's shared A with its personal B) on its local test rows."""
        self.sync_base(sync)
        rows = [self.workload.bundle.train[i] for i in self.workload.client_test_rows[instruction.client_id]]
        if not rows:
            raise ValueError(f"client {instruction.client_id} has no local test rows; set data.local_test_fraction > 0")
        examples = self.side.encode(rows, self.side.scoring_objective)
        return self.side.evaluate(examples, self.side.method.client_model(instruction, local_state))

    def sync_base(self, sync: BaseSync) -> None:
        """Apply, in order, every merged round this process's base model lacks.

        An update comes from the message, from this node's state-dir (a deployed SuperNode may start a
        fresh process for every message) or from the run's shared store (simulation workers). A round
        found nowhere is an error: training on an incomplete base would be silently wrong."""
        for round_, adapter in sync.merges.items():
            if self.node_store is not None and round_ not in self.applied_rounds:
                self.node_store.save(round_, adapter)
        stores = [store for store in (self.node_store, MergeStore(Path(sync.store)) if sync.store else None) if store]
        for round_ in sorted(sync.merged_rounds):
            if round_ in self.applied_rounds:
                continue
            adapter = sync.merges.get(round_) or next((a for st in stores if (a := st.load(round_)) is not None), None)
            if adapter is None:
                raise RuntimeError(
                    f"this client's base model lacks the global update of round {round_} (it has rounds "
                    f"{sorted(self.applied_rounds)}); give the SuperNode a persistent --node-config state-dir=<folder>"
                )
            self.side.host.merge_into_base(adapter)
            self.applied_rounds.add(round_)

    def train(self, instruction: Instruction, sync: BaseSync, local_state: dict[str, torch.Tensor] | None = None) -> Upload:
        """One client's round; `local_state` is what the client kept last time (the engine stores it per client)."""
        engine = self.config.engine
        if instruction.client_id in engine.fail_clients and instruction.round >= engine.fail_from_round:
            raise RuntimeError(f"client {instruction.client_id}: injected fault (engine.fail_clients) in round {instruction.round}")
        self.sync_base(sync)
        examples = self.client_examples(instruction.client_id)
        spec = self.side.method.local_job(instruction, local_state)
        train = self.config.train
        progress = StepProgress(f"round {instruction.round} client {instruction.client_id}", train.local_steps)
        result = self.side.train(
            spec,
            examples,
            steps=train.local_steps,
            batch_size=train.batch_size,
            optim=OptimConfig(lr=train.lr, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm),
            seed=hash_seed(self.config.seed, instruction.round, instruction.client_id, 7),
            on_step=progress,
        )
        upload = self.side.method.upload(instruction, result.adapter, len(examples))
        if self.config.privacy.clip_norm:
            upload.metrics["update_norm"] = clip_upload(upload.tensors, self.config.privacy.clip_norm)
        upload.trained_params = spec.trained_params()
        upload.metrics.update(train_loss=result.mean_loss, train_seconds=result.seconds, train_tokens=float(result.tokens))
        mean_rank = sum(upload.ranks.values()) / max(len(upload.ranks), 1)
        log.info("%s: rank %.1f, %d steps, loss %s, %.1fs", progress.label, mean_rank, result.steps, progress.summary(), result.seconds)
        return upload


class StepProgress:
    """Per-step losses; a progress line every quarter of a long local run, a one-line summary at the end."""

    def __init__(self, label: str, steps: int) -> None:
        self.label, self.steps, self.losses = label, steps, []
        self.every = max(1, steps // 4) if steps >= 20 else 0

    def __call__(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if self.every and step % self.every == 0 and step < self.steps:
            log.info("%s: step %d/%d, loss %.4f", self.label, step, self.steps, loss)

    def summary(self) -> str:
        if not self.losses:
            return "-"
        return f"{self.losses[0]:.3f} → {self.losses[-1]:.3f}" if len(self.losses) > 1 else f"{self.losses[0]:.3f}"


# ---------------------------------------------------------------------------- server side
class ServerRuntime:
    """The server's half of every round, plus evaluation and the record of what happened."""

    def __init__(self, config: ExperimentConfig, workload: Workload | None = None) -> None:
        self.config = config
        self.workload = workload or prepare_workload(config)
        self.side = ModelSide(self.workload)
        self.method = self.side.method
        self.constructed_keys = set(vars(self.method))  # what init_server_state and rounds add is the state to checkpoint
        self.method.init_server_state()
        privacy = config.privacy
        self.privacy: PrivacyLedger | None = None
        if privacy.clip_norm:
            self.method.uniform_weights = True
            self.privacy = PrivacyLedger(noise_multiplier=privacy.noise_multiplier, delta=privacy.delta,
                                         population=config.federation.num_clients, sampled=config.federation.sample_fraction < 1)
        # SecAgg+ (aflora.secure_aggregation): clients fold in the weights sent with their instructions
        self.secure = config.secagg.enabled
        self.secure_weights: dict[int, dict[str, float]] = {}
        self.merges = BaseMerges()
        self.merge_store: MergeStore | None = None  # set by the engine when clients share the server's disk
        self._pending_ack: dict[int, int] = {}
        # The last merged round each client confirmed holding (by a successful reply): it gets every later one.
        self.acknowledged: dict[int, int] = {c.client_id: 0 for c in self.side.clients}

    @cached_property
    def test_examples(self) -> list[Encoded]:
        return self.side.encode(self.workload.test_rows, self.side.scoring_objective)

    @cached_property
    def public_examples(self) -> list[Encoded]:
        source = self.workload.public_source
        rows = [source.train[i] for i in self.workload.public_rows]
        if self.workload.public_bundle is None:
            return self.side.encode(rows)
        encoder = PromptEncoder(self.side.tokenizer, source.task, self.config.data.max_length)
        return [encoder.encode_lm(row) for row in rows]

    def sample_clients(self, round: int) -> list[int]:
        fed = self.config.federation
        count = max(1, round_half_up(fed.sample_fraction * fed.num_clients))
        return sorted(random.Random(hash_seed(self.config.seed, round, 3)).sample(range(fed.num_clients), count))

    def instructions(self, round: int) -> list[tuple[Instruction, dict[int, Adapter]]]:
        """Each sampled client's instruction and the base-model merges it has not received yet."""
        messages = [(self.method.instruct(cid, round), self.base_sync(cid)) for cid in self.sample_clients(round)]
        if self.secure:  # the server will see only the weighted sum: each client learns its weights up front
            self.secure_weights = self.method.secure_weights([instruction.client_id for instruction, _ in messages])
            for instruction, _ in messages:
                attach_weights(instruction, self.secure_weights[instruction.client_id])
        self.sent = {instruction.client_id: instruction for instruction, _ in messages}  # replies are checked against these
        return messages

    def server_trainer(self, round: int):
        server = self.config.server
        if server.steps == 0 or not self.workload.public_rows:
            return None

        def train_on_public(spec: TrainSpec) -> Adapter:
            result = self.side.train(
                spec,
                self.public_examples,
                steps=server.steps,
                batch_size=server.batch_size,
                optim=OptimConfig(lr=server.lr, max_grad_norm=self.config.train.max_grad_norm),
                seed=hash_seed(self.config.seed, round, 5),
                objective=self.workload.public_objective,
            )
            log.info("round %d server step on %d public rows: loss %.4f, %.1fs",
                     round, len(self.public_examples), result.mean_loss, result.seconds)
            return result.adapter

        return train_on_public

    def accept(self, round: int, uploads: list[Upload], failures: list[dict]) -> list[Upload]:
        """The replies fit to aggregate; every other sampled client gets a failure entry with its reason.

        Weights are then computed over the accepted replies only (every method normalises over what it
        aggregates). Fewer than federation.min_replies accepted replies abort the round: nothing is
        aggregated and the checkpoint of the previous round stays as it was."""
        accepted: dict[int, Upload] = {}
        for upload in uploads:
            instruction = self.sent.get(upload.client_id)
            if upload.client_id in accepted:
                reason = "a second reply from this client in the same round"
            elif instruction is None:
                reason = "this client was not asked to train this round"
            else:
                reason = (validate_clear_upload if self.secure else validate_upload)(self.method, upload, instruction)
            if reason:
                failures.append({"client": upload.client_id, "reason": f"rejected: {reason}"})
                log.warning("round %d: reply of client %d rejected: %s", round, upload.client_id, reason)
            else:
                if self.privacy is not None:  # enforce the bound even if a client skipped its clipping
                    clip_upload(upload.tensors, self.config.privacy.clip_norm)
                accepted[upload.client_id] = upload
                self.acknowledge(upload.client_id)
        explained = {f.get("client") for f in failures}
        for cid in sorted(set(self.sent) - set(accepted) - explained):
            failures.append({"client": cid, "reason": "no reply (the client crashed, timed out or was unreachable)"})
        minimum = self.config.federation.min_replies
        if len(accepted) < minimum:
            reasons = "; ".join(f"client {f['client']}: {f['reason']}" for f in failures)
            raise RoundAborted(
                f"round {round}: {len(accepted)} of {len(self.sent)} clients replied usably, fewer than "
                f"federation.min_replies = {minimum} ({reasons})"
            )
        return [accepted[cid] for cid in sorted(accepted)]

    def complete_round(self, round: int, uploads: list[Upload], secure_sum: SecureSum | None = None) -> dict[str, float]:
        """Aggregate the accepted uploads, run the server's own update, merge the round's update into the base.
        With secure aggregation the uploads are clear parts only and `secure_sum` holds their weighted sum.

        Returns the server's diagnostics: aggregation and server-step seconds, aggregation error, and the
        method's own (truncation loss, A's change in the server step)."""
        started = time.perf_counter()
        if self.secure:
            self.aggregate_secure(round, uploads, secure_sum)
        else:
            self.method.aggregate(uploads, round)
        dp = self.add_privacy_noise(round, len(uploads)) if self.privacy is not None else {}
        aggregated = time.perf_counter()
        self.method.server_update(self.server_trainer(round))
        update = self.method.round_merge()
        if update is not None:
            self.merges.by_round[round] = update
            self.side.host.merge_into_base(update)
            if self.merge_store is not None:
                self.merge_store.save(round, update)
        diagnostics = {"aggregation_seconds": aggregated - started, "server_seconds": time.perf_counter() - aggregated, **dp}
        error = self.method.aggregation_error()
        if error is not None:
            diagnostics["aggregation_error"] = error
        return {**diagnostics, **self.method.round_diagnostics()}

    def aggregate_secure(self, round: int, uploads: list[Upload], secure_sum: SecureSum | None) -> None:
        if secure_sum is None:
            raise RuntimeError("secagg.enabled = true needs an engine that runs SecAgg+ (aflora run, flwr run)")
        rejected = sorted(set(secure_sum.client_ids) - {u.client_id for u in uploads})
        if rejected:  # their masked B' is inside the sum, and a masked contribution cannot be taken back out
            raise RoundAborted(
                f"round {round}: the SecAgg+ sum holds the contributions of clients {rejected}, whose clear-text "
                "replies were rejected (see the warnings above); the sum cannot be separated, so the round is dropped"
            )
        secagg = self.config.secagg
        clipped = {u.client_id: int(u.metrics["secagg_clipped"]) for u in uploads if u.metrics.get("secagg_clipped")}
        if clipped:
            log.warning("round %d: SecAgg+ clipped weighted B' entries to ±%g (client: entries %s), so the aggregate is off by "
                        "more than the quantization error there: raise secagg.clipping_range", round, secagg.clipping_range, clipped)
        self.method.aggregate_secure(secure_sum.vectors, uploads, self.secure_weights, round)
        weight_total = min(sum(self.secure_weights[u.client_id][m] for u in uploads) for m in self.method.module_shapes)
        log.info("round %d: secure sum of %d clients; every entry of B_global within %.2g of plain aggregation", round, len(uploads),
                 error_bound(len(uploads), secagg.clipping_range, secagg.quantization_range, weight_total))

    def add_privacy_noise(self, round: int, num_clients: int) -> dict[str, float]:
        """The Gaussian mechanism on the aggregate (aflora.privacy); seeded by round, so resumes stay identical."""
        privacy = self.config.privacy
        std = noise_std(privacy.noise_multiplier, privacy.clip_norm, num_clients)
        self.method.add_aggregate_noise(std, torch.Generator().manual_seed(hash_seed(self.config.seed, round, 13)))
        return {"dp_noise_std": std, "dp_epsilon": self.privacy.release(num_clients)}

    @cached_property
    def extra_eval_sets(self) -> dict[str, tuple[PromptEncoder, list[Encoded]]]:
        """Other benchmarks scored each round (e.g. MMLU for a Dolly-trained model)."""
        sets = {}
        for name, bundle in self.workload.extra_eval.items():
            encoder = PromptEncoder(self.side.tokenizer, bundle.task, self.config.data.max_length)
            sets[name] = (encoder, [encoder.encode_classification(row) for row in bundle.test])
        return sets

    def evaluate(self) -> dict[str, float]:
        """The global model on the test rows (accuracy and loss, or LM loss), plus every extra benchmark."""
        adapter = self.method.global_adapter()
        metrics = self.side.evaluate(self.test_examples, adapter)
        for name, (encoder, examples) in self.extra_eval_sets.items():
            extra = self.side.evaluate(examples, adapter, encoder)
            metrics.update({f"{name}/accuracy": extra["accuracy"], f"{name}/loss": extra["loss"]})
        return metrics

    def evaluation_messages(self, round: int, client_ids: list[int]) -> list[tuple[Instruction, dict[int, Adapter]]]:
        """For personalized evaluation: what each client needs to assemble its current model."""
        if not self.config.data.local_test_fraction:
            return []
        return [(self.method.evaluation_instruction(cid, round), self.base_sync(cid)) for cid in client_ids]

    def base_sync(self, client_id: int) -> BaseSync:
        self._pending_ack[client_id] = max(self.merges.by_round, default=0)
        return BaseSync(
            merges=self.merges.since(self.acknowledged[client_id]),
            merged_rounds=sorted(self.merges.by_round),
            store=str(self.merge_store.folder) if self.merge_store else "",
        )

    def acknowledge(self, client_id: int) -> None:
        """A successful reply: the client's base holds every update sent with that message."""
        self.acknowledged[client_id] = self._pending_ack.get(client_id, self.acknowledged[client_id])


def round_half_up(x: float) -> int:
    return int(x + 0.5)
