"""Does DDR's score |λ_j|² track how much a client's data wants dimension j? (issue: faithful mechanisms)

One AFLoRA client round on the default experiment (SmolLM2-135M, AG News, 2 labels per client), once per
Λ optimizer: 'adamw' (per-entry AdamW, the old default) and 'tensorwise' (one second moment per module's Λ,
the new default). Then, for a few modules, each kept dimension j is zeroed in turn and the rise of the
client's loss on held-out rows of its own partition is measured: an importance of j that does not read Λ's
magnitude. Reported per module: Spearman's rank correlation between |λ_j|² and that rise, and the
fraction of dimensions Eq. 8 keeps.

    python bench/ddr_importance.py --data-dir ../shared/data [--client 2] [--modules 4] [--heldout 32]
"""

from __future__ import annotations

import argparse
import random
import statistics

from aflora.config import load_config
from aflora.lora.factors import ModuleFactors
from aflora.methods.aflora import prune_ranks
from aflora.methods.base import hash_seed
from aflora.runtime import ModelSide, prepare_workload
from aflora.training import OptimConfig

from common import print_table, write_json


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--client", type=int, default=2, help="which client (default 2: rank 16 in the default budgets)")
    parser.add_argument("--modules", type=int, default=4, help="modules measured, spread over the depth")
    parser.add_argument("--heldout", type=int, default=32, help="held-out rows of the client's own partition")
    args = parser.parse_args()
    overrides = [f'data.data_dir="{args.data_dir}"'] if args.data_dir else []
    config = load_config(args.config, overrides)
    workload = prepare_workload(config)
    side = ModelSide(workload)
    rows = list(workload.client_rows[args.client])
    random.Random(hash_seed(config.seed, 99)).shuffle(rows)
    heldout_rows, train_rows = rows[: args.heldout], rows[args.heldout:]
    heldout = side.encode([workload.bundle.train[i] for i in heldout_rows])
    train = side.encode([workload.bundle.train[i] for i in train_rows])
    names = sorted(side.method.module_shapes)
    measured = [names[round(i * (len(names) - 1) / max(args.modules - 1, 1))] for i in range(args.modules)]

    results, rows_out = {}, []
    for optimizer in ("adamw", "tensorwise"):
        method = side.method
        method.options.lambda_optimizer = optimizer
        method.init_server_state()
        spec = method.local_job(method.instruct(args.client, round_=1))
        trained = side.train(spec, train, steps=config.train.local_steps, batch_size=config.train.batch_size,
                             optim=OptimConfig(lr=config.train.lr, weight_decay=config.train.weight_decay,
                                               max_grad_norm=config.train.max_grad_norm),
                             seed=hash_seed(config.seed, 1, args.client)).adapter
        full_loss = side.evaluate(heldout, trained)["loss"]
        per_module = {}
        for name in measured:
            factors = trained[name]
            rises = []
            for j in range(factors.rank):
                lam = factors.lam.clone()
                lam[j] = 0.0
                ablated = {**trained, name: ModuleFactors(A=factors.A, B=factors.B, lam=lam)}
                rises.append(side.evaluate(heldout, ablated)["loss"] - full_loss)
            scores = (factors.lam ** 2).tolist()
            keep = prune_ranks(factors.lam ** 2, method.options.beta, method.options.min_rank, method.options.ddr_rule)
            per_module[name] = {"spearman": spearman(scores, rises), "kept": int(keep.sum()), "rank": factors.rank,
                                "lambda_sq": scores, "loss_rise": rises}
            rows_out.append([optimizer, name, f"{per_module[name]['spearman']:+.3f}", f"{int(keep.sum())}/{factors.rank}"])
        mean = statistics.fmean(m["spearman"] for m in per_module.values())
        results[optimizer] = {"modules": per_module, "mean_spearman": mean, "heldout_loss": full_loss}
        rows_out.append([optimizer, "mean", f"{mean:+.3f}", ""])
    print_table(f"|λ_j|² vs held-out loss rise when j is zeroed (client {args.client}, {args.heldout} held-out rows)",
                ["Λ optimizer", "module", "Spearman ρ", "Eq. 8 keeps"], rows_out)
    write_json("ddr_importance", {"client": args.client, "heldout_rows": args.heldout, "results": results})


if __name__ == "__main__":
    main()
