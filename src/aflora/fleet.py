"""The fleet clock: a run's time and traffic as a heterogeneous fleet of devices would see them (docs/fleet.md).

A simulation trains every client on the same machine, so its seconds say nothing about a fleet of phones and
laptops. Instead each client's round is timed from the work it did, as results.json records it, on the device
class it is assigned:

    device_classes     client k -> its device class, by its budget (a bigger budget is a stronger device)
    client_rounds      per client that replied: download (its instruction and the base merges it lacks), training
                       FLOPs (aflora.budgets.training_flops) ÷ its FLOP/s, upload; seconds = their sum
    fleet_curve        per round: the slowest replying client's seconds (the server waits for it before it
                       aggregates), then cumulative seconds, uplink bytes and up+down bytes, beside the accuracy
    reach_target       the first round (0 = the base model) whose accuracy reaches a target: its time and bytes

Everything is a pure function of a results.json dict (with its config), so it also times runs recorded before
aflora kept every field it uses; what it then assumes is listed in the curve's `fallbacks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .budgets import training_flops

MBIT = 1e6 / 8  # bytes per Mbit
TARGET_SHARE = 0.95  # default target: this share of the best entry's final accuracy


@dataclass(frozen=True)
class DeviceClass:
    """One kind of device: its sustained training throughput and its link."""

    name: str
    tflops: float  # sustained training throughput, 10¹² FLOP/s (well below the chip's peak)
    uplink_mbit_s: float
    downlink_mbit_s: float

    def seconds(self, flops: float, uplink_bytes: float, downlink_bytes: float) -> float:
        """Download, train, upload, one after the other."""
        return (downlink_bytes / (self.downlink_mbit_s * MBIT) + flops / (self.tflops * 1e12)
                + uplink_bytes / (self.uplink_mbit_s * MBIT))


@dataclass(frozen=True)
class Fleet:
    name: str
    classes: tuple[DeviceClass, ...]  # weakest first
    summary: str


# Orders of magnitude, not measurements (docs/fleet.md, "The fleet", says where each comes from).
PHONE = DeviceClass("phone", tflops=0.1, uplink_mbit_s=10, downlink_mbit_s=50)
LAPTOP = DeviceClass("laptop", tflops=0.5, uplink_mbit_s=40, downlink_mbit_s=80)
EDGE_GPU = DeviceClass("edge GPU", tflops=2.0, uplink_mbit_s=100, downlink_mbit_s=300)
FLEETS = {fleet.name: fleet for fleet in (
    Fleet("mixed", (PHONE, LAPTOP, EDGE_GPU), "phones, laptops and edge GPUs, assigned by budget"),
    Fleet("phones", (PHONE,), "every client a phone (no device heterogeneity, for contrast)"),
)}
DEFAULT_FLEET = "mixed"


def fleet_named(name: str) -> Fleet:
    if name not in FLEETS:
        raise ValueError(f"unknown fleet {name!r}; the fleets are {sorted(FLEETS)} (docs/fleet.md)")
    return FLEETS[name]


def device_classes(fleet: Fleet, federation: Mapping[str, Any]) -> list[DeviceClass]:
    """Client k's device class from its budget (federation.memory_mb where given, else federation.client_ranks):
    class ⌊C · (clients with a smaller budget) / n⌋ of the C classes, weakest first. Equal budgets share a class;
    the same client gets the same device whichever method runs."""
    budgets = list(federation.get("memory_mb") or federation["client_ranks"])[: federation["num_clients"]]
    count = len(fleet.classes)
    return [fleet.classes[count * sum(b < mine for b in budgets) // len(budgets)] for mine in budgets]


@dataclass(frozen=True)
class ClientRound:
    """One replying client's round on its device."""

    client: int
    device: DeviceClass
    flops: float
    uplink_bytes: int
    downlink_bytes: int

    @property
    def seconds(self) -> float:
        return self.device.seconds(self.flops, self.uplink_bytes, self.downlink_bytes)


@dataclass
class FleetCurve:
    """A run on a fleet, indexed by round (0 = the base model, before any round)."""

    rounds: list[int]
    accuracy: list[float | None]
    seconds: list[float]  # cumulative fleet seconds after each round
    uplink_bytes: list[int]  # cumulative, every replying client's upload
    traffic_bytes: list[int]  # cumulative uplink + downlink
    fallbacks: list[str] = field(default_factory=list)  # what was assumed where the record lacks a field


# What the clock assumes for a record made before aflora kept a field (results.json's round records)
FALLBACKS = {
    "train_tokens": "tokens = local_steps · batch_size · max_length (an upper bound)",
    "backward_fraction": "backward through every block",
    "instruction_bytes": "downlink not counted",
}


def client_rounds(run: Mapping[str, Any], devices: Sequence[DeviceClass], fallbacks: set[str]) -> list[list[ClientRound]]:
    """Every round's replying clients as their devices see them. A client downloads, before it trains, its
    instruction and every base merge since the round it last trained in (all of them the first time)."""
    config = run["config"]
    assumed_tokens = config["train"]["local_steps"] * config["train"]["batch_size"] * config["data"]["max_length"]
    merge_bytes = {r["round"]: r.get("merge_bytes", 0) for r in run["rounds"]}
    first_missing: dict[int, int] = {}  # client -> the first round whose merge it has not downloaded
    rounds = []
    for r in run["rounds"]:
        fallbacks.update(assumption for name, assumption in FALLBACKS.items() if name not in r)
        clients = []
        for key, trained in r["trained_params"].items():
            cid = int(key)
            owed = sum(merge_bytes.get(past, 0) for past in range(first_missing.get(cid, 1), r["round"]))
            first_missing[cid] = r["round"]
            tokens = r.get("train_tokens", {}).get(key, assumed_tokens)
            flops = training_flops(run["base_params"], trained, tokens, r.get("backward_fraction", {}).get(key, 1.0))
            clients.append(ClientRound(cid, devices[cid], flops, r["uplink_bytes"][key],
                                       r.get("instruction_bytes", {}).get(key, 0) + owed))
        rounds.append(clients)
    return rounds


def round_seconds(clients: Sequence[ClientRound]) -> float:
    """The round ends when its slowest replying client has uploaded (failed clients are not waited for here)."""
    return max((c.seconds for c in clients), default=0.0)


def fleet_curve(run: Mapping[str, Any], fleet: Fleet) -> FleetCurve | None:
    """The run's cumulative fleet time and traffic after each round; None for a record without per-client
    trained parameters or a config (nothing to time)."""
    if "config" not in run or "base_params" not in run or any("trained_params" not in r for r in run["rounds"]):
        return None
    fallbacks: set[str] = set()
    curve = FleetCurve([0], [run.get("initial", {}).get("accuracy")], [0.0], [0], [0])
    for r, clients in zip(run["rounds"], client_rounds(run, device_classes(fleet, run["config"]["federation"]), fallbacks)):
        up = sum(c.uplink_bytes for c in clients)
        curve.rounds.append(r["round"])
        curve.accuracy.append(r.get("accuracy"))
        curve.seconds.append(curve.seconds[-1] + round_seconds(clients))
        curve.uplink_bytes.append(curve.uplink_bytes[-1] + up)
        curve.traffic_bytes.append(curve.traffic_bytes[-1] + up + sum(c.downlink_bytes for c in clients))
    curve.fallbacks = sorted(fallbacks)
    return curve


@dataclass(frozen=True)
class Reached:
    round: int
    seconds: float
    uplink_bytes: int
    traffic_bytes: int


def reach_target(curve: FleetCurve, target: float) -> Reached | None:
    """The first round whose evaluated accuracy is at least `target`, with the fleet time and bytes spent by
    then; None when no round reaches it."""
    for i, accuracy in enumerate(curve.accuracy):
        if accuracy is not None and accuracy >= target:
            return Reached(curve.rounds[i], curve.seconds[i], curve.uplink_bytes[i], curve.traffic_bytes[i])
    return None


def default_target(final_accuracies: Sequence[float]) -> float:
    """TARGET_SHARE of the best of the compared entries' (mean) final accuracies."""
    return TARGET_SHARE * max(final_accuracies)
