"""Server aggregation time per method on SmolLM2-135M shapes (q_proj and v_proj of 30 blocks), 10 clients
with the paper's ranks [64,32,16,16,8,8,4,4,4,4]. Uploads are random tensors of the right shapes: aggregation
cost does not depend on their values. FlexLoRA's time includes its dense SVD (as in its original code).

    python bench/server_aggregation.py [--repeats 5] [--methods aflora,flexlora,...]
"""

from __future__ import annotations

import argparse
import copy
import functools

import torch

from aflora.lora.factors import ModuleFactors
from aflora.methods import METHODS, method_options
from aflora.methods.base import ClientSpec

from common import print_table, timed, write_json

HIDDEN, KV, BLOCKS = 576, 192, 30  # SmolLM2-135M
SHAPES = {f"model.layers.{b}.self_attn.{m}": shape
          for b in range(BLOCKS) for m, shape in (("q_proj", (HIDDEN, HIDDEN)), ("v_proj", (KV, HIDDEN)))}
RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
SIZES = [646, 710, 646, 709, 644, 709, 644, 709, 644, 708]  # the default AG News partition


def uploads_for(name: str, generator: torch.Generator):
    method = METHODS[name](method_options(name, {}), module_shapes=SHAPES,
                           clients=[ClientSpec(i, r, n) for i, (r, n) in enumerate(zip(RANKS, SIZES))], seed=0)
    method.init_server_state()
    uploads = []
    for cid in range(len(RANKS)):
        instruction = method.instruct(cid, 1)
        spec = method.local_job(instruction)
        trained = {n: ModuleFactors(A=torch.randn(f.A.shape, generator=generator) if "A" in spec.trainable else f.A,
                                    B=torch.randn(f.B.shape, generator=generator) * 0.01,
                                    lam=None if f.lam is None else torch.randn(f.rank, generator=generator) * 0.01)
                   for n, f in spec.adapter.items()}
        uploads.append(method.upload(instruction, trained, SIZES[cid]))
    return method, uploads


def restore_state(method, state: dict) -> None:
    """Put the method back as it was before the first aggregation (a fresh copy: aggregate may change it)."""
    vars(method).update(copy.deepcopy(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default="aflora,fedit,ffa_lora,flora,flexlora,hetlora,legend")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    results = {}
    for name in args.methods.split(","):
        method, uploads = uploads_for(name, generator)
        restore = functools.partial(restore_state, method, copy.deepcopy(vars(method)))  # the same start every repeat, untimed
        aggregate = functools.partial(method.aggregate, uploads, 1)
        upload_mib = sum(t.numel() * t.element_size() for u in uploads for t in u.tensors.values()) / 2**20
        results[name] = {**timed(aggregate, repeats=args.repeats, setup=restore), "upload_MiB": upload_mib}
    base = results.get("aflora", {}).get("median_s")
    rows = [[name, f"{r['median_s'] * 1000:.1f}", f"{r['min_s'] * 1000:.1f}–{r['max_s'] * 1000:.1f}", f"{r['upload_MiB']:.1f}",
             f"{r['median_s'] / base:.2f}" if base else "-"] for name, r in results.items()]
    print_table("Server aggregation on SmolLM2 shapes, 10 clients (ms)",
                ["method", "median ms", "range ms", "uploads MiB", "× AFLoRA"], rows)
    if "flexlora" in results and base:
        print(f"\nAFLoRA aggregation time ÷ FlexLoRA's (SVD): {base / results['flexlora']['median_s']:.3f}")
    write_json("server_aggregation", {"threads": torch.get_num_threads(), "ranks": RANKS, "results": results})


if __name__ == "__main__":
    main()
