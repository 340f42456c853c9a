"""`aflora compare`'s fleet table: each entry's time and traffic to a target accuracy on a simulated device fleet
(aflora.fleet, docs/fleet.md), over seeds, and each entry against the reference entry.

    fleet_settings    --fleet / --target-accuracy (or [compare] fleet / target_accuracy), checked before any run
    fleet_rows        label -> FleetRow: each seed's fleet curve and the first round at the target; mean ± std over
                      the seeds that reached it; against the reference: its fleet time ÷ the entry's (how many times
                      sooner), the entry's bytes ÷ its bytes
    fleet_markdown    comparison.md's second table and its notes (comparison.csv's columns: compare_table.write_csv)

Pure functions of results.json dicts, like compare_table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from .errors import ConfigError
from .fleet import (
    DEFAULT_FLEET,
    FLEETS,
    TARGET_SHARE,
    Fleet,
    FleetCurve,
    Reached,
    default_target,
    device_classes,
    fleet_curve,
    reach_target,
)
from .intervals import Stat

MIB = 2**20


@dataclass(frozen=True)
class FleetSettings:
    fleet: str = DEFAULT_FLEET
    target_accuracy: float | None = None  # None: TARGET_SHARE of the best entry's mean final accuracy


def fleet_settings(fleet: str | None, target_accuracy: float | None, *, source: str = "--") -> FleetSettings:
    """Checked settings; `source` names where they came from in messages ("--" for the options, or "<file>: [compare] ")."""
    names = ("fleet", "target-accuracy") if source == "--" else ("fleet", "target_accuracy")
    if fleet is not None and fleet not in FLEETS:
        raise ConfigError(f"{source}{names[0]} {fleet!r} is not a fleet; the fleets are {sorted(FLEETS)} (docs/fleet.md)")
    if target_accuracy is not None and not (type(target_accuracy) in (int, float) and 0 < target_accuracy <= 1):
        raise ConfigError(f"{source}{names[1]} must be an accuracy in (0, 1], e.g. 0.8 for 80 %; got {target_accuracy!r}")
    return FleetSettings(fleet or DEFAULT_FLEET, None if target_accuracy is None else float(target_accuracy))


@dataclass(frozen=True)
class Measure:
    key: str  # comparison.csv writes <key>_mean, _std, _ci95_low, _ci95_high
    title: str
    spec: str
    value: Callable[[FleetCurve, Reached | None], float | None]  # one seed's value (None: target not reached)
    to_target: bool = True  # False: the whole run, shown whatever the target


MEASURES = [
    Measure("target_round", "round", ".1f", lambda curve, hit: hit.round if hit else None),
    Measure("target_fleet_seconds", "fleet s to target", ".1f", lambda curve, hit: hit.seconds if hit else None),
    Measure("target_uplink_mib", "uplink MiB to target", ".3f", lambda curve, hit: hit.uplink_bytes / MIB if hit else None),
    Measure("target_traffic_mib", "up+down MiB to target", ".3f", lambda curve, hit: hit.traffic_bytes / MIB if hit else None),
    Measure("run_fleet_seconds", "fleet s, whole run", ".1f", lambda curve, hit: curve.seconds[-1], to_target=False),
    Measure("run_traffic_mib", "up+down MiB, whole run", ".3f", lambda curve, hit: curve.traffic_bytes[-1] / MIB, to_target=False),
]
# Against the reference: time as "how many times sooner" (its ÷ ours), bytes as a share of its bytes (ours ÷ its)
RATIOS = {"speedup": "target_fleet_seconds", "uplink_ratio": "target_uplink_mib", "traffic_ratio": "target_traffic_mib"}


@dataclass
class FleetRow:
    fleet: str
    target: float | None  # None where the task has no accuracy (instruction tuning): whole-run numbers only
    seeds: int
    reached: int  # seeds whose run reached the target
    stats: dict[str, Stat]  # Measure key -> over seeds (to-target measures: over the seeds that reached it)
    devices: str = ""  # which clients are which device class, e.g. "phone (...): clients 6, 7; ..."
    fallbacks: list[str] = field(default_factory=list)  # "<what the clock assumed> (seed 0, 1)"
    vs_reference: dict[str, float] = field(default_factory=dict)  # RATIOS key -> value, where both reached on every seed


def fleet_rows(runs: dict[str, list[dict[str, Any]]], settings: FleetSettings, reference: str | None = None) -> dict[str, FleetRow] | None:
    """label -> its FleetRow; None when some run lacks what the clock reads (a config and per-client trained parameters)."""
    fleet = FLEETS[settings.fleet]
    curves: dict[str, list[FleetCurve]] = {}
    for label, seeds in runs.items():
        timed = [fleet_curve(run, fleet) for run in seeds]
        if any(curve is None for curve in timed):
            return None
        curves[label] = [curve for curve in timed if curve is not None]
    target = settings.target_accuracy
    finals = {label: [run["final"].get("accuracy") for run in seeds] for label, seeds in runs.items()}
    if target is None and all(a is not None for values in finals.values() for a in values):
        target = default_target([fmean(values) for values in finals.values()])
    rows = {}
    for label, per_seed in curves.items():
        hits = [reach_target(curve, target) if target is not None else None for curve in per_seed]
        stats = {m.key: Stat.of([m.value(curve, hit) for curve, hit in zip(per_seed, hits)]) for m in MEASURES}
        seeds_by_note: dict[str, list[str]] = {}
        for run, curve in zip(runs[label], per_seed):
            for note in curve.fallbacks:
                seeds_by_note.setdefault(note, []).append(str(run["seed"]))
        fallbacks = [f"{note} (seed {', '.join(seeds)})" for note, seeds in sorted(seeds_by_note.items())]
        rows[label] = FleetRow(settings.fleet, target, len(per_seed), sum(hit is not None for hit in hits), stats,
                               describe_devices(fleet, runs[label][0]["config"]["federation"]), fallbacks)
    if reference is not None:
        for label, row in rows.items():
            row.vs_reference = ratios(row, rows[reference]) if label != reference else {}
    return rows


def describe_devices(fleet: Fleet, federation: dict[str, Any]) -> str:
    devices = device_classes(fleet, federation)
    return "; ".join(f"{d.name} ({d.tflops:g} TFLOP/s, {d.uplink_mbit_s:g}/{d.downlink_mbit_s:g} Mbit/s up/down): clients "
                     + ", ".join(str(k) for k, device in enumerate(devices) if device == d) for d in fleet.classes if d in devices)


def ratios(row: FleetRow, reference: FleetRow) -> dict[str, float]:
    """The reference's mean fleet time to the target ÷ this row's, and this row's mean bytes ÷ the reference's;
    only where both reached the target on every seed (a mean over the seeds that did would flatter)."""
    if row.target is None or row.reached < row.seeds or reference.reached < reference.seeds:
        return {}
    out = {}
    for name, key in RATIOS.items():
        ours, theirs = row.stats[key].mean, reference.stats[key].mean
        numerator, denominator = (theirs, ours) if name == "speedup" else (ours, theirs)
        if numerator is not None and denominator:  # 0: reached at round 0 (the base model), nothing to divide by
            out[name] = numerator / denominator
    return out


# ---------------------------------------------------------------------------- comparison.md
def fleet_markdown(labels: list[str], rows: list[FleetRow], reference: str) -> list[str]:
    """The fleet table, one row per entry, and what it assumed."""
    target = rows[0].target
    measures = [m for m in MEASURES if target is not None or not m.to_target]
    titles = ["entry", *(["reached"] if target is not None else []), *(m.title for m in measures)]
    if reference and target is not None:
        titles += [f"time vs `{reference}`", f"up+down vs `{reference}`"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] + ["---:"] * (len(titles) - 1)) + "|"]
    for label, row in zip(labels, rows):
        cells = [f"`{label}`", *([f"{row.reached}/{row.seeds}"] if target is not None else []),
                 *(row.stats[m.key].format(m.spec) if row.reached or not m.to_target else "not reached" for m in measures)]
        if reference and target is not None:
            vs = row.vs_reference
            cells += (["—", "—"] if label == reference else  # the reference itself
                      [pace(vs["speedup"]) if "speedup" in vs else "", f"{vs['traffic_ratio']:.2f}×" if "traffic_ratio" in vs else ""])
        lines.append("| " + " | ".join(cells) + " |")
    return ["Time and traffic on a simulated device fleet (docs/fleet.md):", "", *lines, "",
            *fleet_notes(labels, rows, reference)]


def pace(speedup: float) -> str:
    return f"{speedup:.2f}× sooner" if speedup >= 1 else f"{1 / speedup:.2f}× later"


def against_reference(label: str, vs: dict[str, float], reference: str) -> str:
    """e.g. "`legend` reaches the target 1.90× sooner than `fedit`, with 0.55× its uplink and 0.58× its up+down traffic." """
    spent = " and ".join(f"{vs[name]:.2f}× its {what}" for name, what in
                         (("uplink_ratio", "uplink"), ("traffic_ratio", "up+down traffic")) if name in vs)
    return f"`{label}` reaches the target {pace(vs['speedup'])} than `{reference}`" + (f", with {spent}." if spent else ".")


def fleet_notes(labels: list[str], rows: list[FleetRow], reference: str) -> list[str]:
    fleet = FLEETS[rows[0].fleet]
    notes = [f"Fleet `{fleet.name}`, {fleet.summary}: {rows[0].devices}. A client's round = download (its instruction and the base "
             "merges it lacks) + its training FLOPs ÷ its FLOP/s + upload; a round lasts as long as its slowest replying "
             "client (server steps and failed clients not counted). Times and bytes are cumulative from round 1."]
    target = rows[0].target
    if target is not None:
        notes += ["", f"Target: accuracy ≥ {target:.4f} on a round's evaluation rows (data.eval_size), the first round "
                  "that reaches it (0 = the base model); by default "
                  f"{TARGET_SHARE * 100:g} % of the best entry's mean final accuracy (--target-accuracy sets it). Mean ± std over the "
                  "seeds that reached it; 'time vs' is the reference's fleet time to the target ÷ the entry's, 'up+down vs' "
                  "the entry's bytes ÷ the reference's, both only where every seed of both reached it."]
        sentences = [against_reference(label, row.vs_reference, reference) for label, row in zip(labels, rows)
                     if label != reference and "speedup" in row.vs_reference]
        notes += ["", *(f"- {sentence}" for sentence in sentences)] if sentences else []
    assumed = [f"`{label}`: {', '.join(row.fallbacks)}" for label, row in zip(labels, rows) if row.fallbacks]
    if assumed:
        notes += ["", "Recorded before aflora kept every field the clock reads, so assumed (an entry's times and bytes are "
                  "then comparable only with entries that assumed the same): " + "; ".join(assumed) + "."]
    return notes
