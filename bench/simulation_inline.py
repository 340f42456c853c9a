"""Simulated clients sharing one device without Ray: round time, throughput and device memory through aflora.rounds'
in-process transport.

The GPU machine this project is sometimes lent has no Ray (its wheel is too large to carry there), so this runs the
round loop Flower's engine drives (aflora.rounds.run_round) with `InProcessTransport`: in one process a server
runtime and a client runtime, each with its own base model on the device, and K clients' adapters swapped in turn
onto the client runtime's model (what one simulation worker does). A point `KxW` starts W such processes at once on
the same device, each a federation of K clients: the device load of W Ray workers with engine.client_gpus = 1/W
(each its own base model, training at the same time), but as W independent federations, not one.

Per point: each process's round seconds against the ideal (Σ train seconds + aggregation + server step, from the
round's record), client trainings per second over all W processes (trainings ÷ the span from the first process's
first round to the last one's last), the peak device memory a process allocated (torch.cuda.max_memory_allocated:
both base models, the adapters and activations; 0 on a CPU) and its peak RSS. AFLoRA, rank 16 for every client.

    python bench/simulation_inline.py [--points 1x1,10x1,10x4] [--rounds 2] [--steps 4] [--batch-size 8]
                                      [--max-length 128] [--model smollm2] [--random-init] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import add_model_arguments, model_overrides, print_table, synchronize, write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "POINT "  # a child's result line on stdout


def child(args: argparse.Namespace, clients: int, threads: int) -> None:
    """One federation of `clients` clients in this process; prints its measurements as one JSON line."""
    from aflora.config import load_config
    from aflora.rounds import InProcessTransport, run_round
    from aflora.runtime import ClientRuntime, ServerRuntime

    config = load_config(ROOT / "configs" / "default.toml", [
        f'data.data_dir="{args.data_dir}"', 'data.partition="iid"', f"federation.num_clients={clients}",
        f"federation.client_ranks=[{','.join(['16'] * clients)}]", f"rounds={args.rounds}", f"train.local_steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"data.max_length={args.max_length}", "data.eval_size=16", "server.steps=1",
        f"server.batch_size={args.batch_size}", f"engine.threads={threads}", *model_overrides(args)])
    server, transport = ServerRuntime(config), InProcessTransport(ClientRuntime(config))
    rounds = []
    synchronize()
    started = time.time()
    for round_ in range(1, args.rounds + 1):
        record = run_round(server, transport, round_).record
        ideal = sum(record.train_seconds.values()) + (record.aggregation_seconds or 0) + (record.server_seconds or 0)
        rounds.append({"round": round_, "clients": len(record.clients), "failures": len(record.failures),
                       "round_seconds": record.round_seconds, "ideal_seconds": ideal, "eval_seconds": record.eval_seconds,
                       "overhead_ratio": record.round_seconds / ideal})
    synchronize()
    cuda = torch.cuda.is_available() and next(server.side.host.model.parameters()).is_cuda
    print(MARK + json.dumps({
        "clients": clients, "started": started, "ended": time.time(), "rounds": rounds,
        "device": str(next(transport.client.side.host.model.parameters()).device),
        "precision": str(server.side.autocast),
        "peak_device_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
        "peak_device_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if cuda else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }), flush=True)


def run_point(clients: int, workers: int, args: argparse.Namespace, forwarded: list[str]) -> dict:
    threads = max(1, (os.cpu_count() or 2) // workers)
    command = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--child", str(clients), "--threads", str(threads)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(workers)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate()
        lines = [line[len(MARK):] for line in stdout.splitlines() if line.startswith(MARK)]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"{clients}x{workers}: a process failed ({process.returncode}):\n{stderr[-3000:]}")
        results.append(json.loads(lines[-1]))
    span = max(r["ended"] for r in results) - min(r["started"] for r in results)
    trainings = sum(rnd["clients"] for r in results for rnd in r["rounds"])
    return {"clients": clients, "workers": workers, "threads_per_worker": threads, "span_seconds": span,
            "client_trainings": trainings, "trainings_per_second": trainings / span, "processes": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="1x1,10x1,10x4", help="KxW, comma-separated: W processes of K clients each")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="train.local_steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--name", default="simulation_inline", help="results file name")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    add_model_arguments(parser)
    args = parser.parse_args()
    if args.child:
        child(args, args.child, args.threads)
        return

    forwarded = [f"--rounds={args.rounds}", f"--steps={args.steps}", f"--batch-size={args.batch_size}",
                 f"--max-length={args.max_length}", f"--data-dir={args.data_dir}", f"--model={args.model}",
                 f"--device={args.device}", *(["--random-init"] if args.random_init else [])]
    settings = {"model": args.model, "random_init": args.random_init, "rounds": args.rounds, "steps": args.steps,
                "batch_size": args.batch_size, "max_length": args.max_length}
    points = []
    for text in args.points.split(","):
        clients, _, workers = text.partition("x")
        point = run_point(int(clients), int(workers or 1), args, forwarded)
        points.append(point)
        print(f"{text}: {point['trainings_per_second']:.2f} client trainings/s over {point['span_seconds']:.1f} s", flush=True)
        write_json(args.name, {**settings, "points": points})  # after every point: a run cut short keeps what it measured
    rows = [[p["clients"], p["workers"], p["processes"][0]["device"], f"{p['trainings_per_second']:.2f}",
             " ".join(f"{r['round_seconds']:.2f}/{r['ideal_seconds']:.2f}" for r in p["processes"][0]["rounds"]),
             f"{max(r['peak_device_allocated_mb'] for r in p['processes']):.0f}",
             f"{max(r['peak_rss_mb'] for r in p['processes']):.0f}"] for p in points]
    weights = "random weights" if args.random_init else "trained weights"
    print_table(f"In-process simulation, {args.model} ({weights}), AFLoRA rank 16, {args.rounds} rounds of {args.steps} steps, "
                f"batch {args.batch_size}, ≤{args.max_length} tokens",
                ["clients per process", "processes", "device", "client trainings/s (all)", "round s / ideal s (process 1)",
                 "peak device MB per process", "peak RSS MB per process"], rows)


if __name__ == "__main__":
    main()
