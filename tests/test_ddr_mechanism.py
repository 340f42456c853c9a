"""DDR does what its name says: after one round at the default optimizer and local steps, the kept
dimensions are those the client's data wants (a planted subspace), not those with lucky gradient signs.

The client's task is a linear map whose optimal update lies mostly in known rows S of the shared A, along
the client's own initial B columns: ΔW* = Σ_j w_j b_j a_jᵀ / C², w_j ∈ [0.9, 1.1] on S and 0.2 elsewhere.
It runs through the real client path: AFLoRA's local_job, the training loop's optimisation
(aflora.training.optimize, the optimizers every job gets), AFLoRA's upload with its Eq. 8 pruning.
"""

from __future__ import annotations

import pytest
import torch

from aflora.config import TrainConfig
from aflora.methods.aflora import AFLoRA, AFLoRAOptions
from aflora.methods.base import ClientSpec, TrainSpec, tensor_key
from aflora.training import OptimConfig, optimize

OUT, IN, RANK = 64, 64, 16
PLANTED = [1, 4, 6, 9, 13]
WEAK = 0.2  # the data wants every other direction a little (a consistent, small gradient), the planted 5× more


def regression_batches(target: torch.Tensor, batch_size: int, generator: torch.Generator):
    while True:
        x = torch.randn(batch_size, target.shape[1], generator=generator)
        yield x, x @ target.T


def live(spec: TrainSpec) -> dict[str, dict[str, torch.nn.Parameter]]:
    return {name: {factor: torch.nn.Parameter(getattr(f, factor).clone(), requires_grad=factor in spec.trainable)
                   for factor in ("A", "B", "lam")} for name, f in spec.adapter.items()}


def one_round_of_ddr(options: AFLoRAOptions, seed: int) -> torch.Tensor:
    """The client's next mask after one round on the planted task, at the default train settings."""
    method = AFLoRA(options, module_shapes={"w": (OUT, IN)}, clients=[ClientSpec(0, RANK, 100)], seed=seed)
    method.init_server_state()
    instruction = method.instruct(0, round_=1)
    spec = method.local_job(instruction)
    factors = spec.adapter["w"]
    g = torch.Generator().manual_seed(1000 + seed)
    strength = 0.9 + 0.2 * torch.rand(len(PLANTED), generator=g)
    C2 = float(factors.A[0].pow(2).sum())
    weights = torch.full((RANK,), WEAK)
    weights[PLANTED] = strength
    target = factors.B @ torch.diag(weights) @ factors.A / C2

    params = live(spec)
    p = params["w"]

    def loss_of(batch):
        x, y = batch
        prediction = (x @ p["A"].T * p["lam"]) @ p["B"].T
        return (prediction - y).pow(2).sum(dim=1).mean()

    train = TrainConfig()
    optimize(spec, params, loss_of, regression_batches(target, train.batch_size, g), steps=train.local_steps,
             optim=OptimConfig(lr=train.lr, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm))
    trained = {"w": type(factors)(A=p["A"].detach(), B=p["B"].detach(), lam=p["lam"].detach())}
    return method.upload(instruction, trained, num_examples=100).tensors[tensor_key("next_mask", "w")]


@pytest.mark.parametrize("seed", range(5))
def test_ddr_keeps_the_planted_dimensions_and_prunes_the_rest(seed):
    mask = one_round_of_ddr(AFLoRAOptions(), seed)
    planted = torch.zeros(RANK, dtype=torch.bool)
    planted[PLANTED] = True
    kept_planted = int((mask & planted).sum()) / len(PLANTED)
    pruned_rest = int((~mask & ~planted).sum()) / (RANK - len(PLANTED))
    assert kept_planted >= 0.9, f"DDR pruned planted dimensions: kept {mask.nonzero().flatten().tolist()}"
    assert pruned_rest >= 0.5, f"DDR kept uninformative dimensions: kept {mask.nonzero().flatten().tolist()}"


def test_per_entry_adam_on_lambda_measures_sign_counts_not_information():
    """The old optimiser, kept as an option: every |λ_j| moves by ≈ lr per step whatever its gradient, so
    the planted dimensions do not stand out and Eq. 8 cannot find them (why the default changed)."""
    failures = 0
    for seed in range(5):
        mask = one_round_of_ddr(AFLoRAOptions(lambda_optimizer="adamw"), seed)
        rest = [j for j in range(RANK) if j not in PLANTED]
        failures += int(mask[rest].float().mean() > 0.5 or mask[PLANTED].float().mean() < 0.9)
    assert failures >= 4


def test_outlier_rule_prunes_only_dimensions_far_below_the_mean():
    from aflora.methods.aflora import prune_ranks

    values = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 0.0])
    assert prune_ranks(values, beta=1.0, rule="outlier").tolist() == [True] * 5 + [False]
    sigma = float(values.std(unbiased=False))  # Eq. 8 literally: keep iff ≥ β·σ
    assert prune_ranks(values, beta=1.0).tolist() == [bool(v >= sigma) for v in values]
    assert prune_ranks(values, beta=3.0).tolist() == [False, True, False, False, False, False]  # min_rank keeps the top one
