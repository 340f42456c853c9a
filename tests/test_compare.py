"""`aflora compare`: entry parsing, the table from hand-made results, validation before any run, and one
end-to-end comparison through the CLI on a tiny model."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from aflora.cli import main
from aflora.compare import Entry, compare_table, parse_entries, parse_entry, parse_seeds, plan_comparison
from aflora.compare_table import COLUMNS, csv_columns, markdown_table, summarize, write_csv, write_markdown, write_plots
from aflora.config import ConfigError, load_config, parse_override
from aflora.data import DataError
from aflora.intervals import t_interval, wilson_interval
from aflora.tomlwrite import toml_literal

from helpers import MIB, fake_run, write_tiny_config_toml


# ---------------------------------------------------------------------------- entries and seeds
def test_plain_method_entries():
    assert parse_entries("aflora, fedit,ffa_lora") == [Entry("aflora", "aflora"), Entry("fedit", "fedit"), Entry("ffa_lora", "ffa_lora")]


def test_ablation_entry_sets_only_that_methods_options():
    entry = parse_entry("aflora:ddr=false+rank_aware_weights=false+beta=0.5")
    assert entry == Entry("aflora:ddr=false+rank_aware_weights=false+beta=0.5", "aflora",
                          {"ddr": False, "rank_aware_weights": False, "beta": 0.5})
    config = load_config(None, ["aflora.gamma=0.02", *entry.config_overrides()])
    assert config.method == "aflora"
    options = config.method_options()
    assert (options.ddr, options.rank_aware_weights, options.server_tuning, options.beta, options.gamma) == (False, False, True, 0.5, 0.02)


def test_an_entry_may_set_its_own_learning_rates_and_public_set():
    entry = parse_entry("aflora:ddr=false+train.lr=0.001+server.lr=0.004+data.public_dataset=dolly")
    assert (entry.options, entry.settings) == (
        {"ddr": False}, {"train.lr": 0.001, "server.lr": 0.004, "data.public_dataset": "dolly"})
    config = load_config(None, ["train.lr=0.5", "server.steps=2", *entry.config_overrides()])
    assert (config.train.lr, config.server.lr, config.server.steps, config.data.public_dataset) == (0.001, 0.004, 2, "dolly")
    assert config.method_options().ddr is False
    # the method's own options may also be written with their table's name
    assert parse_entry("aflora:aflora.beta=0.5").options == {"beta": 0.5}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("aflora,fedt", "entry 'fedt': unknown method 'fedt'; available methods are"),
        ("aflora:dr=false", r"entry 'aflora:dr=false': aflora has no option 'dr'; its options are \[.*'ddr'"),
        ("aflora:ddr=maybe", "entry 'aflora:ddr=maybe': aflora.ddr must be of type bool, got 'maybe'"),
        ("aflora:alpha=2", r"entry 'aflora:alpha=2': aflora.alpha is a fusion ratio and must lie in \[0, 1\]"),
        ("aflora:", "entry 'aflora:' has nothing after ':'"),
        ("aflora:ddr", "entry 'aflora:ddr': 'ddr' is not key=value"),
        ("aflora:ddr=false+ddr=true", "sets 'ddr' twice"),
        ("aflora:data.eval_size=10", "'data.eval_size' cannot differ between entries.*use --set"),
        ("fedit:model.name=tiny-gpt2", "'model.name' cannot differ between entries"),
        ("fedit:train.lr=0.1+train.lr=0.2", "sets 'train.lr' twice"),
        ("aflora,,fedit", "empty entry"),
        ("fedit,aflora,fedit", r"names \['fedit'\] more than once"),
        ("aflora:ddr=false/x", "contains a space or a slash"),
    ],
)
def test_bad_entries_are_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_entries(spec)


def test_seeds():
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    with pytest.raises(ConfigError, match="comma-separated integers"):
        parse_seeds("0,one")
    with pytest.raises(ConfigError, match="repeats a seed"):
        parse_seeds("1,1")


@pytest.mark.parametrize("value", [True, False, 3, -2, 0.5, 1e-05, "a \"quoted\" word", [1, 2], ["x", "y"]])
def test_toml_literal_parses_back_exactly(value):
    assert parse_override(f"k={toml_literal(value)}") == ("k", value)


# ---------------------------------------------------------------------------- the table
def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@pytest.fixture
def runs() -> dict[str, list[dict]]:
    return {
        "aflora": [
            fake_run("aflora", 0, accuracy=0.70, best=0.72, cost_pct=0.20, uplink=[4 * MIB, 2 * MIB], round_seconds=[2.0, 4.0],
                     server_seconds=[0.5, 0.7], errors=[1e-7, 3e-7]),
            fake_run("aflora", 1, accuracy=0.60, best=0.65, cost_pct=0.10, uplink=[4 * MIB, 4 * MIB], round_seconds=[1.0, 1.0],
                     server_seconds=[0.3, 0.5], errors=[2e-7, 2e-7]),
            fake_run("aflora", 2, accuracy=0.65, best=0.66, cost_pct=0.15, uplink=[4 * MIB, 3 * MIB], round_seconds=[3.0, 3.0],
                     server_seconds=[0.4, 0.4], errors=[None, 4e-7]),
        ],
        "fedit": [fake_run("fedit", s, accuracy=a, best=a, cost_pct=0.5) for s, a in ((0, 0.5), (1, 0.55), (2, 0.45))],
        "fedsa_lora": [fake_run("fedsa_lora", s, accuracy=0.4, best=0.4, eval_uplink=MIB // 2) for s in (0, 1, 2)],
    }


def test_rows_hold_mean_and_sample_std_over_seeds(runs):
    rows = {row.label: row for row in summarize(runs)}
    assert list(rows) == ["aflora", "fedit", "fedsa_lora"]
    aflora = rows["aflora"]
    assert (aflora.method, aflora.seeds, aflora.metric, aflora.finals) == ("aflora", [0, 1, 2], "accuracy", [0.70, 0.60, 0.65])
    expected = {
        "final": mean_std([0.70, 0.60, 0.65]),
        "best_accuracy": mean_std([0.72, 0.65, 0.66]),
        "client_cost_pct": mean_std([0.20, 0.10, 0.15]),
        "uplink_mib": mean_std([6.0, 8.0, 7.0]),
        "round_seconds": mean_std([3.0, 1.0, 3.0]),  # per seed: the mean over its rounds
        "aggregation_seconds": mean_std([0.02, 0.02, 0.02]),
        "server_seconds": mean_std([0.6, 0.4, 0.4]),
        "aggregation_error": mean_std([2e-7, 2e-7, 4e-7]),  # seed 2's null round is skipped, not counted as 0
        "eval_uplink_mib": (0.0, 0.0),
    }
    for key, (mean, std) in expected.items():
        assert aflora.stats[key].mean == pytest.approx(mean, abs=1e-12), key
        assert aflora.stats[key].std == pytest.approx(std, abs=1e-12), key
    assert rows["fedit"].stats["aggregation_error"].mean is None  # null for the method: blank, not 0
    assert rows["fedit"].stats["server_seconds"].mean is None
    assert rows["fedsa_lora"].stats["eval_uplink_mib"].mean == pytest.approx(1.0)  # 2 rounds × 0.5 MiB


def test_instruction_tasks_compare_final_loss():
    rows = summarize({"fedit": [fake_run("fedit", 0, accuracy=None, loss=1.5), fake_run("fedit", 1, accuracy=None, loss=2.5)]})
    assert rows[0].metric == "loss"
    assert (rows[0].stats["final"].mean, rows[0].stats["final"].std) == pytest.approx(mean_std([1.5, 2.5]))
    assert rows[0].stats["best_accuracy"].mean is None


def test_extra_benchmarks_get_a_column_of_their_final_evaluation(tmp_path):
    runs = {
        "aflora": [fake_run("aflora", s, accuracy=None, extra={"mmlu/accuracy": [0.2, a]}) for s, a in ((0, 0.30), (1, 0.40))],
        "fedit": [fake_run("fedit", 0, accuracy=None)],  # scored no extra benchmark: blank, not 0
        "flora": [fake_run("flora", 0, accuracy=None, extra={"mmlu/accuracy": [0.2, 0.3]})],
    }
    # the final evaluation's score (on data.final_eval_size rows) wins over the last round's, with its Wilson interval
    runs["flora"][0]["final_eval"]["extra"] = {"mmlu": {"accuracy": 0.25, "accuracy_ci95": [0.2, 0.3], "loss": 1.0}}
    rows = summarize(runs)
    aflora, fedit, flora = rows
    assert (aflora.stats["final_mmlu/accuracy"].mean, aflora.stats["final_mmlu/accuracy"].std) == pytest.approx(mean_std([0.30, 0.40]))
    assert fedit.stats["final_mmlu/accuracy"].mean is None
    assert (flora.stats["final_mmlu/accuracy"].mean, flora.stats["final_mmlu/accuracy"].low) == (0.25, 0.2)
    md = write_markdown(rows, tmp_path / "comparison.md", header=[]).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| entry | seeds"))
    assert header.strip("|").split("|")[-1].strip() == "final mmlu/accuracy [95 % CI]"
    t = t_interval([0.30, 0.40])
    assert f"| 0.3500 [{t.low:.4f}, {t.high:.4f}] |" in md and "| 0.2500 [0.2000, 0.3000] |" in md
    with write_csv(rows, tmp_path / "comparison.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert float(records[0]["final_mmlu/accuracy_mean"]) == pytest.approx(0.35)
    assert records[1]["final_mmlu/accuracy_mean"] == ""


def test_markdown_and_csv_have_one_row_per_label(runs, tmp_path):
    rows = summarize(runs)
    md = write_markdown(rows, tmp_path / "comparison.md", header=["Command: `aflora compare ...`", "Machine: test"]).read_text()
    assert "- Command: `aflora compare ...`" in md and "- Machine: test" in md
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1].strip() for line in table[:3]] == ["`aflora`", "`fedit`", "`fedsa_lora`"]
    header = next(line for line in md.splitlines() if line.startswith("| entry | seeds"))
    titles = [t.strip() for t in header.strip("|").split("|")]
    assert titles == ["entry", "seeds", "final accuracy [95 % CI]", "best accuracy [95 % CI]", "client cost %", "uplink MiB",
                      "round s", "aggregation s", "server step s", "aggregation error", "eval-only uplink MiB"]
    cells = dict(zip(titles, (c.strip() for c in table[0].strip("|").split("|"))))
    mean, std = mean_std([0.70, 0.60, 0.65])
    t = t_interval([0.70, 0.60, 0.65])  # mean ± 4.303 · std / √3
    assert cells["final accuracy [95 % CI]"] == f"{mean:.4f} [{t.low:.4f}, {t.high:.4f}]"
    assert cells["client cost %"] == "{:.4f} ± {:.4f}".format(*mean_std([0.20, 0.10, 0.15]))  # not an accuracy: ± std
    assert cells["seeds"] == "3"
    fedit = dict(zip(titles, (c.strip() for c in table[1].strip("|").split("|"))))
    assert fedit["aggregation error"] == "" and fedit["eval-only uplink MiB"] == "0.000 ± 0.000"
    assert "Final accuracy per seed" in md and "| `fedit` | 0.5000 | 0.5500 | 0.4500 |" in md

    with (write_csv(rows, tmp_path / "comparison.csv")).open() as handle:
        reader = csv.DictReader(handle)
        records = list(reader)
    assert reader.fieldnames == csv_columns(rows)
    assert reader.fieldnames[:4] == ["label", "method", "seeds", "metric"]
    assert {f"{c.key}_mean" for c in COLUMNS} <= set(reader.fieldnames)
    assert [r["label"] for r in records] == ["aflora", "fedit", "fedsa_lora"]
    assert records[0]["seeds"] == "0 1 2" and float(records[0]["final_mean"]) == pytest.approx(mean)
    assert records[1]["aggregation_error_mean"] == "" and records[1]["aggregation_error_std"] == ""
    assert float(records[0]["final_ci95_low"]) == pytest.approx(t.low) and float(records[0]["final_ci95_high"]) == pytest.approx(t.high)
    assert records[0]["reference"] == records[0]["verdict"] == "" and records[0]["eval_rows"] == "200"


def test_one_seed_shows_no_std_and_zero_eval_uplink_is_left_out(runs, tmp_path):
    rows = summarize({label: seeds[:1] for label, seeds in runs.items() if label != "fedsa_lora"})
    md = write_markdown(rows, tmp_path / "comparison.md", header=[]).read_text()
    assert "±" not in "\n".join(markdown_table(rows))
    assert "eval-only uplink" not in md and "per seed" not in md
    assert "| `aflora` | 1 | 0.7000 | 0.7200 |" in md  # runs made before results.json had intervals: the values alone


def test_one_seed_shows_the_wilson_interval_of_its_final_evaluation(tmp_path):
    correct = [True] * 150 + [False] * 50
    rows = summarize({"fedit": [fake_run("fedit", 0, accuracy=None, correct=correct)]})
    final = rows[0].stats["final"]
    assert (final.mean, final.low, final.high) == (0.75, *wilson_interval(150, 200).as_list())
    assert "| `fedit` | 1 | 0.7500 [0.6857, 0.8049] |" in write_markdown(rows, tmp_path / "c.md", header=[]).read_text()


def test_label_scores_expose_a_model_that_answers_one_label():
    """A constant answer matches the majority score on accuracy but not on balanced accuracy (1/K); a model right on
    half of each label has balanced accuracy 0.5 whatever the label shares."""
    from aflora.results import label_scores

    labels = [1] * 6 + [0] * 3 + [2]  # 60 % label 1
    always_one = label_scores(labels, [label == 1 for label in labels])
    assert always_one == {"label_shares": {"0": 0.3, "1": 0.6, "2": 0.1}, "recall_by_label": {"0": 0.0, "1": 1.0, "2": 0.0},
                          "balanced_accuracy": pytest.approx(1 / 3), "majority_label_accuracy": 0.6}
    assert label_scores(labels, [label == 2 for label in labels])["balanced_accuracy"] == pytest.approx(1 / 3)
    half = [True, False] * 3 + [True, False, True] + [False]  # label 1: 3/6, label 0: 2/3, label 2: 0/1
    assert label_scores(labels, half)["recall_by_label"] == {"0": pytest.approx(2 / 3), "1": 0.5, "2": 0.0}
    with pytest.raises(ValueError):
        label_scores(labels, [True])


def test_the_table_shows_balanced_accuracy_and_the_majority_label_score(tmp_path):
    def with_labels(run: dict, balanced: float, majority: float) -> dict:
        run["final_eval"] |= {"balanced_accuracy": balanced, "majority_label_accuracy": majority}
        return run

    rows = summarize({
        "aflora": [with_labels(fake_run("aflora", s, accuracy=0.6, best=0.6), 1 / 3, m) for s, m in ((0, 0.598), (1, 0.591))],
        "flora": [with_labels(fake_run("flora", s, accuracy=0.7, best=0.7), b, m) for s, b, m in ((0, 0.65, 0.598), (1, 0.55, 0.591))],
        "fedit": [fake_run("fedit", 0, accuracy=0.7)],  # a run made before results.json kept label scores: blank
    })
    assert [row.stats["balanced_accuracy"].mean for row in rows] == pytest.approx([1 / 3, 0.6, None])
    md = write_markdown(rows, tmp_path / "comparison.md", header=[]).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| entry | seeds"))
    titles = [t.strip() for t in header.strip("|").split("|")]
    assert titles[2:5] == ["final accuracy [95 % CI]", "best accuracy [95 % CI]", "balanced accuracy"]
    assert "0.3333 ± 0.0000" in md and "0.6000 ± 0.0707" in md
    assert "most common label of the same rows scores 0.5980 (seed 0), 0.5910 (seed 1)" in md
    with write_csv(rows, tmp_path / "comparison.csv").open() as handle:
        records = list(csv.DictReader(handle))
    assert float(records[1]["balanced_accuracy_mean"]) == pytest.approx(0.6) and records[2]["balanced_accuracy_mean"] == ""
    old = write_markdown(summarize({"fedit": [fake_run("fedit", 0, accuracy=0.7)]}), tmp_path / "old.md", header=[]).read_text()
    assert "balanced accuracy" not in old and "most common label" not in old


def test_overlay_and_pareto_plots_with_interval_bands(runs, tmp_path):
    paths = write_plots(runs, summarize(runs), tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "uplink.png", "pareto.png"]
    for path in paths:
        assert path.stat().st_size > 1000


def test_the_pareto_front_keeps_the_points_nothing_cheaper_beats():
    from aflora.plots import ParetoPoint, pareto_front

    points = [ParetoPoint(name, cost, acc, None, None) for name, cost, acc in
              [("a", 0.07, 0.76), ("b", 0.17, 0.79), ("c", 0.17, 0.78), ("d", 0.41, 0.80), ("e", 0.69, 0.77)]]
    assert [p.label for p in pareto_front(points)] == ["a", "b", "d"]
    assert [p.label for p in pareto_front(points, higher_is_better=False)] == ["a"]  # a loss: lower is better


# ---------------------------------------------------------------------------- paired differences to a reference
def one_seed(label: str, correct, seed: int = 0) -> list[dict]:
    return [fake_run(label, seed, accuracy=None, correct=list(map(bool, correct)), rows_id="the same 2000 rows")]


def test_with_one_seed_the_difference_is_a_paired_bootstrap_over_the_shared_rows(tmp_path):
    rng = np.random.default_rng(0)
    reference = rng.random(2000) < 0.70
    runs = {
        "aflora": one_seed("aflora", reference),
        "better": one_seed("better", reference | (rng.random(2000) < 0.15)),  # right wherever aflora is, and on more rows
        "worse": one_seed("worse", reference & (rng.random(2000) < 0.9)),
        "twin": one_seed("twin", reference),
    }
    rows = {row.label: row for row in summarize(runs, "aflora")}
    assert (rows["aflora"].verdict, rows["aflora"].difference) == ("reference", None)
    assert [rows[label].verdict for label in ("better", "worse", "twin")] == ["ahead", "behind", "level"]
    better = rows["better"]
    assert better.difference.estimate == pytest.approx(better.stats["final"].mean - rows["aflora"].stats["final"].mean)
    assert better.difference.low > 0 and better.paired_on == "2000 rows of seed 0, bootstrap"

    table = markdown_table(list(rows.values()))
    titles = [t.strip() for t in table[0].strip("|").split("|")]
    assert titles[2:5] == ["final accuracy [95 % CI]", "Δ accuracy vs `aflora` [95 % CI]", "vs `aflora`"]
    d = better.difference
    assert f"| {d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | ahead |" in table[3] and "| — | reference |" in table[2]
    md = write_markdown(list(rows.values()), tmp_path / "comparison.md", header=[]).read_text()
    assert "`better`: 2000 rows of seed 0, bootstrap" in md and "excludes 0" in md
    with write_csv(list(rows.values()), tmp_path / "comparison.csv").open() as handle:
        records = {r["label"]: r for r in csv.DictReader(handle)}
    assert records["better"]["reference"] == "aflora" and records["better"]["verdict"] == "ahead"
    assert float(records["better"]["difference_ci95_low"]) == pytest.approx(d.low)


def test_over_seeds_the_difference_is_the_t_interval_of_the_per_seed_differences():
    runs = {"aflora": [fake_run("aflora", s, accuracy=a) for s, a in ((0, 0.70), (1, 0.60), (2, 0.65))],
            "fedit": [fake_run("fedit", s, accuracy=a) for s, a in ((0, 0.75), (1, 0.66), (2, 0.69))]}
    row = summarize(runs, "aflora")[1]
    t = t_interval([0.05, 0.06, 0.04])
    assert (row.difference.estimate, row.difference.low, row.difference.high) == pytest.approx((t.estimate, t.low, t.high))
    assert (row.verdict, row.paired_on) == ("ahead", "3 seeds, t")  # the seeds' spread of 0.05 cancels in the pairs
    runs["fedit"].append(fake_run("fedit", 3, accuracy=0.9))
    assert summarize(runs, "aflora")[1].paired_on == "3 seeds, t, 1 unpaired seed(s) left out"
    losses = {"fedit": [fake_run("fedit", s, accuracy=None, loss=v) for s, v in ((0, 2.0), (1, 2.2))],
              "flora": [fake_run("flora", s, accuracy=None, loss=v) for s, v in ((0, 1.5), (1, 1.71))]}
    assert summarize(losses, "fedit")[1].verdict == "ahead"  # a lower loss in both seeds, by about the same
    single = {"fedit": [fake_run("fedit", 0, accuracy=None, loss=2.0)], "flora": [fake_run("flora", 0, accuracy=None, loss=1.5)]}
    row = summarize(single, "fedit")[1]
    assert (row.difference, row.verdict) == (None, "") and "no per-row outcomes" in row.paired_on


def test_runs_scored_on_different_rows_are_never_paired():
    runs = {"aflora": [fake_run("aflora", 0, accuracy=0.7, rows_id="200 rows")],
            "fedit": [fake_run("fedit", 0, accuracy=0.8, rows_id="2000 rows")]}
    summarize(runs)  # without a reference nothing is paired
    with pytest.raises(ConfigError, match=r"cannot pair `fedit` seed 0 with the reference `aflora` seed 0: their final "
                                          r"evaluations scored different test rows .*data.final_eval_size"):
        summarize(runs, "aflora")
    del runs["fedit"][0]["final_eval"]
    with pytest.raises(ConfigError, match=r"results.json of \['fedit'\] records no final evaluation .*--overwrite"):
        summarize(runs, "aflora")
    with pytest.raises(ConfigError, match=r"`fedit` \(seeds \[1\]\) shares no seed with the reference `aflora` \(seeds \[0\]\)"):
        summarize({"aflora": runs["aflora"], "fedit": [fake_run("fedit", 1, accuracy=0.8)]}, "aflora")


def test_the_tables_intervals_cover_known_answers_on_synthetic_runs():
    """Through summarize, as `aflora compare` computes them: on synthetic runs with known accuracies (0.70 and 0.65,
    on shared rows), one seed's Wilson interval and the paired Δ cover the truth about 95 % of the time; over 3 seeds
    whose true accuracy moves with the seed, so does the t-interval of the mean."""
    rng = np.random.default_rng(21)
    wilson, paired, over_seeds = [], [], []
    for _ in range(300):
        kind = rng.choice(4, size=500, p=[0.60, 0.10, 0.05, 0.25])
        rows = summarize({"ref": one_seed("ref", (kind == 0) | (kind == 2)), "entry": one_seed("entry", (kind == 0) | (kind == 1))}, "ref")
        wilson.append(rows[1].stats["final"].low <= 0.70 <= rows[1].stats["final"].high)
        paired.append(rows[1].difference.low <= 0.05 <= rows[1].difference.high)
        seeds = [fake_run("m", s, accuracy=None, correct=rng.random(300) < 0.70 + rng.normal(0, 0.02)) for s in range(3)]
        final = summarize({"m": seeds})[0].stats["final"]
        over_seeds.append(final.low <= 0.70 <= final.high)
    for hits in (wilson, paired, over_seeds):
        assert 0.92 <= sum(hits) / len(hits) <= 0.98


# ---------------------------------------------------------------------------- validation before any run
@pytest.fixture
def tiny_toml(tmp_path) -> Path:
    return write_tiny_config_toml(tmp_path / "data")


def test_plan_checks_every_entry_before_running(tiny_toml, tmp_path):
    plan = plan_comparison(tiny_toml, [], parse_entries("fedit,aflora:ddr=false"), [0, 1], tmp_path / "out")
    assert [(r.entry.label, r.seed, r.config.method, r.config.seed) for r in plan.runs] == [
        ("fedit", 0, "fedit", 0), ("aflora:ddr=false", 0, "aflora", 0), ("fedit", 1, "fedit", 1), ("aflora:ddr=false", 1, "aflora", 1)]
    assert plan.runs[3].out_dir == tmp_path / "out" / "aflora:ddr=false" / "seed1"
    assert plan.runs[1].config.method_options().ddr is False
    first, second = plan.runs[0].config.to_dict(), plan.runs[1].config.to_dict()
    for key in ("method", "aflora"):
        first.pop(key, None), second.pop(key, None)
    assert first == second  # nothing else differs between entries

    # AFLoRA tunes on the public set; without server steps it cannot run, and says which entry is at fault
    with pytest.raises(ConfigError, match="entry 'aflora', seed 0: aflora tunes on the server's public set"):
        plan_comparison(tiny_toml, ["server.steps=0"], parse_entries("fedit,aflora"), [0], tmp_path / "out")
    plan_comparison(tiny_toml, ["server.steps=0"], parse_entries("fedit,aflora:server_tuning=false"), [0], tmp_path / "out")
    with pytest.raises(DataError, match="entry 'fedit', seed 0: "):
        plan_comparison(tiny_toml, ['data.dataset="/no/such/file.csv"'], parse_entries("fedit"), [0], tmp_path / "out")
    with pytest.raises(ConfigError, match="compare sets seed per run"):
        plan_comparison(tiny_toml, ["seed=3"], parse_entries("fedit"), [0], tmp_path / "out")
    # An entry's own setting is typed and checked with the rest of its config, before any run
    with pytest.raises(ConfigError, match="entry 'fedit:train.lr=fast', seed 0: .*train.lr"):
        plan_comparison(tiny_toml, [], parse_entries("fedit,fedit:train.lr=fast"), [0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_entrys_own_learning_rate_is_the_only_difference_in_its_config(tiny_toml, tmp_path):
    plan = plan_comparison(tiny_toml, [], parse_entries("fedit,fedit:train.lr=0.0005"), [0], tmp_path / "out")
    first, second = (run.config.to_dict() for run in plan.runs)
    assert second["train"].pop("lr") == 0.0005 and first["train"].pop("lr") != 0.0005
    assert first == second


def test_earlier_results_are_reused_only_for_the_same_config(tiny_toml, tmp_path):
    out = tmp_path / "out"
    config = load_config(tiny_toml, ['method="fedit"', "seed=0"])
    (out / "fedit" / "seed0").mkdir(parents=True)
    (out / "fedit" / "seed0" / "results.json").write_text(json.dumps({"config": config.to_dict()}))
    plan = plan_comparison(tiny_toml, [], parse_entries("fedit"), [0, 1], out)
    assert [r.reuse for r in plan.runs] == [True, False]
    assert not any(r.reuse for r in plan_comparison(tiny_toml, [], parse_entries("fedit"), [0], out, overwrite=True).runs)
    with pytest.raises(ConfigError, match=r"was run with another config \(rounds: 2 there, 3 now\).*--overwrite"):
        plan_comparison(tiny_toml, ["rounds=3"], parse_entries("fedit"), [0], out)
    # A run made before a setting existed: reused while that setting is at its default, refused otherwise.
    older = config.to_dict()
    del older["secagg"]
    (out / "fedit" / "seed0" / "results.json").write_text(json.dumps({"config": older}))
    assert plan_comparison(tiny_toml, [], parse_entries("fedit"), [0], out).runs[0].reuse
    with pytest.raises(ConfigError, match=r"secagg.clipping_range: None there, 2.0 now"):
        plan_comparison(tiny_toml, ["secagg.clipping_range=2.0"], parse_entries("fedit"), [0], out)
    (out / "fedit" / "seed0" / "results.json").write_text("{")  # e.g. a disk that filled up
    with pytest.raises(ConfigError, match="is not a results file"):
        plan_comparison(tiny_toml, [], parse_entries("fedit"), [0], out)


def test_cli_fails_fast_naming_the_entry(tiny_toml, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["aflora", "compare", "--config", str(tiny_toml), "--methods", "aflora,fedit,aflora:dr=false",
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "entry 'aflora:dr=false': aflora has no option 'dr'" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------- published experiments as files
REPO = Path(__file__).resolve().parents[1]
# Each file is configs/default.toml plus the --set lines docs/reproduction.md gave before the experiments became files.
# The published studies score 2,000 test rows in the final evaluation (the default re-scores the per-round rows).
FINAL = "data.final_eval_size=2000"
STUDY = ["rounds=6", "data.eval_size=100", FINAL]  # docs/reproduction.md, Scale: 6 rounds, 100 rows per round, 2,000 at the end
EXPERIMENTS = {
    "table2_ag_news.toml": (STUDY, "aflora,fedit,ffa_lora,fedsa_lora,flora,flexlora,hetlora,legend,fedex_lora,fed_sb:rank=61,florist"),
    "table2_ag_news_best.toml": (STUDY, "aflora:train.lr=0.016+server.lr=0.004,fedit:train.lr=0.004,ffa_lora:train.lr=0.032,"
                                        "legend:train.lr=0.002,fedsa_lora:train.lr=0.004,flexlora:train.lr=0.004,"
                                        "hetlora:train.lr=0.001,flora:train.lr=0.002"),
    "table1_financial.toml": (['data.dataset="fingpt_sentiment"', 'data.partition="iid"', *STUDY],
                              "aflora,fedit,flora,flexlora,hetlora,legend"),
    "fig3_ablations.toml": (STUDY, "aflora,aflora:ddr=false,aflora:server_tuning=false,aflora:rank_aware_weights=false,"
                                     "aflora:data.public_dataset=dolly"),
    "fig4_dolly.toml": (['data.dataset="dolly"', 'data.partition="fedit_epsilon"', "data.epsilon=0.2", "federation.sample_fraction=0.2",
                         'data.extra_eval=["mmlu"]', *STUDY], "aflora,fedit,flexlora"),
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_each_published_experiment_is_a_file_with_its_entries_and_seeds(name):
    sets, methods = EXPERIMENTS[name]
    path = REPO / "configs" / name
    assert load_config(path).to_dict() == load_config(REPO / "configs" / "default.toml", sets).to_dict()
    across = "data.epsilon=0.2,0.4,0.6" if name == "fig4_dolly.toml" else None  # the figure sweeps FedIT's ε
    reference = methods.split(",")[0]  # AFLoRA in every experiment: at the shared rate, or at its grid's best
    assert reference.partition(":")[0] == "aflora"
    assert compare_table(path) == (methods, "0,1,2", reference, None, None, None, across)
    parse_entries(methods)  # every entry is valid


def test_every_config_file_loads():
    for path in sorted((REPO / "configs").glob("*.toml")):
        load_config(path)
        entries, seeds, reference, *_ = compare_table(path)
        if entries:
            assert reference is None or reference in [e.label for e in parse_entries(entries)]
            parse_seeds(seeds or "0")


def test_compare_table_is_checked_and_optional(tiny_toml, tmp_path):
    assert compare_table(tiny_toml) == (None,) * 7 and compare_table(None) == (None,) * 7
    base = tiny_toml.read_text()
    path = tmp_path / "experiment.toml"
    path.write_text(base + '\n[compare]\nmethods = ["fedit", "aflora:ddr=false"]\nreference = "fedit"\n')
    assert compare_table(path) == ("fedit,aflora:ddr=false", None, "fedit", None, None, None, None)
    assert load_config(path).method == load_config(tiny_toml).method  # `aflora run` reads the same file
    for bad, message in [('methods = "fedit"', "methods must be a non-empty list"), ("seeds = [0, 1.5]", "seeds must be"),
                         ('method = ["fedit"]', "takes only methods, seeds, reference, target_accuracy, fleet, grid"),
                         ("reference = 1", "reference must name")]:
        path.write_text(base + f"\n[compare]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            compare_table(path)


def test_cli_takes_entries_and_seeds_from_the_config(tiny_toml, tmp_path, monkeypatch):
    path = tmp_path / "experiment.toml"
    path.write_text(tiny_toml.read_text() + '\n[compare]\nmethods = ["fedit", "ffa_lora"]\nseeds = [3, 4]\nreference = "ffa_lora"\n')
    planned = {}

    def fake_run(plan, *, command):
        planned["runs"], planned["reference"] = [(r.entry.label, r.seed) for r in plan.runs], plan.reference
        return []

    monkeypatch.setattr("aflora.compare.run_comparison", fake_run)
    for extra, expected, reference in [
        ([], [("fedit", 3), ("ffa_lora", 3), ("fedit", 4), ("ffa_lora", 4)], "ffa_lora"),
        (["--methods", "fedit", "--seeds", "0"], [("fedit", 0)], None),  # the command line wins; the file's reference is not run
        (["--seeds", "0", "--reference", "fedit"], [("fedit", 0), ("ffa_lora", 0)], "fedit"),
    ]:
        monkeypatch.setattr(sys, "argv", ["aflora", "compare", "--config", str(path), "--out", str(tmp_path / "out"), *extra])
        main()
        assert (planned["runs"], planned["reference"]) == (expected, reference)
    for config, extra in [(tiny_toml, []),  # no --methods and no [compare] table: told how to give them
                          (path, ["--reference", "flora"])]:  # not an entry
        monkeypatch.setattr(sys, "argv", ["aflora", "compare", "--config", str(config), "--out", str(tmp_path / "out"), *extra])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2
    with pytest.raises(ConfigError, match=r"--reference 'flora' is not one of the entries \['fedit'\]"):
        plan_comparison(tiny_toml, [], parse_entries("fedit"), [0], tmp_path / "out", reference="flora")


# ---------------------------------------------------------------------------- end to end
@pytest.mark.flower
def test_compare_end_to_end_through_the_cli(tmp_path, monkeypatch, capsys):
    """Three methods × one seed, two rounds each through Flower's simulation engine; a second call reuses them.

    In-process through `aflora.cli.main` (a subprocess would add ~10 s of imports per call); kept to three runs
    (each starts Ray, ~15 s on 2 cores): the ablation syntax reaching the config is tested above.
    """
    config = write_tiny_config_toml(tmp_path / "data")
    out = tmp_path / "cmp"
    entries = ["aflora", "fedit", "ffa_lora"]
    argv = ["aflora", "compare", "--config", str(config), "--methods", ",".join(entries), "--seeds", "0", "--out", str(out),
            "--reference", "aflora"]
    monkeypatch.setattr(sys, "argv", argv)
    main()

    for label in entries:
        run = json.loads((out / label / "seed0" / "results.json").read_text())
        assert [r["round"] for r in run["rounds"]] == [1, 2]
        assert run["method"] == label and run["seed"] == 0
        assert run["final_eval"]["rows"] == 32 and run["final"]["accuracy"] == run["final_eval"]["accuracy"]
        assert (out / label / "seed0" / "rounds.csv").is_file() and (out / label / "seed0" / "accuracy.png").is_file()
    with (out / "comparison.csv").open() as handle:
        assert [r["label"] for r in csv.DictReader(handle)] == entries
    md = (out / "comparison.md").read_text()
    assert f"Command: `aflora compare --config {config} --methods aflora,fedit,ffa_lora" in md
    assert "rounds: 2 · local steps: 2" in md and "CPUs" in md
    main_table, fleet_table = md.split("Time and traffic on a simulated device fleet")
    assert sum(line.startswith("| `") for line in main_table.splitlines()) == len(entries)
    assert sum(line.startswith("| `") for line in fleet_table.splitlines()) == len(entries)  # every run timed on the fleet
    assert "| `fedit` | 1 |" in capsys.readouterr().out  # the table is printed too
    assert "| Δ accuracy vs `aflora` [95 % CI] | vs `aflora` |" in md and "`fedit`: 32 rows of seed 0, bootstrap" in md
    assert "in the final evaluation: all" in md
    for plot in ("accuracy.png", "uplink.png", "pareto.png"):
        assert (out / plot).stat().st_size > 1000

    stamps = {label: (out / label / "seed0" / "results.json").stat().st_mtime_ns for label in entries}
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("aflora.compare").addHandler(handler)
    try:
        main()
    finally:
        logging.getLogger("aflora.compare").removeHandler(handler)
    assert sum("reusing" in m for m in messages) == len(entries) and not any("->" in m for m in messages)
    assert {label: (out / label / "seed0" / "results.json").stat().st_mtime_ns for label in entries} == stamps
    assert "3 of them reused" in (out / "comparison.md").read_text()


def test_the_machine_line_names_the_cpu_model_and_its_bf16_support():
    from aflora.machine import cpu_model, environment, machine_line

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        if names:
            assert cpu_model() == names[0]
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        assert environment()["cpu_bf16"] == sorted({"avx512_bf16", "amx_bf16"} & set(flags))
    assert machine_line().startswith(cpu_model() + ",")
