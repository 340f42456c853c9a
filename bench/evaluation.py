"""Evaluation throughput: scoring test rows with the shared prompt prefix computed once, against scoring every
row whole (aflora's evaluation before the prefix was reused), side by side in one run.

Same model (SmolLM2-135M-Instruct), same rows (a seeded sample of AG News's test set, the Table II prompts),
same batch size (`train.eval_batch_size`), same precision; blocks of the two alternate so drift in machine
load hits both alike. Also counted: rows one way scores right and the other wrong (float rounding at near-ties:
the prefix's keys and values come from a 1-row forward instead of each padded batch's).

    python bench/evaluation.py [--rows 200] [--blocks 3] [--data-dir ../shared/data]
                               [--model smollm2] [--random-init] [--device auto|cpu|cuda]

With --random-init the accuracies mean nothing (random weights): only the speed and the agreement count.
"""

from __future__ import annotations

import argparse
import random
import time

from aflora.config import load_config
from aflora.encoding import shared_prefix
from aflora.evaluation import score_classification
from aflora.runtime import ModelSide, prepare_workload

from common import add_model_arguments, model_overrides, print_table, synchronize, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=3, help="alternating timed blocks per way (one more warms up)")
    parser.add_argument("--data-dir", default="../shared/data")
    add_model_arguments(parser)
    args = parser.parse_args()

    config = load_config(None, [f'data.data_dir="{args.data_dir}"', 'data.partition="iid"', "federation.num_clients=1",
                                "federation.client_ranks=[16]", *model_overrides(args)])
    workload = prepare_workload(config)
    side = ModelSide(workload)
    test = workload.bundle.test
    picked = random.Random(0).sample(range(len(test)), min(args.rows, len(test)))
    rows = side.encode([test[i] for i in picked])
    settings = dict(label_token_ids=side.encoder.label_token_ids, batch_size=config.train.eval_batch_size, pad_id=side.pad_id,
                    autocast_dtype=side.autocast)

    seconds = {"whole rows": 0.0, "shared prefix once": 0.0}
    outcomes = {}
    for block in range(args.blocks + 1):  # block 0 warms both up and is not counted
        for name, reuse in (("whole rows", False), ("shared prefix once", True)):
            synchronize()
            start = time.perf_counter()
            outcomes[name] = score_classification(side.host, rows, reuse_prefix=reuse, **settings)
            synchronize()
            if block:
                seconds[name] += time.perf_counter() - start
    scored = args.blocks * len(rows)
    results = {name: {"seconds": s, "rows_per_second": scored / s, "accuracy": outcomes[name].metrics()["accuracy"]}
               for name, s in seconds.items()}
    differing = sum(a != b for a, b in zip(outcomes["whole rows"].correct, outcomes["shared prefix once"].correct))
    ratio = results["shared prefix once"]["rows_per_second"] / results["whole rows"]["rows_per_second"]
    prefix, mean_length = len(shared_prefix(rows)), sum(len(r.input_ids) for r in rows) / len(rows)
    device = next(side.host.model.parameters()).device
    weights = "random weights: accuracy means nothing" if config.model.random_init else "trained weights"
    print_table(f"Evaluation, {config.model.name} ({weights}) on {device}, {len(rows)} AG News test rows, "
                f"batch {config.train.eval_batch_size}, {side.autocast or 'float32'}",
                ["way", "rows/s", "accuracy"], [[n, f"{r['rows_per_second']:.1f}", f"{r['accuracy']:.3f}"] for n, r in results.items()])
    print(f"\nshared prefix once ÷ whole rows: {ratio:.2f}×   (shared prefix {prefix} of {mean_length:.1f} tokens per row on "
          f"average; rows scored right by one way and wrong by the other: {differing})")
    write_json("evaluation", {"model": config.model.name, "random_init": config.model.random_init, "device": str(device),
                              "rows": len(rows), "blocks": args.blocks, "batch_size": config.train.eval_batch_size,
                              "precision": str(side.autocast), "shared_prefix_tokens": prefix, "mean_row_tokens": mean_length,
                              "results": results, "speedup": ratio, "rows_with_differing_outcome": differing})


if __name__ == "__main__":
    main()
