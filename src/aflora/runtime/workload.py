"""The federated data layout both ends derive from one config: data → public split → client partitions.

Deterministic (every process that calls `prepare_workload` with the same config agrees on every row),
so simulated clients need no data from the server; a deployed node reads only its own file
(`node_workload`). `preflight` checks all of it before a model or an engine starts.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..budgets import DeviceBudget, ModelFootprint, ranks_from_budgets
from ..config import ConfigError, DataConfig, ExperimentConfig
from ..data import DataError, DatasetBundle, is_registered, load_bundle, partition, split_public
from ..lora.host import adaptable_layer_names
from ..methods import ClientSpec, FederatedMethod, method_class
from ..methods.base import hash_seed
from ..models import model_skeleton
from ..shards import read_shard
from ..tracking import missing_backends

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """The rows a final evaluation scores: which ones (indices into the whole test set, sorted) and of how many."""

    indices: list[int] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    available: int = 0  # rows in the whole test set


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
    final_test: EvalSet = field(default_factory=EvalSet)  # data.final_eval_size rows, scored once after the last round
    final_extra: dict[str, EvalSet] = field(default_factory=dict)  # ... and of each extra benchmark

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
    public_source = public_bundle or bundle
    try:
        public_rows, pool = split_public(len(public_source.train), fraction=data.public_fraction, size=data.public_size, seed=seed)
    except ValueError as err:
        raise DataError(f"data.public_size / data.public_fraction: {err} ({public_source.name} has {len(public_source.train)} "
                        "training rows)") from None
    if public_bundle is not None:  # out of domain: the task's whole pool stays with the clients
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
    final_extra = {}
    for name, extra_bundle in extra.items():
        if not extra_bundle.task.label_words:
            raise DataError(f"data.extra_eval: {name} has no label words to score; "
                            "extra evaluations must be classification or multiple choice")
        final_extra[name] = final_eval_set(extra_bundle.test, data, seed, name)
        extra_bundle.test = sample_rows(extra_bundle.test, data.eval_size, seed)
    return Workload(config, bundle, client_rows, public_rows, sample_rows(bundle.test, data.eval_size, seed), extra, client_test_rows,
                    public_bundle, final_eval_set(bundle.test, data, seed, bundle.name), final_extra)


def load_public_bundle(data) -> DatasetBundle | None:
    """The out-of-domain public dataset of data.public_dataset, or None for an in-domain public set."""
    if not data.public_dataset:
        return None
    if not is_registered(data.public_dataset):
        raise DataError(f"data.public_dataset = {data.public_dataset!r} is not a registered dataset; an out-of-domain public set "
                        "must be registered instruction data (e.g. \"dolly\"; `aflora list`), or leave it empty for an "
                        "in-domain slice")
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


def sample_indices(total: int, size: int, seed: int) -> list[int]:
    """A fixed, seeded subset of evaluation rows by index, sorted (all of them when size is 0 or larger than the set).
    The same seed and size give the same rows, so data.final_eval_size = "eval_size" scores the per-round rows."""
    if not size or size >= total:
        return list(range(total))
    return sorted(random.Random(hash_seed(seed, 2)).sample(range(total), size))


def sample_rows(rows: list[dict], size: int, seed: int) -> list[dict]:
    return [rows[i] for i in sample_indices(len(rows), size, seed)]


def final_eval_set(rows: list[dict], data: DataConfig, seed: int, name: str) -> EvalSet:
    """data.final_eval_size rows of a test set; all of them, said in the log, where it has fewer."""
    wanted = data.final_eval_rows()
    if wanted > len(rows):
        log.warning("data.final_eval_size = %s, but %s has %d test rows: the final evaluation scores all of them",
                    data.final_eval_size, name, len(rows))
    indices = sample_indices(len(rows), wanted, seed)
    return EvalSet(indices, [rows[i] for i in indices], len(rows))


def preflight(config: ExperimentConfig) -> Workload:
    """Everything checkable before a model or an engine starts: trackers, model spec and layers, data, partitions,
    method needs."""
    for problem in missing_backends(config.tracking.backends):
        raise ConfigError(problem)
    check_target_modules(config)
    workload = prepare_workload(config)
    needs_public = method_class(config.method).needs_public_data(config.method_options())
    if needs_public and (not workload.public_rows or config.server.steps == 0):
        raise ConfigError(
            f"{config.method} tunes on the server's public set, but it is empty or server.steps is 0: set "
            f"data.public_fraction (e.g. 0.02) and server.steps > 0, or {config.method}.server_tuning = false"
        )
    return workload


def check_target_modules(config: ExperimentConfig) -> None:
    """Every name in model.target_modules is a layer of the model (read from its config on the meta device: no
    weights load), so a typo fails here, not after the engine started with one layer fewer than asked for."""
    model = config.model
    layers = adaptable_layer_names(model_skeleton(model.name, cache_dir=model.cache_dir or None))
    unknown = [name for name in model.target_modules if name not in layers]
    if unknown:
        raise ConfigError(f"model.target_modules names {unknown}, which match no Linear layer of {model.name}; its Linear "
                          f"layers are named {layers}: set model.target_modules to some of those (e.g. q_proj,v_proj for "
                          "Llama-family models, c_attn,c_proj,c_fc for GPT-2)")


def round_half_up(x: float) -> int:
    return int(x + 0.5)
