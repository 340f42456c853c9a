"""A process's model side: one shared base model with its adapter host, prompt encoder and method.

Client and server runtimes each hold one; simulated clients are adapters swapped onto it, never copies.
Every model side computes with the run's fixed number of torch threads (`pin_threads`), whichever process
and thread it lives in: that is what makes a resumed run and a deployed federation equal the simulation bit for bit.
"""

from __future__ import annotations

import torch

from ..budgets import LocalWorkload
from ..config import ExperimentConfig
from ..encoding import Encoded, PromptEncoder, training_batches
from ..evaluation import ClassificationOutcomes, evaluate_lm_loss, score_classification
from ..lora.factors import Adapter
from ..lora.host import AdapterHost
from ..methods import FederatedMethod, TrainSpec, method_class
from ..models import load_model, model_device
from ..training import OptimConfig, is_deterministic_in_training, train_adapter
from .workload import Workload


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


def run_threads(config: ExperimentConfig) -> int:
    """torch's intra-op threads in every process of a run: engine.threads, else engine.client_cpus."""
    return config.engine.threads or config.engine.client_cpus


def pin_threads(threads: int) -> None:
    """Compute with exactly `threads` threads in this thread: torch's, OpenMP's and MKL's count, MKL's dynamic
    adjustment off.

    Left at torch's default, the count depends on where the code runs: a Ray worker gets OMP_NUM_THREADS =
    engine.client_cpus, a deployed client worker or the `flwr-serverapp` process the machine's cores, and MKL keeps its
    count per thread. A reduction split over a different number of threads adds in a different order (a sum of
    37k floats already differs in its last bits between 1 and 2 threads), and Adam turns last-bit differences
    in small gradients into visible ones. Called where work starts, because OpenMP and MKL take the count per thread."""
    torch.set_num_threads(threads)


class ModelSide:
    """A process's shared base model with its adapter host, encoder and the method (client or server)."""

    def __init__(self, workload: Workload) -> None:
        config = workload.config
        self.workload = workload
        self.threads = run_threads(config)
        pin_threads(self.threads)
        model, self.tokenizer = load_model(
            config.model.name, cache_dir=config.model.cache_dir or None, seed=config.seed, attention=config.model.attention,
            device=config.model.device, random_init=config.model.random_init,
        )
        model = model.to(model_device(config.model.device))
        self.host = AdapterHost(model, config.model.target_modules)
        self.encoder = PromptEncoder(self.tokenizer, workload.bundle.task, config.data.max_length)
        self.autocast = autocast_dtype(config.model.precision, model)
        self.split_prefix = is_deterministic_in_training(model)  # each batch's shared prompt start once (collate)
        # What ran, for results.json: model.precision = "auto" picks bf16 only where the hardware has it
        self.precision = f"{str(self.autocast).removeprefix('torch.')} autocast" if self.autocast else "float32"
        method = method_class(config.method)
        self.clients = workload.client_specs(method, self.host.footprint())
        self.method: FederatedMethod = method(
            config.method_options(), module_shapes=self.host.module_shapes(), clients=self.clients, seed=config.seed,
            footprint=self.host.footprint(),
            workload=LocalWorkload(config.train.batch_size, config.data.max_length, config.train.local_steps),
        )

    def merge(self, update: Adapter) -> None:
        """W ← W + ΔW of one round's global update (server after its step, clients catching up, a resumed server)."""
        pin_threads(self.threads)
        self.host.merge_into_base(update)

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
        """Accuracy and loss where the task has label words (`encoder`'s, else this side's), else the LM loss."""
        encoder = encoder or self.encoder
        pin_threads(self.threads)
        if encoder.label_token_ids:
            return self.score_rows(examples, adapter, encoder).metrics()
        return evaluate_lm_loss(self.host, examples, **self._evaluation_settings(adapter))

    def score_rows(self, examples: list[Encoded], adapter: Adapter | None, encoder: PromptEncoder) -> ClassificationOutcomes:
        """Each example right or wrong (and its loss), in order: what paired comparisons between methods need."""
        pin_threads(self.threads)
        return score_classification(self.host, examples, label_token_ids=encoder.label_token_ids, **self._evaluation_settings(adapter))

    def _evaluation_settings(self, adapter: Adapter | None) -> dict:
        return dict(batch_size=self.workload.config.train.eval_batch_size, pad_id=self.pad_id, adapter=adapter,
                    autocast_dtype=self.autocast)

    def train(self, spec: TrainSpec, examples: list[Encoded], *, steps: int, batch_size: int, optim: OptimConfig, seed: int,
              on_step=None, objective: str | None = None):
        pin_threads(self.threads)
        return train_adapter(
            self.host,
            spec,
            training_batches(examples, batch_size, self.pad_id, seed=seed, split_prefix=self.split_prefix),
            steps=steps,
            optim=optim,
            objective=objective or self.workload.objective,
            label_token_ids=self.encoder.label_token_ids,
            autocast_dtype=self.autocast,
            on_step=on_step,
        )

