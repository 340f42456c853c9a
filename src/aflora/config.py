"""Experiment configuration: TOML files, `key=value` overrides, and Flower's flat run-config.

One experiment is one file (configs/*.toml). The same values reach the ServerApp either from
`aflora run --config F --set k=v` or from `flwr run . --run-config "k=v"` (flattened with dots).
Every field is validated before any model or data is loaded, naming the field and the expected form.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.partition import PARTITION_SCHEMES
from .methods import METHODS, method_options
from .tracking import unknown_backends
from .values import ConfigError, coerce, tomllib

PRECISIONS = ("auto", "bf16", "fp32")
ATTENTION_BACKENDS = ("auto", "eager", "sdpa")  # what aflora.models.attention_implementation can give transformers
DEVICES = ("auto", "cpu", "cuda")  # where aflora.models.model_device puts the base model
OBJECTIVES = ("auto", "class_ce", "lm")
MIN_MAX_LENGTH = 16  # tokens: the chat template's own tokens leave nothing of the text below this


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name: str = _help(
        "'smollm2' (embedded SmolLM2-135M-Instruct), 'tiny-llama', 'tiny-gpt2', a hub id, a folder or a .gguf file", "smollm2")
    target_modules: list[str] = _help(
        "Linear layers that get LoRA (paper: q_proj,v_proj for Llama; c_attn,c_proj,c_fc for GPT-2)", factory=lambda: ["q_proj", "v_proj"])
    precision: str = _help("'auto' (bf16 autocast where the hardware has it), 'bf16' or 'fp32'", "auto")
    attention: str = _help("'auto' (eager on CPU, sdpa on GPU), 'eager' or 'sdpa'", "auto")
    device: str = _help("'auto' (the GPU when torch sees one, else the CPU), 'cpu' or 'cuda'", "auto")
    random_init: bool = _help(
        "Build the model from its config with random weights instead of reading its trained ones (a folder needs only "
        "config.json and the tokenizer): for speed and memory benchmarks where the weights cannot go; accuracy is then "
        "meaningless", False)
    cache_dir: str = _help("Where de-quantized GGUF models are cached (default $AFLORA_CACHE_DIR or ~/.cache/aflora)", "")


@dataclass
class DataConfig:
    dataset: str = _help(
        "Registered dataset (ag_news, fingpt_sentiment, twitter_financial_news_sentiment, financial_phrasebank, dolly, mmlu), hub id or "
        "local file", "ag_news")
    test_dataset: str = _help("Take the test rows from another dataset of the same task (e.g. financial_phrasebank)", "")
    data_dir: str = _help("Folder with local copies of the datasets (else $AFLORA_DATA_DIR, else the hub)", "")
    partition: str = _help(f"{' | '.join(PARTITION_SCHEMES)} (`aflora list` describes each)", "k_labels")
    labels_per_client: int = _help("k for the k_labels partition (paper, AG News: 2)", 2)
    dirichlet_alpha: float = _help("Concentration of the dirichlet partition (smaller = more skewed)", 0.5)
    epsilon: float = _help("Heterogeneity of the fedit_epsilon partition (smaller = more heterogeneous)", 0.5)
    public_fraction: float = _help("Share of the training pool held out as the server's public set (paper: 2%)", 0.02)
    public_size: int = _help("Public set size in rows (overrides public_fraction when > 0)", 0)
    public_dataset: str = _help(
        "Where the server's public set comes from: '' = held out of this task's own training pool (in-domain, every "
        "label); an instruction dataset (e.g. 'dolly') = public_size / public_fraction of its training rows, trained "
        "with the LM loss (out of domain, as the paper's 2% of Alpaca)", "")
    train_size: int = _help("Cap on the client training pool in rows after the public split (0 = all)", 0)
    eval_size: int = _help("Test rows evaluated each round, a seeded sample (0 = all)", 200)
    final_eval_size: str = _help(
        "Test rows of the final evaluation, once after the last round (the final accuracy, its interval and compare's "
        "paired differences): a number (the published studies use 2000), \"all\", or \"eval_size\" (the per-round "
        "rows again, no extra cost). A test set with fewer rows is used whole, and the log says so", "eval_size")
    max_length: int = _help(f"Maximum tokens per example (long prompts lose their middle; at least {MIN_MAX_LENGTH})", 128)
    objective: str = _help("'auto' (class_ce for classification, lm for instructions), 'class_ce' or 'lm'", "auto")
    local_test_fraction: float = _help(
        "Share of each client's rows held out as its own test set; > 0 adds per-client (personalized) evaluation every round", 0.0)
    extra_eval: list[str] = _help("Other registered benchmarks scored every round, e.g. [\"mmlu\"] for instruction tuning", factory=list)
    options: dict[str, Any] = _help(
        "Dataset-specific options, typed like every key (`aflora list` describes each dataset's): fpb_agree, mmlu_subjects, "
        "holdout_per_category, holdout_seed; for a local file: label_words, test_path, text_column, label_column, "
        "instruction, encoding",
        factory=dict,
    )

    def final_eval_rows(self) -> int | None:
        """final_eval_size as a row count, 0 meaning every test row (as for eval_size); None if it is not one."""
        size = self.final_eval_size.strip().lower()
        if size in ("eval_size", "all"):
            return self.eval_size if size == "eval_size" else 0
        return int(size) if size.isdigit() and int(size) > 0 else None


@dataclass
class FederationConfig:
    num_clients: int = _help("Number of simulated clients", 10)
    client_ranks: list[int] = _help(
        "Largest LoRA rank each client's resources allow (AFLoRA's r_k^1), one per client",
        factory=lambda: [64, 32, 16, 16, 8, 8, 4, 4, 4, 4])
    sample_fraction: float = _help("Fraction of clients sampled each round (paper: 1.0; 0.2 for the ε study)", 1.0)
    min_replies: int = _help("A round aborts (checkpoint kept) when fewer clients than this reply usably", 1)
    memory_mb: list[float] = _help(
        "Per-client memory budget (MB); with uplink_mb it replaces client_ranks: each method gets the largest rank that fits "
        "(docs/budgets.md)", factory=list)
    uplink_mb: list[float] = _help("Per-client upload budget per round (MB)", factory=list)
    compute_speed: list[float] = _help("Per-client relative compute speed (1 = slowest class); LEGEND uses it", factory=list)


@dataclass
class TrainConfig:
    local_steps: int = _help("Optimizer steps per client per round", 4)
    batch_size: int = _help("Client batch size", 8)
    lr: float = _help("Client learning rate (AdamW)", 2e-3)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    max_grad_norm: float = _help("Gradient clipping (0 = off)", 1.0)
    eval_batch_size: int = _help("Batch size for evaluation", 32)


@dataclass
class ServerConfig:
    steps: int = _help("Server-side training steps on the public set per round (AFLoRA's A tuning)", 4)
    lr: float = _help("Server learning rate", 2e-3)
    batch_size: int = _help("Server batch size", 8)


@dataclass
class PrivacySection:
    clip_norm: float = _help("Client-level DP: each upload is clipped to this joint L2 norm; 0 = DP off (docs/privacy.md)", 0.0)
    noise_multiplier: float = _help("σ: the server adds N(0, (σ·clip_norm/m)²) to the aggregate of m clients", 1.0)
    delta: float = _help("δ at which ε is reported", 1e-5)


@dataclass
class SecAggSection:
    enabled: bool = _help(
        "Secure aggregation with Flower's SecAgg+: the server sees only the sum of the clients' weighted, zero-padded B' (AFLoRA only; "
        "docs/privacy.md)", False)
    num_shares: float = _help(
        "Shares of each client's secret keys (its SecAgg+ neighbours): ≤ 1 = that fraction of the round's clients, > 1 = a count (an "
        "integer ≥ 3)", 1.0)
    reconstruction_threshold: float = _help(
        "Shares needed to unmask a client: ≤ 1 = that fraction of num_shares (at least 2), > 1 = a count below num_shares; more tolerates "
        "fewer dropouts", 0.5)
    clipping_range: float = _help(
        "c: every weighted entry p_k·B'_ij is clipped to [−c, c] before quantization (clients count and report clipped entries)", 1.0)
    quantization_range: int = _help("T: integer levels over [−c, c]; each entry of the sum is off by less than (clients)·2c/T", 2**22)


@dataclass
class EngineConfig:
    client_cpus: int = _help("CPU cores each simulated client worker gets (workers = cores / client_cpus)", 2)
    client_gpus: float = _help(
        "share of a GPU each simulated client worker gets where CUDA is present (0.25: four workers per GPU, each with its "
        "own copy of the base model); ignored without a GPU", 1.0)
    threads: int = _help(
        "torch threads in every process of the run, server and clients (0 = engine.client_cpus). Fixed by the config, not "
        "the machine, so a resumed run and a deployed federation compute the same bits as the simulation; keep it when resuming",
        0)
    verbose: bool = _help("Flower's own INFO logs", False)
    connect_timeout: float = _help("Seconds the server waits for every client's SuperNode to connect", 300.0)
    round_timeout: float = _help("Seconds the server waits for a round's replies; late clients count as failed", 3600.0)
    max_in_flight: int = _help("Train (and personalized-evaluation) messages out at once, the next ones sent as replies come back; "
                               "the server holds that many messages, plus each accepted upload until aggregation. 0 = every "
                               "sampled client at once on a deployed federation, 2 × the workers in `aflora run`'s simulation", 0)
    fail_clients: list[int] = _help("Fault injection for rehearsals and tests: these clients raise instead of training", factory=list)
    fail_from_round: int = _help("...from this round on", 1)
    crash_probability: float = _help(
        "Fault injection: the chance that a sampled client raises instead of training, drawn per (seed, round, client), "
        "so a resumed run injects the same faults", 0.0)
    timeout_probability: float = _help(
        "Fault injection: the chance that a sampled client stalls for engine.round_timeout seconds and then fails, so "
        "that its answer comes after the server stopped waiting; drawn like crash_probability", 0.0)


@dataclass
class TrackingSection:
    backends: list[str] = _help(
        "Where every round's metrics go as the run goes (results.json is written regardless): 'tensorboard' (event files in the "
        "run folder), 'mlflow', 'wandb' (need their packages); [] for none", factory=lambda: ["tensorboard"])
    project: str = _help("The MLflow experiment / W&B project runs are logged under", "aflora")


@dataclass
class ExperimentConfig:
    method: str = _help(f"Federated method: one of {sorted(METHODS)}", "aflora")
    seed: int = _help("Seed for partitions, sampling, initialization and local shuffling", 0)
    rounds: int = _help("Communication rounds", 3)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    # Method hyperparameters, one table per method name ([aflora], ...); validated by that method.
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    def method_options(self) -> Any:
        return method_options(self.method, self.methods.get(self.method, {}))

    def to_dict(self) -> dict[str, Any]:
        tree = dataclasses.asdict(self)
        tables = tree.pop("methods")
        tree.update(tables)
        return tree


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "federation": FederationConfig,
    "train": TrainConfig, "server": ServerConfig, "privacy": PrivacySection, "secagg": SecAggSection,
    "engine": EngineConfig, "tracking": TrackingSection,
}
TOP_LEVEL = ("method", "seed", "rounds")
# [compare] (methods, seeds): what `aflora compare` runs from this file (aflora.compare.compare_table); not part of any one run.
COMPARE = "compare"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML experiment file (or the defaults), apply `key=value` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_config_file(Path(path))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    return config_from_tree(tree)


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML tree of an experiment file, or a ConfigError that says why it cannot be read."""
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; pass the TOML file itself (e.g. configs/default.toml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a TOML file (see configs/)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); TOML files are UTF-8: "
                          "save it again as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. rounds=5 or aflora.beta=0.5)")
    key, raw = (part.strip() for part in item.split("=", 1))
    if not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key or key part; write key=value with a dotted key "
                          "(e.g. train.lr=0.001); `aflora config --explain` lists every key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: model.name=tiny-llama
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for depth, part in enumerate(parents, start=1):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            path = ".".join(parents[:depth])
            raise ConfigError(f"cannot set {key}: {path} is a single value, not a table: set it as {path}=<value>")
    node[leaf] = value


def config_from_flat(flat: dict[str, Any]) -> ExperimentConfig:
    """Flower's run-config: keys like 'model.name'; 'config-file' names a TOML file to start from."""
    flat = dict(flat)
    base_file = flat.pop("config-file", "")
    tree = read_config_file(Path(base_file)) if base_file else {}
    for key, value in flat.items():
        set_dotted(tree, key, value)
    return config_from_tree(tree)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class KeyHelp:
    """One settable key, as `aflora config --explain` shows it."""

    key: str
    value: Any
    type: str
    help: str


def describe_keys(config: ExperimentConfig) -> list[KeyHelp]:
    """Every key this config can set, with its value here, its type and its help: the top-level keys, each section's
    fields, then every method's options (the values in effect, whether the config sets them or not)."""
    def rows(prefix: str, cls: type, values: Any) -> list[KeyHelp]:
        hints = typing.get_type_hints(cls)
        return [KeyHelp(f"{prefix}{f.name}", getattr(values, f.name), _type_name(hints[f.name]), f.metadata.get("help", ""))
                for f in dataclasses.fields(cls) if f.name in hints and (prefix or f.name in TOP_LEVEL)]

    described = rows("", ExperimentConfig, config)
    for section, cls in SECTIONS.items():
        described += rows(f"{section}.", cls, getattr(config, section))
    for name in sorted(METHODS):
        options = method_options(name, config.methods.get(name, {}))
        described += rows(f"{name}.", type(options), options)
    return described


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if not args:
        return "any" if hint is Any else getattr(hint, "__name__", str(hint))
    return f"{typing.get_origin(hint).__name__}[{', '.join(_type_name(arg) for arg in args)}]"


def config_from_tree(tree: dict[str, Any]) -> ExperimentConfig:
    tree = dict(tree)
    tree.pop(COMPARE, None)
    hints = typing.get_type_hints(ExperimentConfig)
    top: dict[str, Any] = {name: _build_section(cls, tree.pop(name, {}), name) for name, cls in SECTIONS.items()}
    top.update({name: coerce(tree.pop(name), hints[name], name) for name in TOP_LEVEL if name in tree})
    methods = {}
    for key, value in tree.items():
        if key not in METHODS:
            known = sorted([*TOP_LEVEL, *SECTIONS, *METHODS, COMPARE])
            raise ConfigError(f"unknown config key {key!r}; top-level keys and tables are {known} "
                              "(`aflora config --explain` describes each)")
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table of {key}'s options (e.g. {key}.<option>=value), got {value!r}; "
                              f"`aflora config --explain {key}` lists them")
        methods[key] = value
    config = ExperimentConfig(**top, methods=methods)
    validate(config)
    return config


def _build_section(cls: type, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"[{section}] has unknown keys {unknown}; known keys are {sorted(names)}")
    return cls(**{k: coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})


SECAGG_MODULUS = 2**32  # SecAgg+'s modulus_range (Flower's default and maximum): the integer sum wraps around above it


def secagg_checks(config: ExperimentConfig) -> list[tuple[bool, str]]:
    """SecAgg+ settings Flower would refuse (or silently get wrong), named by their config field."""
    secagg, fed = config.secagg, config.federation
    supported = sorted(n for n, c in METHODS.items() if c.supports_secure_aggregation)
    sampled = clients_per_round(fed)
    shares, threshold = secagg.num_shares, secagg.reconstruction_threshold
    return [
        (config.method in supported,
         f"secagg.enabled = true needs a method whose uploads are equal-shaped and aggregated by a weighted sum, so "
         f"that SecAgg+ can add them (supported: {supported}); {config.method} is not: set secagg.enabled = false"),
        (sampled >= 2, f"secagg.enabled = true needs at least 2 clients per round (SecAgg+ sums over several clients), "
                       f"but federation.num_clients × federation.sample_fraction gives {sampled}"),
        (shares > 0 and (shares <= 1 or (shares.is_integer() and shares >= 3)),
         f"secagg.num_shares must be a fraction in (0, 1] or a count ≥ 3, got {shares}"),
        (threshold > 0 and (threshold <= 1 or threshold.is_integer()),
         f"secagg.reconstruction_threshold must be a fraction in (0, 1] or an integer count, got {threshold}"),
        (not (shares > 1 and threshold > 1) or threshold < shares,
         f"secagg.reconstruction_threshold ({threshold:g}) must be below secagg.num_shares ({shares:g})"),
        (secagg.clipping_range > 0, f"secagg.clipping_range must be > 0, got {secagg.clipping_range}"),
        (secagg.quantization_range >= 2, f"secagg.quantization_range must be ≥ 2 levels, got {secagg.quantization_range}"),
        (fed.num_clients * secagg.quantization_range < SECAGG_MODULUS,
         f"secagg.quantization_range × federation.num_clients must stay below 2^32 (SecAgg+'s modulus), or the integer "
         f"sum wraps around; got {secagg.quantization_range} × {fed.num_clients}: lower secagg.quantization_range"),
    ]


def clients_per_round(fed: FederationConfig) -> int:
    """How many clients every round samples: federation.sample_fraction of them, rounded half up, at least one."""
    return max(1, int(fed.sample_fraction * fed.num_clients + 0.5))


def validate(config: ExperimentConfig) -> None:
    """Check ranges and cross-field consistency; every message names the field and what is expected."""
    fed, data, train, engine = config.federation, config.data, config.train, config.engine
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; available methods are {sorted(METHODS)}")
    for name, table in config.methods.items():  # first: the checks below read the method's options
        try:
            method_options(name, table)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
    per_round = clients_per_round(fed)
    checks = [
        (config.seed >= 0, f"seed must be ≥ 0 (numpy's generators take no negative seeds), got {config.seed}"),
        (config.rounds >= 1, f"rounds must be ≥ 1, got {config.rounds}"),
        (fed.num_clients >= 1, f"federation.num_clients must be ≥ 1, got {fed.num_clients}"),
        (
            len(fed.client_ranks) == fed.num_clients,
            f"federation.client_ranks has {len(fed.client_ranks)} entries but federation.num_clients is {fed.num_clients}; "
            "give one maximum rank per client",
        ),
        (all(r >= 1 for r in fed.client_ranks), f"federation.client_ranks must all be ≥ 1, got {fed.client_ranks}"),
        (0.0 < fed.sample_fraction <= 1.0, f"federation.sample_fraction must lie in (0, 1], got {fed.sample_fraction}"),
        (1 <= fed.min_replies <= fed.num_clients, f"federation.min_replies must lie in [1, num_clients], got {fed.min_replies}"),
        (fed.min_replies <= per_round,
         f"federation.min_replies = {fed.min_replies} can never be reached: each round samples {per_round} of "
         f"{fed.num_clients} clients (federation.sample_fraction = {fed.sample_fraction:g}); lower federation.min_replies "
         f"to at most {per_round} or raise federation.sample_fraction"),
        (engine.round_timeout > 0 and engine.connect_timeout > 0, "engine timeouts must be > 0 seconds"),
        (config.privacy.clip_norm >= 0 and config.privacy.noise_multiplier >= 0,
         "privacy.clip_norm and privacy.noise_multiplier must be ≥ 0"),
        (0 < config.privacy.delta < 1, f"privacy.delta must lie in (0, 1), got {config.privacy.delta}"),
        (not config.privacy.clip_norm or METHODS[config.method].supports_dp,
         f"privacy.clip_norm > 0 needs a method whose uploads are its whole update and whose aggregate is a weighted sum "
         f"(supported: {sorted(n for n, c in METHODS.items() if c.supports_dp)}); {config.method} is not"),
        (not ((config.privacy.clip_norm or config.secagg.enabled)
              and getattr(config.method_options(), "column_weights", "client") != "client"),
         f"{config.method}.column_weights = 'rank_partitioned' needs one weight per column, but client-level DP and "
         f"SecAgg+ take one per client: use {config.method}.column_weights = 'client' with privacy.clip_norm or secagg"),
        (bool(fed.memory_mb) == bool(fed.uplink_mb), "federation.memory_mb and federation.uplink_mb go together: give both or neither"),
        *[(not values or len(values) == fed.num_clients,
           f"federation.{name} has {len(values)} entries but federation.num_clients is {fed.num_clients}; give one per client")
          for name, values in (("memory_mb", fed.memory_mb), ("uplink_mb", fed.uplink_mb), ("compute_speed", fed.compute_speed))],
        (all(v > 0 for v in [*fed.memory_mb, *fed.uplink_mb, *fed.compute_speed]), "federation budgets must all be > 0"),
        (train.local_steps >= 1, f"train.local_steps must be ≥ 1, got {train.local_steps}"),
        (train.batch_size >= 1, f"train.batch_size must be ≥ 1, got {train.batch_size}"),
        (train.eval_batch_size >= 1, f"train.eval_batch_size must be ≥ 1, got {train.eval_batch_size}"),
        (train.lr > 0, f"train.lr must be > 0, got {train.lr}"),
        (train.weight_decay >= 0, f"train.weight_decay must be ≥ 0, got {train.weight_decay}"),
        (train.max_grad_norm >= 0, f"train.max_grad_norm must be ≥ 0 (0 = no clipping), got {train.max_grad_norm}"),
        (config.server.steps >= 0, f"server.steps must be ≥ 0, got {config.server.steps}"),
        (config.server.lr > 0, f"server.lr must be > 0, got {config.server.lr}"),
        (config.server.batch_size >= 1, f"server.batch_size must be ≥ 1, got {config.server.batch_size}"),
        (data.partition in PARTITION_SCHEMES,
         f"data.partition must be one of {', '.join(PARTITION_SCHEMES)}, got {data.partition!r} (`aflora list` describes them)"),
        (data.labels_per_client >= 1, f"data.labels_per_client must be ≥ 1, got {data.labels_per_client}"),
        (data.dirichlet_alpha > 0, f"data.dirichlet_alpha must be > 0 (e.g. 0.1 strong skew, 100 near IID), got {data.dirichlet_alpha}"),
        (data.epsilon > 0, f"data.epsilon must be > 0 (FedIT's Dolly split uses 0.5), got {data.epsilon}"),
        (0.0 <= data.public_fraction < 1.0, f"data.public_fraction must lie in [0, 1), got {data.public_fraction}"),
        (0.0 <= data.local_test_fraction < 1.0, f"data.local_test_fraction must lie in [0, 1), got {data.local_test_fraction}"),
        (data.public_size >= 0 and data.eval_size >= 0 and data.train_size >= 0, "data sizes must be ≥ 0"),
        (data.final_eval_rows() is not None,
         f"data.final_eval_size must be a number of test rows (e.g. 2000), \"all\" or \"eval_size\", got {data.final_eval_size!r}"),
        (data.max_length >= MIN_MAX_LENGTH, f"data.max_length must be at least {MIN_MAX_LENGTH} tokens, got {data.max_length}"),
        (data.objective in OBJECTIVES, f"data.objective must be {', '.join(OBJECTIVES[:-1])} or {OBJECTIVES[-1]}, got {data.objective!r}"),
        (config.model.precision in PRECISIONS, f"model.precision must be auto, bf16 or fp32, got {config.model.precision!r}"),
        (config.model.attention in ATTENTION_BACKENDS,
         f"model.attention must be {', '.join(ATTENTION_BACKENDS[:-1])} or {ATTENTION_BACKENDS[-1]}, got {config.model.attention!r}"),
        (config.model.device in DEVICES, f"model.device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {config.model.device!r}"),
        (bool(config.model.target_modules), "model.target_modules must name at least one layer"),
        (engine.client_cpus >= 1, f"engine.client_cpus must be ≥ 1, got {engine.client_cpus}"),
        (0 < engine.client_gpus <= 1, f"engine.client_gpus must lie in (0, 1] (a share of one GPU), got {engine.client_gpus}"),
        (min(engine.crash_probability, engine.timeout_probability) >= 0
         and engine.crash_probability + engine.timeout_probability <= 1,
         "engine.crash_probability and engine.timeout_probability must be ≥ 0 and add up to at most 1, got "
         f"{engine.crash_probability} and {engine.timeout_probability}"),
        (engine.threads >= 0, f"engine.threads must be ≥ 0 (0 = engine.client_cpus), got {engine.threads}"),
        (engine.max_in_flight >= 0, f"engine.max_in_flight must be ≥ 0 (0 = automatic), got {engine.max_in_flight}"),
        (all(0 <= c < fed.num_clients for c in engine.fail_clients),
         f"engine.fail_clients must name clients 0 to {fed.num_clients - 1} (federation.num_clients = {fed.num_clients}), "
         f"got {engine.fail_clients}"),
        (engine.fail_from_round >= 1, f"engine.fail_from_round must be ≥ 1 (rounds count from 1), got {engine.fail_from_round}"),
    ]
    if config.secagg.enabled:
        checks += secagg_checks(config)
    checks += [(False, problem) for problem in unknown_backends(config.tracking.backends)]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
