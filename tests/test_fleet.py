"""The fleet clock (aflora.fleet) and `aflora compare`'s fleet table: FLOPs, device times, the round's straggler,
downloads of missed merges, time and bytes to a target accuracy, checked against computations written out here;
the round record's new fields against what a tiny run's clients and server actually did."""

from __future__ import annotations

import csv
import statistics
import sys
from dataclasses import asdict

import pytest

from aflora.budgets import training_flops
from aflora.cli import main
from aflora.compare import CompareSettings, compare_table
from aflora.compare_fleet import FleetSettings, fleet_settings
from aflora.compare_table import csv_columns, summarize, write_csv, write_markdown
from aflora.config import ConfigError
from aflora.costs import payload_bytes
from aflora.fleet import EDGE_GPU, FLEETS, LAPTOP, PHONE, FleetCurve, Reached, client_rounds, device_classes, fleet_curve, reach_target
from aflora.lora.factors import adapter_tensors
from aflora.lora.host import backward_fraction

from helpers import tiny_config, write_tiny_config_toml

BASE = 10**8  # base-model parameters of the synthetic runs
MIXED = FLEETS["mixed"]
MBIT = 1e6 / 8


def device_seconds(device, flops: float, up: float, down: float) -> float:
    """Written out again here: download at its downlink, FLOPs at its throughput, upload at its uplink."""
    return down / (device.downlink_mbit_s * MBIT) + flops / (device.tflops * 1e12) + up / (device.uplink_mbit_s * MBIT)


def client(trained: int = 1000, up: int = 4000, instruction: int = 2000, tokens: int = 512, fraction: float = 1.0) -> dict:
    return {"trained_params": trained, "uplink_bytes": up, "instruction_bytes": instruction, "train_tokens": tokens,
            "backward_fraction": fraction}


def fleet_run(rounds: list[tuple[float | None, dict[int, dict], int]], *, method: str = "fedit", seed: int = 0,
              initial: float = 0.25, final: float = 0.7, ranks: tuple[int, ...] = (8, 4, 2)) -> dict:
    """A results.json dict with what the clock and the table read; rounds: (accuracy, {client: client(...)}, merge bytes).
    Clients by rank (8, 4, 2) are, on the mixed fleet, an edge GPU, a laptop and a phone."""
    records = [{"round": i, "accuracy": accuracy, "loss": 1.0, "clients": sorted(clients), "merge_bytes": merge,
                **{name: {str(c): fields[name] for c, fields in clients.items()} for name in client()}}
               for i, (accuracy, clients, merge) in enumerate(rounds, 1)]
    uplink = sum(sum(r["uplink_bytes"].values()) for r in records)
    return {
        "method": method, "seed": seed, "base_params": BASE, "initial": {"accuracy": initial, "loss": 2.0}, "rounds": records,
        "config": {"federation": {"num_clients": len(ranks), "client_ranks": list(ranks), "memory_mb": []},
                   "train": {"local_steps": 4, "batch_size": 8}, "data": {"max_length": 128}},
        "final": {"accuracy": final, "loss": 1.0, "best_accuracy": final, "client_cost_pct": 0.1, "uplink_bytes_total": uplink,
                  "eval_rows": 100},
        "final_eval": {"rows_sha256": f"rows of seed {seed}", "rows": 100, "test_rows": 100, "accuracy": final, "loss": 1.0},
    }


# ---------------------------------------------------------------------------- the work a client did
def test_training_flops_of_a_hand_computed_case():
    # P = 1000, 10 trained LoRA parameters, 5 tokens: forward 2·1000·5, backward through the frozen base 2·1000·5,
    # LoRA's forward, activation and weight gradients 6·10·5
    assert training_flops(1000, 10, 5) == 10_000 + 10_000 + 300
    # adapting only the top quarter of the blocks (LEGEND at depth L/4): the backward crosses a quarter of the base
    assert training_flops(1000, 10, 5, 0.25) == 10_000 + 2_500 + 300


def test_the_backward_pass_stops_at_the_lowest_adapted_block():
    top_two = ["model.layers.7.self_attn.q_proj", "model.layers.6.mlp.up_proj", "model.layers.7.mlp.up_proj"]
    assert backward_fraction(top_two, 8) == 2 / 8
    assert backward_fraction(["model.layers.0.self_attn.v_proj", "model.layers.7.self_attn.v_proj"], 8) == 1.0
    assert backward_fraction(["lm_head", "model.layers.7.self_attn.v_proj"], 8) == 1.0  # outside the blocks: all of it


def test_devices_follow_the_budgets():
    """Class ⌊3 · (clients with a smaller budget) / n⌋: the default ranks make 4 phones, 4 laptops, 2 edge GPUs."""
    ranks = {"num_clients": 10, "client_ranks": [64, 32, 16, 16, 8, 8, 4, 4, 4, 4], "memory_mb": []}
    assert device_classes(MIXED, ranks) == [EDGE_GPU] * 2 + [LAPTOP] * 4 + [PHONE] * 4
    budgets = dict(ranks, num_clients=3, memory_mb=[900.0, 300.0, 600.0])  # memory budgets win over ranks
    assert device_classes(MIXED, budgets) == [EDGE_GPU, PHONE, LAPTOP]
    assert device_classes(MIXED, dict(ranks, client_ranks=[8] * 10)) == [PHONE] * 10  # equal budgets: one class
    assert device_classes(FLEETS["phones"], ranks) == [PHONE] * 10


# ---------------------------------------------------------------------------- rounds on the fleet
def test_a_round_lasts_as_long_as_its_slowest_client():
    """The strong devices do more work, the phone less; the phone still ends the round, and the round's time is
    its time, not the clients' mean."""
    work = {0: client(trained=4000, up=64_000, tokens=2048), 1: client(trained=2000, up=32_000, tokens=1024),
            2: client(trained=1000, up=16_000, tokens=512)}
    curve = fleet_curve(fleet_run([(0.5, work, 0)]), MIXED)
    times = [device_seconds(device, training_flops(BASE, work[k]["trained_params"], work[k]["train_tokens"]),
                            work[k]["uplink_bytes"], work[k]["instruction_bytes"])
             for k, device in enumerate((EDGE_GPU, LAPTOP, PHONE))]
    assert max(times) == times[2] and max(times) > 1.5 * statistics.fmean(times)
    assert curve.seconds == [0.0, pytest.approx(times[2], rel=1e-12)]
    # the phone left out of round 2: the laptop ends it
    curve = fleet_curve(fleet_run([(0.5, work, 0), (0.6, {0: work[0], 1: work[1]}, 0)]), MIXED)
    assert curve.seconds[2] - curve.seconds[1] == pytest.approx(times[1], rel=1e-12)


def test_fewer_bytes_take_proportionally_less_time():
    """One phone; halving what it sends halves its upload time, and the rest of its round is unchanged."""
    def seconds(up: int, instruction: int) -> float:
        return fleet_curve(fleet_run([(0.5, {2: client(up=up, instruction=instruction)}, 0)]), MIXED).seconds[1]

    compute = training_flops(BASE, 1000, 512) / (PHONE.tflops * 1e12)
    full, half = seconds(8_000_000, 0) - compute, seconds(4_000_000, 0) - compute
    assert full == pytest.approx(2 * half, rel=1e-12) and full == pytest.approx(8_000_000 / (10 * MBIT), rel=1e-12)
    assert seconds(0, 5_000_000) - compute == pytest.approx(5_000_000 / (50 * MBIT), rel=1e-12)  # downlink at 50 Mbit/s


def test_the_backward_fraction_cuts_the_compute_time():
    full = fleet_curve(fleet_run([(0.5, {2: client(up=0, instruction=0)}, 0)]), MIXED).seconds[1]
    top = fleet_curve(fleet_run([(0.5, {2: client(up=0, instruction=0, fraction=0.25)}, 0)]), MIXED).seconds[1]
    assert full - top == pytest.approx(2 * BASE * 512 * 0.75 / (PHONE.tflops * 1e12), rel=1e-12)


def test_a_client_downloads_the_merges_it_missed():
    """Round t's merge reaches a client with its next instruction: client 0 trains in rounds 1, 2, 3, client 1 in
    rounds 1 and 3, client 2 first in round 3."""
    rounds = [(0.3, {0: client(), 1: client()}, 100), (0.4, {0: client()}, 200), (0.5, {0: client(), 1: client(), 2: client()}, 400)]
    per_round = client_rounds(fleet_run(rounds), device_classes(MIXED, fleet_run(rounds)["config"]["federation"]), set())
    downloads = [{c.client: c.downlink_bytes - 2000 for c in clients} for clients in per_round]  # less the instruction
    assert downloads == [{0: 0, 1: 0}, {0: 100}, {0: 200, 1: 300, 2: 300}]
    curve = fleet_curve(fleet_run(rounds), MIXED)
    assert curve.uplink_bytes == [0, 8000, 12_000, 24_000]
    assert curve.traffic_bytes == [0, 8000 + 4000, 12_000 + 6000 + 100, 24_000 + 12_000 + 100 + 800]


def test_old_records_are_timed_with_stated_assumptions():
    run = fleet_run([(0.5, {2: client()}, 0)])
    for name in ("train_tokens", "backward_fraction", "instruction_bytes"):
        del run["rounds"][0][name]
    curve = fleet_curve(run, MIXED)
    assert curve.seconds[1] == pytest.approx(device_seconds(PHONE, training_flops(BASE, 1000, 4 * 8 * 128), 4000, 0), rel=1e-12)
    assert curve.fallbacks == ["backward through every block", "downlink not counted",
                               "tokens = local_steps · batch_size · max_length (an upper bound)"]
    del run["rounds"][0]["trained_params"]
    assert fleet_curve(run, MIXED) is None


# ---------------------------------------------------------------------------- time to a target
def test_time_to_target_is_the_first_round_at_or_over_it():
    curve = FleetCurve([0, 1, 2, 3, 4, 5], [0.25, 0.5, None, 0.7, 0.65, 0.8], [0.0, 10.0, 20.0, 30.0, 40.0, 50.0],
                       [0, 1, 2, 3, 4, 5], [0, 2, 4, 6, 8, 10])
    assert reach_target(curve, 0.7) == Reached(3, 30.0, 3, 6)  # at the target counts; round 2 was not evaluated
    assert reach_target(curve, 0.75) == Reached(5, 50.0, 5, 10)  # the dip in round 4 does not count
    assert reach_target(curve, 0.2) == Reached(0, 0.0, 0, 0)  # the base model already there
    assert reach_target(curve, 0.9) is None


# ---------------------------------------------------------------------------- the compare table
def seeds_of(method: str, accuracies: list[list[float]], finals: list[float], work: dict[int, dict]) -> list[dict]:
    return [fleet_run([(a, work, 0) for a in per_round], method=method, seed=seed, final=final)
            for seed, (per_round, final) in enumerate(zip(accuracies, finals))]


@pytest.fixture
def compared() -> dict[str, list[dict]]:
    """Per round, fedit's phone takes T seconds; legend's clients do a quarter of the backward and send half the
    bytes. legend reaches 0.7 in round 2 on both seeds, fedit in round 3 and 4; flora never does."""
    fedit = {k: client(up=400_000, instruction=400_000) for k in range(3)}
    legend = {k: client(up=200_000, instruction=400_000, fraction=0.25) for k in range(3)}
    return {
        "fedit": seeds_of("fedit", [[0.5, 0.6, 0.7, 0.75], [0.5, 0.6, 0.65, 0.7]], [0.74, 0.72], fedit),
        "legend": seeds_of("legend", [[0.5, 0.7, 0.72, 0.74], [0.6, 0.71, 0.72, 0.73]], [0.73, 0.73], legend),
        "flora": seeds_of("flora", [[0.5, 0.6, 0.6, 0.6], [0.5, 0.6, 0.6, 0.6]], [0.6, 0.6], fedit),
    }


def phone_round(up: int, down: int, fraction: float) -> float:
    return device_seconds(PHONE, training_flops(BASE, 1000, 512, fraction), up, down)


def test_compare_reports_time_and_bytes_to_the_target(compared, tmp_path):
    rows = {row.label: row for row in summarize(compared, "fedit", FleetSettings(target_accuracy=0.7))}
    fedit, legend, flora = rows["fedit"].fleet, rows["legend"].fleet, rows["flora"].fleet
    assert (fedit.reached, legend.reached, flora.reached) == (2, 2, 0)
    fedit_round, legend_round = phone_round(400_000, 400_000, 1.0), phone_round(200_000, 400_000, 0.25)
    assert fedit.stats["target_round"].mean == 3.5 and legend.stats["target_round"].mean == 2
    assert fedit.stats["target_fleet_seconds"].mean == pytest.approx(3.5 * fedit_round, rel=1e-12)
    assert legend.stats["target_fleet_seconds"].mean == pytest.approx(2 * legend_round, rel=1e-12)
    assert legend.stats["target_uplink_mib"].mean == pytest.approx(2 * 3 * 200_000 / 2**20)
    assert legend.stats["run_fleet_seconds"].mean == pytest.approx(4 * legend_round, rel=1e-12)
    speedup = 3.5 * fedit_round / (2 * legend_round)
    assert legend.vs_reference["speedup"] == pytest.approx(speedup, rel=1e-12)
    assert legend.vs_reference["uplink_ratio"] == pytest.approx(2 * 200_000 / (3.5 * 400_000))
    assert legend.vs_reference["traffic_ratio"] == pytest.approx(2 * 600_000 / (3.5 * 800_000))
    assert flora.vs_reference == {} and flora.stats["target_fleet_seconds"].mean is None

    md = write_markdown(list(rows.values()), tmp_path / "comparison.md", header=[]).read_text()
    table = md[md.index("Time and traffic on a simulated device fleet"):].splitlines()
    header = next(line for line in table if line.startswith("| entry"))
    assert [t.strip() for t in header.strip("|").split("|")] == [
        "entry", "reached", "round", "fleet s to target", "uplink MiB to target", "up+down MiB to target", "fleet s, whole run",
        "up+down MiB, whole run", "time vs `fedit`", "up+down vs `fedit`"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table if line.startswith("| `")}
    assert cells["`legend`"][1:3] == ["2/2", "2.0 ± 0.0"] and cells["`legend`"][-2] == f"{speedup:.2f}× sooner"
    assert cells["`flora`"][1:6] == ["0/2", *["not reached"] * 4] and cells["`flora`"][-2:] == ["", ""]
    assert cells["`fedit`"][-2:] == ["—", "—"]  # the reference itself
    assert (f"- `legend` reaches the target {speedup:.2f}× sooner than `fedit`, with {2 * 200_000 / (3.5 * 400_000):.2f}× its "
            f"uplink and {2 * 600_000 / (3.5 * 800_000):.2f}× its up+down traffic.") in md
    assert "Target: accuracy ≥ 0.7000" in md and "edge GPU (2 TFLOP/s, 100/300 Mbit/s up/down): clients 0" in md

    with write_csv(list(rows.values()), tmp_path / "comparison.csv").open() as handle:
        records = {r["label"]: r for r in csv.DictReader(handle)}
    assert list(records["legend"]) == csv_columns(list(rows.values()))
    assert float(records["legend"]["speedup_vs_reference"]) == pytest.approx(speedup, rel=1e-12)
    assert float(records["fedit"]["target_fleet_seconds_mean"]) == pytest.approx(3.5 * fedit_round, rel=1e-12)
    assert (records["flora"]["target_reached_seeds"], records["flora"]["target_fleet_seconds_mean"]) == ("0", "")
    assert records["fedit"]["fleet"] == "mixed" and float(records["fedit"]["target_accuracy"]) == 0.7


def test_the_default_target_is_95_percent_of_the_best_final_accuracy(compared):
    rows = summarize(compared)
    assert rows[0].fleet.target == pytest.approx(0.95 * 0.73)  # fedit's and legend's mean finals are both 0.73
    assert [row.fleet.vs_reference for row in rows] == [{}, {}, {}]  # no reference, no ratios


def test_runs_the_clock_cannot_time_get_no_fleet_table(compared, tmp_path):
    for run in compared["flora"]:
        del run["config"]
    rows = summarize(compared, "fedit")
    assert all(row.fleet is None for row in rows)
    assert "simulated device fleet" not in write_markdown(rows, tmp_path / "c.md", header=[]).read_text()


# ---------------------------------------------------------------------------- settings, checked before any run
@pytest.mark.parametrize("fleet, target, message", [
    ("laptops", None, r"--fleet 'laptops' is not a fleet; the fleets are \['mixed', 'phones'\]"),
    (None, 80, r"--target-accuracy must be an accuracy in \(0, 1\], e.g. 0.8 for 80 %; got 80"),
    (None, 0, "got 0"), (None, True, "got True"), (None, "0.8", "got '0.8'"),
])
def test_bad_fleet_settings_are_named(fleet, target, message):
    with pytest.raises(ConfigError, match=message):
        fleet_settings(fleet, target)


def test_the_config_file_can_hold_the_target_and_the_fleet(tmp_path):
    tiny = write_tiny_config_toml(tmp_path / "data")
    path = tmp_path / "experiment.toml"
    path.write_text(tiny.read_text() + '\n[compare]\nmethods = ["fedit"]\ntarget_accuracy = 0.8\nfleet = "phones"\n')
    assert compare_table(path) == CompareSettings(methods="fedit", target_accuracy=0.8, fleet="phones")
    path.write_text(tiny.read_text() + '\n[compare]\ntarget_accuracy = 80\n')
    with pytest.raises(ConfigError, match=r"experiment.toml: \[compare\] target_accuracy must be an accuracy in \(0, 1\]"):
        compare_table(path)


def test_the_cli_refuses_a_bad_target_before_any_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    config = write_tiny_config_toml(tmp_path / "data")
    monkeypatch.setattr(sys, "argv", ["aflora", "compare", "--config", str(config), "--methods", "fedit", "--out", str(out),
                                      "--target-accuracy", "75"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "--target-accuracy must be an accuracy in (0, 1]" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------- what a real round records
def test_a_tiny_run_records_what_its_clients_did(tmp_path):
    """LEGEND: each client's backward fraction is its configured depth over the model's blocks. AFLoRA (2 of 3 clients
    per round, so some miss merges): the clock's downloads equal the bytes the server sent, merges included."""
    from aflora.rounds import InProcessTransport, run_round
    from aflora.runtime import ClientRuntime, ServerRuntime

    for method in ("legend", "aflora"):
        config = tiny_config(tmp_path / method, f'method="{method}"', "rounds=3", "federation.sample_fraction=0.67")
        server, transport = ServerRuntime(config), InProcessTransport(ClientRuntime(config))
        sent: list[dict[int, int]] = []
        train = transport.train

        def spy(round_, messages, train=train, sent=sent):
            messages = list(messages)  # each message is built once, as a transport would
            sent.append({i.client_id: payload_bytes(i.tensors) + sum(payload_bytes(adapter_tensors(a)) for a in s.merges.values())
                         for i, s in messages})
            return train(round_, messages)

        transport.train = spy
        records = [asdict(run_round(server, transport, round_).record) for round_ in (1, 2, 3)]
        for record in records:
            assert all(n > 0 for n in record["train_tokens"].values()) and len(record["train_tokens"]) == 2
        num_blocks = server.side.host.footprint().num_blocks
        if method == "legend":
            for record in records:
                assert record["backward_fraction"] == {str(k): server.method.configs[k].depth / num_blocks for k in record["clients"]}
            assert all(r["merge_bytes"] == 0 for r in records)
        else:
            assert all(r["merge_bytes"] > 0 for r in records) and all(set(r["backward_fraction"].values()) == {1.0} for r in records)
            run = {"config": config.to_dict(), "base_params": server.side.host.base_param_count, "rounds": records}
            timed = client_rounds(run, device_classes(MIXED, run["config"]["federation"]), set())
            assert [{c.client: c.downlink_bytes for c in clients} for clients in timed] == sent
            assert any(len(set(s.values())) > 1 for s in sent), "some client had missed a merge"


def test_what_old_records_assumed_is_listed_once_per_entry_with_its_seeds(compared):
    from aflora.compare_fleet import fleet_notes, fleet_rows

    for run in compared["flora"]:  # recorded before the downlink field
        for r in run["rounds"]:
            del r["instruction_bytes"]
    del compared["fedit"][1]["rounds"][0]["train_tokens"]
    rows = fleet_rows(compared, fleet_settings(None, None), reference="fedit")
    labels = list(rows)
    footnote = fleet_notes(labels, [rows[label] for label in labels], "fedit")[-1]
    assert footnote.count("downlink not counted") == 1 and "downlink not counted (seed 0, 1)" in footnote
    assert "`fedit`: tokens = local_steps · batch_size · max_length (an upper bound) (seed 1)" in footnote
    assert "`legend`" not in footnote
