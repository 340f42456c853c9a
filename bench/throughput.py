"""Local training throughput: an aflora client step against a plain PEFT LoRA training loop, side by side.

Three loops: aflora's client step as it runs (each batch's shared prompt start through the model once,
`collate(split_prefix=True)`), the same step on whole rows (aflora before that change), and plain PEFT on whole
rows. Same model (SmolLM2-135M-Instruct), same batches (AG News prompts, batch 8, up to 128 tokens), same
objective (cross-entropy over the label words' logits), same precision (bf16 autocast where supported)
and attention. The plain loop is what a user would write: get_peft_model + AdamW. Blocks of steps of the
loops alternate, so drift in machine load hits both alike. Also measured: the machine's matmul ceiling
(a large bf16 and float32 GEMM) and the fraction of it each loop achieves (4·N·T FLOPs per step: forward
and activation gradients through the N non-embedding parameters for T tokens; frozen weights get none).

    python bench/throughput.py [--steps 6] [--blocks 3] [--rank 16] [--data-dir ../shared/data]
                               [--model smollm2] [--random-init] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model

from aflora.config import load_config
from aflora.encoding import training_batches
from aflora.methods.aflora import AFLoRA, AFLoRAOptions
from aflora.methods.base import ClientSpec
from aflora.models import load_model
from aflora.runtime import ModelSide, prepare_workload
from aflora.training import OptimConfig, autocast_context, batch_loss, train_adapter

from common import add_model_arguments, model_overrides, print_table, synchronize, write_json


def matmul_ceiling(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of a large square GEMM in `dtype` on `device` (the practical peak of this machine)."""
    size = 8192 if device.type == "cuda" else 2048  # a GPU needs a large product to reach its peak
    a, b = torch.randn(size, size, device=device).to(dtype), torch.randn(size, size, device=device).to(dtype)
    a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def plain_peft_steps(model, batches, label_ids, steps: int, rank: int, autocast) -> tuple[float, int]:
    """A user's plain LoRA loop: PEFT adapter, AdamW, the same loss; returns (seconds, tokens)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    synchronize()
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        with autocast_context(model, autocast):
            loss = batch_loss(model, batch, "class_ce", label_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        tokens += batch.num_tokens
    synchronize()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks per loop")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--data-dir", default="../shared/data")
    add_model_arguments(parser)
    args = parser.parse_args()

    config = load_config(None, [f'data.data_dir="{args.data_dir}"', "data.partition=\"iid\"", "federation.num_clients=1",
                                "federation.client_ranks=[16]", *model_overrides(args)])
    workload = prepare_workload(config)
    side = ModelSide(workload)  # aflora's own host (PEFT layers with the Λ variant)
    examples = side.encode([workload.bundle.train[i] for i in workload.client_rows[0][:256]])
    shapes = side.host.module_shapes()
    method = AFLoRA(AFLoRAOptions(), module_shapes=shapes, clients=[ClientSpec(0, args.rank, len(examples))], seed=0)
    method.init_server_state()
    spec = method.local_job(method.instruct(0, 1))

    device = next(side.host.model.parameters()).device
    plain_model, _ = load_model(config.model.name, attention=config.model.attention, device=config.model.device,
                                random_init=config.model.random_init)
    plain_model = plain_model.to(device)
    plain = get_peft_model(plain_model, LoraConfig(r=args.rank, lora_alpha=16, target_modules=config.model.target_modules))
    label_ids = side.encoder.label_token_ids

    timings = {"aflora": [0.0, 0], "aflora, rows whole": [0.0, 0], "peft": [0.0, 0]}
    for block in range(args.blocks + 1):  # block 0 warms every loop up and is not counted
        for name, split in (("aflora", True), ("aflora, rows whole", False)):
            batches = training_batches(examples, 8, side.pad_id, seed=block, split_prefix=split)
            result = train_adapter(side.host, spec, batches, steps=args.steps, optim=OptimConfig(lr=1e-3), objective="class_ce",
                                   label_token_ids=label_ids, autocast_dtype=side.autocast)
            if block:
                timings[name][0] += result.seconds
                timings[name][1] += result.tokens
        seconds, tokens = plain_peft_steps(plain, training_batches(examples, 8, side.pad_id, seed=block), label_ids, args.steps, args.rank,
                                           side.autocast)
        if block:
            timings["peft"][0] += seconds
            timings["peft"][1] += tokens

    non_embedding = sum(p.numel() for n, p in plain_model.named_parameters() if "embed" not in n and "lora" not in n)
    ceilings = {"bf16": matmul_ceiling(torch.bfloat16, device), "fp32": matmul_ceiling(torch.float32, device)}
    ceiling = ceilings["bf16"] if side.autocast == torch.bfloat16 else ceilings["fp32"]
    results = {}
    for name, (seconds, tokens) in timings.items():
        tokens_per_second = tokens / seconds
        results[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens_per_second,
                         "achieved_flops": 4 * non_embedding * tokens_per_second,
                         "ceiling_fraction": 4 * non_embedding * tokens_per_second / ceiling}
    ratio = results["aflora"]["tokens_per_second"] / results["peft"]["tokens_per_second"]
    prefix_ratio = results["aflora"]["tokens_per_second"] / results["aflora, rows whole"]["tokens_per_second"]
    rows = [[name, f"{r['tokens_per_second']:.0f}", f"{r['achieved_flops'] / 1e9:.0f}", f"{100 * r['ceiling_fraction']:.1f}%"]
            for name, r in results.items()]
    weights = "random weights" if config.model.random_init else "trained weights"
    print_table(f"Local training, {config.model.name} ({weights}) on {device}, batch 8, rank {args.rank}, {side.autocast or 'float32'}",
                ["loop", "tokens/s", "GFLOP/s", "of GEMM ceiling"], rows)
    print(f"\naflora ÷ aflora with rows whole tokens/s: {prefix_ratio:.3f}   aflora ÷ plain PEFT: {ratio:.3f}")
    print(f"GEMM ceiling: bf16 {ceilings['bf16'] / 1e9:.0f} GFLOP/s, fp32 {ceilings['fp32'] / 1e9:.0f} GFLOP/s")
    write_json("throughput", {"model": config.model.name, "random_init": config.model.random_init, "device": str(device),
                              "rank": args.rank, "steps_per_block": args.steps, "blocks": args.blocks,
                              "non_embedding_params": non_embedding,
                              "precision": str(side.autocast), "ceilings_flops": ceilings, "results": results, "aflora_over_peft": ratio,
                              "shared_start_once_over_rows_whole": prefix_ratio})


if __name__ == "__main__":
    main()
