"""Soak: many clients and rounds through `aflora run` with seeded random crashes and timeouts, the server killed
(SIGKILL) once mid-run and resumed, and nothing lost.

Every sampled client of every round must be in results.json, either among the clients that trained or among the
failures with its reason; every injected crash and timeout must be among the failures. And the run must be exactly
the run the surviving replies make: an in-process reference (aflora.rounds with clients in this process) that drops
the clients the Flower run recorded as failed, and only those, ends in the same global state, bit for bit, with
the same record.

CI runs the short version (20 clients × 4 rounds, killed after round 2); the full one (100 clients × 20 rounds, 50
sampled per round, killed after round 10) is `slow`; the README gives its numbers. Both use two simulation workers
(engine.client_cpus = 1 on two cores): a stalled client holds one of them until the round's timeout, so a round
with two stalled clients sends no one else (they are recorded as `not sent`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from aflora.checkpoint import load_checkpoint
from aflora.config import ExperimentConfig, load_config
from aflora.results import RunRecord, load_run
from aflora.rounds import InProcessTransport, TrainReplies, run_rounds
from aflora.runtime import ClientRuntime, ServerRuntime
from aflora.runtime.client import TIMEOUT, injected_fault
from aflora.runtime.server import Outbox

from helpers import kill_run_after_round, record_differences, write_tiny_config_toml

NO_REPLY = "no reply"  # the reason the server gives a sampled client it heard nothing from (ServerRuntime.accept)
NOT_SENT = "not sent"  # ... and the transport one whose message the round's timeout kept from going out


@dataclass(frozen=True)
class Soak:
    clients: int
    rounds: int
    kill_after: int  # the server is killed once this round's checkpoint is on disk
    sample_fraction: float
    seed: int
    round_timeout: float  # what an injected timeout costs: the round waits this long for it
    train_per_label: int  # synthetic rows per label: enough for every client to hold a few
    limit_seconds: float  # the whole soak, both processes, must finish within this

    def overrides(self) -> list[str]:
        ranks = [(8, 4, 2)[k % 3] for k in range(self.clients)]
        return [f"seed={self.seed}", f"rounds={self.rounds}", f"federation.num_clients={self.clients}",
                f"federation.client_ranks={ranks}", f"federation.sample_fraction={self.sample_fraction}",
                "engine.crash_probability=0.08", "engine.timeout_probability=0.02", f"engine.round_timeout={self.round_timeout}",
                "engine.connect_timeout=300", "engine.client_cpus=1",  # two workers on two cores: a stalled client holds one
                "data.eval_size=32"]


# Seeds chosen so that both kinds of fault happen on both sides of the kill (the test checks it).
# SHORT's round timeout must also cover the two simulation workers' cold start in round 1 and again after the resume
# (Ray actor, imports, model): 9-10 s on the 2-core AMD EPYC without bf16, where 10 s failed a CI run's round 1.
SHORT = Soak(clients=20, rounds=4, kill_after=2, sample_fraction=1.0, seed=6, round_timeout=30.0, train_per_label=30,
             limit_seconds=600)
FULL = Soak(clients=100, rounds=20, kill_after=10, sample_fraction=0.5, seed=0, round_timeout=10.0, train_per_label=100,
            limit_seconds=3600)


class ReplayTransport(InProcessTransport):
    """Clients in this process, failing exactly as the Flower run recorded: a client that failed there with a reason
    of its own gets that failure here, one that never answered does not answer, every other one trains."""

    def __init__(self, client: ClientRuntime, failures: dict[int, dict[int, str]]) -> None:
        super().__init__(client)
        self.failures = failures

    def train(self, round_: int, messages: Outbox) -> TrainReplies:
        replies = TrainReplies()
        for instruction, sync in messages:
            reason = self.failures[round_].get(instruction.client_id)
            if reason is None:
                replies.uploads.append(self.train_one(instruction, sync))
            elif not reason.startswith(NO_REPLY):  # a missing reply gets its reason from the server, as there
                replies.failures.append({"client": instruction.client_id, "reason": reason})
        return replies


def run_killed_and_resumed(soak: Soak, folder: Path) -> tuple[ExperimentConfig, Path, float]:
    """`aflora run`, SIGKILLed (its whole process group: server and Ray) after round `kill_after`, then
    `aflora run --resume`; returns the config, the run folder and the wall time of both."""
    config_file = write_tiny_config_toml(folder / "data", *soak.overrides(), train_per_label=soak.train_per_label)
    out = folder / "out"
    started = time.monotonic()
    deadline = started + soak.limit_seconds
    killed_at = kill_run_after_round(config_file, out, soak.kill_after, deadline=deadline)
    assert soak.kill_after <= killed_at < soak.rounds
    resumed = subprocess.run([sys.executable, "-m", "aflora", "run", "--resume", str(out)], capture_output=True, text=True,
                             timeout=max(deadline - time.monotonic(), 1.0))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return load_config(config_file), out, time.monotonic() - started


def failures_by_round(run: dict) -> dict[int, dict[int, str]]:
    return {r["round"]: {f["client"]: f["reason"] for f in r["failures"]} for r in run["rounds"]}


def soak(soak: Soak, folder: Path) -> None:
    config, out, seconds = run_killed_and_resumed(soak, folder)
    run = load_run(out)
    assert [r["round"] for r in run["rounds"]] == list(range(1, soak.rounds + 1))
    failed = failures_by_round(run)

    # Nothing lost: every sampled client trained or failed with a reason, never both, never twice.
    reference_server = ServerRuntime(config)
    injected = {"crash": 0, "timeout": 0, "crash as injected": 0}
    for r in run["rounds"]:
        round_, sampled = r["round"], set(reference_server.sample_clients(r["round"]))
        reasons = [f["reason"] for f in r["failures"]]
        assert len(reasons) == len(failed[round_]) and all(reasons), r["failures"]
        assert set(r["clients"]).isdisjoint(failed[round_]) and set(r["clients"]) | set(failed[round_]) == sampled, r
        for client in sorted(sampled):
            fault = injected_fault(config, client, round_)
            if fault is not None:  # every injected fault is a failure: the crash itself, or no answer in time
                injected["timeout" if fault == TIMEOUT else "crash"] += 1
                reason = failed[round_].get(client, "")
                injected["crash as injected"] += f"injected fault ({fault})" in reason
                assert reason.startswith((NO_REPLY, NOT_SENT)) or (fault != TIMEOUT and f"injected fault ({fault})" in reason), \
                    (round_, client, fault, reason)
    assert injected["crash as injected"] > 0 and injected["timeout"] > 0, injected
    print(f"\n{soak}: {seconds:.0f} s for both processes; {sum(len(f) for f in failed.values())} failures recorded "
          f"({injected['crash']} injected crashes, {injected['timeout']} injected timeouts) of "
          f"{sum(len(r['clients']) + len(failed[r['round']]) for r in run['rounds'])} sampled client-rounds")
    assert seconds < soak.limit_seconds

    # The same surviving replies in this process give the same run, bit for bit.
    reference = RunRecord(method=config.method, model=config.model.name, dataset="", num_clients=soak.clients, seed=config.seed,
                          config=config.to_dict(), base_params=reference_server.side.host.base_param_count)
    run_rounds(reference_server, ReplayTransport(ClientRuntime(config), failed), reference, 1, soak.rounds)
    by_client = lambda rounds: [dict(r, failures=sorted(r["failures"], key=lambda f: f["client"])) for r in rounds]  # noqa: E731
    expected = reference.to_json()
    differences = record_differences({"initial": expected["initial"], "rounds": by_client(expected["rounds"]),
                                      "final_eval": expected["final_eval"]},
                                     {"initial": run["initial"], "rounds": by_client(run["rounds"]), "final_eval": run["final_eval"]})
    assert not differences, "\n".join(differences[:20])
    state = load_checkpoint(out)[0]
    assert state["round"] == soak.rounds
    method = vars(reference_server.method)
    for name in ("A_global", "B_global"):
        assert state["method"][name].keys() == method[name].keys()
        assert all(torch.equal(state["method"][name][m], method[name][m]) for m in method[name]), name
    assert all(torch.equal(state["method"]["masks"][c][m], mask) for c, masks in method["masks"].items() for m, mask in masks.items())


@pytest.mark.flower
def test_a_short_soak_loses_nothing_and_equals_the_run_of_its_surviving_replies(tmp_path):
    soak(SHORT, tmp_path)


@pytest.mark.slow
@pytest.mark.flower
def test_the_full_soak_loses_nothing_and_equals_the_run_of_its_surviving_replies(tmp_path):
    soak(FULL, tmp_path)
