"""Simulated clients: peak memory for 1 to 1,000 clients, and what the engine costs between them.

Each point is a real `aflora run` (Flower's simulation engine, SmolLM2, AFLoRA) in its own process group;
a sampler adds up the resident memory of every process in the group (the run, Ray's workers and daemons)
every 0.2 s and keeps the peak. Clients train very little (1 step of 2 × 32 tokens) so that 100 clients
fit in minutes: memory is dominated by the base model either way, and a short step makes engine overhead
per client stand out rather than hide behind compute.

A point is `K` clients, all trained every round, or `K@f`: K clients of which federation.sample_fraction = f
are sampled each round (1000@0.1: 100 a round). Memory should follow the sampled clients, not K: the server
keeps per client its masks and counters, per sampled client its reply until aggregation. Round time should be
linear in the sampled clients: the table divides it, and the engine's share of it (round − ideal), by them.
The per-round columns give rounds 1, 2, ... in turn: after round 1 DDR has pruned the clients that
trained, so a round of fresh clients (most of 1000@0.1's) carries larger messages than one of pruned ones.

Engine overhead per round = round_seconds / (Σ_k train_seconds_k / workers + aggregation + server step),
from the run's own results.json; 1.00 would mean no time at all between clients.

    python bench/simulation.py [--clients 1,10,100,1000@0.1] [--rounds 2] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from common import print_table, write_json

ROOT = Path(__file__).resolve().parent.parent


def tree_rss(root: psutil.Process) -> tuple[int, int, str]:
    """(Σ RSS over the process and its descendants, the largest single RSS in bytes, that process's name)."""
    sizes = []
    for process in [root, *root.children(recursive=True)]:
        try:
            name = "aflora run (server)" if process.pid == root.pid else " ".join(process.cmdline()[:1] or [process.name()])
            sizes.append((process.memory_info().rss, name[-40:]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    largest = max(sizes, default=(0, ""))
    return sum(size for size, _ in sizes), largest[0], largest[1]


def parse_point(text: str) -> tuple[int, float]:
    """'100' -> (100, 1.0); '1000@0.1' -> (1000, 0.1)."""
    clients, _, fraction = text.partition("@")
    return int(clients), float(fraction or 1.0)


def run_point(clients: int, sample_fraction: float, rounds: int, data_dir: str, out: Path, workers: int,
              max_in_flight: int) -> dict:
    overrides = {
        "federation.num_clients": clients,
        "federation.sample_fraction": sample_fraction,
        "federation.client_ranks": "[" + ",".join(["16"] * clients) + "]",
        "data.partition": '"iid"',
        "rounds": rounds,
        "train.local_steps": 1,
        "train.batch_size": 2,
        "data.max_length": 32,
        "data.eval_size": 32,
        "server.steps": 1,
        "server.batch_size": 2,
        "engine.client_cpus": max(1, (psutil.cpu_count() or 2) // workers),
        "engine.max_in_flight": max_in_flight,
    }
    command = [sys.executable, "-m", "aflora", "run", "--config", str(ROOT / "configs" / "default.toml"), "--out", str(out),
               "--data-dir", data_dir, *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    root = psutil.Process(process.pid)
    peak = {"total": 0, "largest": 0, "largest_name": ""}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, largest, name = tree_rss(root)
            peak["total"] = max(peak["total"], total)
            if largest > peak["largest"]:
                peak["largest"], peak["largest_name"] = largest, name
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    _, stderr = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{clients} clients: aflora run failed ({process.returncode}):\n{stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    overheads = []
    for r in results["rounds"]:
        compute = sum(r["train_seconds"].values()) / workers + (r["aggregation_seconds"] or 0) + (r["server_seconds"] or 0)
        sampled = len(set(r["clients"]) | {f["client"] for f in r["failures"]})  # replied or failed
        ranks = list(r["ranks"].values())  # each client's rank this round, mean over modules: DDR prunes after round 1
        overheads.append({"round": r["round"], "sampled": sampled, "mean_rank": sum(ranks) / max(len(ranks), 1),
                          "round_seconds": r["round_seconds"], "ideal_seconds": compute, "overhead_ratio": r["round_seconds"] / compute})
    return {"clients": clients, "sample_fraction": sample_fraction, "sampled_per_round": overheads[0]["sampled"],
            "peak_rss_total_mb": peak["total"] / 2**20, "peak_rss_largest_mb": peak["largest"] / 2**20,
            "largest_process": peak["largest_name"], "wall_seconds": time.perf_counter() - started, "rounds": overheads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,10,100,1000@0.1",
                        help="points, comma-separated: K clients, or K@f with federation.sample_fraction f")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="parallel simulated clients (cores / engine.client_cpus)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--max-in-flight", type=int, default=0, help="engine.max_in_flight (0: aflora's default)")
    parser.add_argument("--name", default="simulation", help="results file name")
    args = parser.parse_args()

    points = []
    with tempfile.TemporaryDirectory() as folder:
        for text in args.clients.split(","):
            clients, fraction = parse_point(text)
            point = run_point(clients, fraction, args.rounds, args.data_dir, Path(folder) / f"c{clients}_{fraction:g}", args.workers,
                              args.max_in_flight)
            points.append(point)
            print(f"{text} clients: peak {point['peak_rss_total_mb']:.0f} MB, {point['wall_seconds']:.0f} s", flush=True)
    base = points[0]["peak_rss_total_mb"]
    rows = [[p["clients"], p["sampled_per_round"], f"{p['peak_rss_total_mb']:.0f}", f"{p['peak_rss_total_mb'] / base:.2f}",
             f"{p['peak_rss_largest_mb']:.0f} ({p['largest_process']})",
             " ".join(f"{r['mean_rank']:.1f}" for r in p["rounds"]),
             " ".join(f"{r['round_seconds']:.1f}/{r['ideal_seconds']:.1f}" for r in p["rounds"]),
             " ".join(f"{r['overhead_ratio']:.2f}" for r in p["rounds"]),
             " ".join(f"{r['round_seconds'] / r['sampled']:.3f}" for r in p["rounds"]),
             " ".join(f"{(r['round_seconds'] - r['ideal_seconds']) / r['sampled']:.3f}" for r in p["rounds"])] for p in points]
    in_flight = args.max_in_flight or f"auto ({2 * args.workers})"
    print_table(f"Simulation, SmolLM2, AFLoRA rank 16, {args.rounds} rounds, {args.workers} worker(s), max_in_flight {in_flight}",
                ["clients", "sampled per round", "peak RSS MB (all processes)", f"÷ {points[0]['clients']} client(s)",
                 "largest process MB", "mean rank, per round", "round s / ideal s", "round ÷ ideal", "round s ÷ sampled",
                 "(round − ideal) s ÷ sampled"], rows)
    write_json(args.name, {"rounds": args.rounds, "workers": args.workers, "max_in_flight": args.max_in_flight, "points": points})


if __name__ == "__main__":
    main()
