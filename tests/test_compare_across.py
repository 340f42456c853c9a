"""`aflora compare --across data.epsilon=0.2,0.6`: every entry once per value of a condition of the experiment, how
each entry's final metric moves with it, and whether its gap to the reference moves (the question of Fig. 4)."""

from __future__ import annotations

import csv
import json
import math
from statistics import fmean, stdev

import pytest

from aflora.compare import compare_table, expand_grid, parse_across, parse_entries, parse_entry, plan_comparison, run_comparison
from aflora.compare_across import (
    ACROSS_CSV_COLUMNS,
    across_csv_rows,
    across_markdown,
    across_rows,
    across_scores,
    benchmark_runs,
    direction,
    gap_rows,
)
from aflora.compare_table import write_rows
from aflora.config import ConfigError
from aflora.intervals import pack_bits

from helpers import assert_compare_tables_refused, fake_run, planned_compare_runs, write_tiny_config_toml

T_975_DF2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (from tables)


def t95(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of three values, computed here rather than by aflora.intervals."""
    assert len(values) == 3
    half = T_975_DF2 * stdev(values) / math.sqrt(3)
    return fmean(values), fmean(values) - half, fmean(values) + half


def test_across_takes_one_condition_of_the_experiment_sorted_by_value():
    assert parse_across("data.epsilon=0.6, 0.2,0.4") == ("data.epsilon", ["0.2", "0.4", "0.6"])
    assert parse_across("federation.sample_fraction=1.0,0.2") == ("federation.sample_fraction", ["0.2", "1.0"])
    for spec, message in [("train.lr=0.001,0.002", "tuned with --grid"),
                          ("data.eval_size=100,200", "must be one of data.epsilon"),
                          ("data.epsilon=0.2", "at least two different values"),
                          ("data.epsilon=0.2,skewed", "'skewed' is not a number"),
                          ("data.epsilon=", "no values")]:
        with pytest.raises(ConfigError, match=message):
            parse_across(spec)


def test_only_the_across_expansion_may_give_an_entry_its_condition():
    with pytest.raises(ConfigError, match="cannot differ between entries"):
        parse_entries("fedit:data.epsilon=0.2")
    assert parse_entry("fedit:data.epsilon=0.2", "data.epsilon").settings == {"data.epsilon": 0.2}
    entries, across = expand_grid(parse_entries("aflora,fedit:train.lr=0.001"), "data.epsilon", ["0.2", "0.6"], "--across")
    assert [e.label for e in entries] == ["aflora:data.epsilon=0.2", "aflora:data.epsilon=0.6",
                                          "fedit:train.lr=0.001+data.epsilon=0.2", "fedit:train.lr=0.001+data.epsilon=0.6"]
    assert entries[3].settings == {"train.lr": 0.001, "data.epsilon": 0.6}
    assert across.entries == ["aflora", "fedit:train.lr=0.001"]


def test_a_planned_across_differs_only_in_its_condition_and_names_the_reference_as_given(tmp_path):
    tiny = write_tiny_config_toml(tmp_path / "data")
    out = tmp_path / "out"
    plan = plan_comparison(tiny, [], parse_entries("fedit,aflora"), [0], out, reference="aflora",
                           across="data.dirichlet_alpha=1.0,0.1")
    assert [(r.entry.label, r.config.data.dirichlet_alpha) for r in plan.runs] == [
        ("fedit:data.dirichlet_alpha=0.1", 0.1), ("fedit:data.dirichlet_alpha=1.0", 1.0),
        ("aflora:data.dirichlet_alpha=0.1", 0.1), ("aflora:data.dirichlet_alpha=1.0", 1.0)]
    first, second = (run.config.to_dict() for run in plan.runs[:2])
    first["data"].pop("dirichlet_alpha"), second["data"].pop("dirichlet_alpha")
    assert first == second
    assert plan.reference == "aflora" and plan.across.key == "data.dirichlet_alpha" and plan.grid is None
    for kwargs, message in [(dict(overrides=["data.dirichlet_alpha=0.5"]), "--set and --across both set data.dirichlet_alpha"),
                            (dict(grid="train.lr=0.001,0.002"), "--grid and --across both given"),
                            (dict(reference="ffa_lora"), "--reference 'ffa_lora' is not one of the entries"),
                            (dict(across="data.epsilon=0.2,-1"), "data.epsilon must be > 0")]:
        kwargs = {"overrides": [], "reference": "aflora", "across": "data.dirichlet_alpha=1.0,0.1"} | kwargs
        with pytest.raises(ConfigError, match=message):
            plan_comparison(tiny, kwargs.pop("overrides"), parse_entries("fedit,aflora"), [0], out, **kwargs)
    assert not out.exists()


# Final held-out losses per seed (lower is better) with known answers: aflora does not move with ε; fedit is lower
# than aflora by ~0.1 at both values (ahead, its gap unchanged); flexlora is lower by ~0.3 at 0.2 and level at 0.6,
# so its gap changes by ~+0.3 with ε.
LOSSES = {
    "aflora:data.epsilon=0.2": [3.00, 2.96, 3.02], "aflora:data.epsilon=0.6": [3.01, 2.96, 3.01],
    "fedit:data.epsilon=0.2": [2.90, 2.87, 2.91], "fedit:data.epsilon=0.6": [2.90, 2.85, 2.92],
    "flexlora:data.epsilon=0.2": [2.70, 2.64, 2.73], "flexlora:data.epsilon=0.6": [3.00, 2.98, 3.01],
}


def loss_runs() -> dict[str, list[dict]]:
    return {label: [fake_run(label.split(":")[0], seed, accuracy=None, loss=loss) for seed, loss in enumerate(losses)]
            for label, losses in LOSSES.items()}


def test_each_entrys_shift_with_the_condition_and_its_gaps_to_the_reference_are_paired_over_seeds():
    _, across = expand_grid(parse_entries("aflora,fedit,flexlora"), "data.epsilon", ["0.2", "0.6"], "--across")
    runs = loss_runs()
    aflora, fedit, flexlora = across_rows(across, runs, "loss")

    assert aflora.means == pytest.approx([fmean(LOSSES["aflora:data.epsilon=0.2"]), fmean(LOSSES["aflora:data.epsilon=0.6"])])
    shift = aflora.shifts[0]
    expected = t95([b - a for a, b in zip(LOSSES["aflora:data.epsilon=0.2"], LOSSES["aflora:data.epsilon=0.6"])])
    assert (shift.difference.estimate, shift.difference.low, shift.difference.high) == pytest.approx(expected)
    assert (direction(shift.difference), shift.paired_on) == ("level", "3 seeds, t")
    assert direction(flexlora.shifts[0].difference) == "higher"  # its loss rises from 0.2 to 0.6 in every seed

    fedit_gap, flexlora_gap = gap_rows(across, runs, "aflora", "loss")
    assert [g.entry for g in (fedit_gap, flexlora_gap)] == ["fedit", "flexlora"]
    for value, gap in zip(["0.2", "0.6"], fedit_gap.gaps):
        expected = t95([f - a for f, a in zip(LOSSES[f"fedit:data.epsilon={value}"], LOSSES[f"aflora:data.epsilon={value}"])])
        assert (gap.difference.estimate, gap.difference.low, gap.difference.high) == pytest.approx(expected)
        assert gap.difference.high < 0  # a lower loss in every seed: ahead
    assert direction(fedit_gap.changes[-1].difference) == "level"

    def gap(entry: str, value: str) -> list[float]:
        return [e - a for e, a in zip(LOSSES[f"{entry}:data.epsilon={value}"], LOSSES[f"aflora:data.epsilon={value}"])]
    expected = t95([last - first for first, last in zip(gap("flexlora", "0.2"), gap("flexlora", "0.6"))])
    change = flexlora_gap.changes[-1]
    assert (change.difference.estimate, change.difference.low, change.difference.high) == pytest.approx(expected)
    assert (direction(change.difference), change.paired_on) == ("higher", "3 seeds, t")


def test_one_seed_pairs_rows_and_leaves_the_change_of_a_gap_blank():
    runs = {label: [fake_run(label.split(":")[0], 0, accuracy=None, correct=[i % k == 0 for i in range(2000)])]
            for label, k in [("aflora:data.epsilon=0.2", 2), ("aflora:data.epsilon=0.6", 2),
                             ("fedit:data.epsilon=0.2", 1), ("fedit:data.epsilon=0.6", 1)]}
    _, across = expand_grid(parse_entries("aflora,fedit"), "data.epsilon", ["0.2", "0.6"], "--across")
    (fedit,) = gap_rows(across, runs, "aflora", "accuracy")
    assert [g.difference.estimate for g in fedit.gaps] == pytest.approx([0.5, 0.5])  # right on every row vs half of them
    assert fedit.gaps[0].paired_on == "2000 rows of seed 0, bootstrap"
    assert fedit.changes[-1].difference is None and "needs 2 or more" in fedit.changes[-1].paired_on
    section = across_markdown(across, across_scores(across, runs, "aflora", "accuracy"), [0], "aflora")
    assert any(line.startswith("| `fedit` |") and line.endswith("| 1 seed(s) in common: needs 2 or more |") for line in section)


def test_runs_scored_on_different_rows_are_refused():
    runs = loss_runs()
    runs["fedit:data.epsilon=0.6"][1]["final_eval"]["rows_sha256"] = "other rows"
    _, across = expand_grid(parse_entries("aflora,fedit,flexlora"), "data.epsilon", ["0.2", "0.6"], "--across")
    with pytest.raises(ConfigError, match="scored different test rows"):
        across_rows(across, runs, "loss")


def test_an_extra_benchmark_is_paired_on_its_own_rows_beside_the_tasks_metric():
    """Fig. 4 scores Dolly's loss and MMLU's accuracy: the section pairs each. Here fedit answers 3 more of 10 MMLU
    questions than aflora at ε = 0.2 and the same ones at 0.6, in every seed; a run without MMLU drops its table."""
    def with_mmlu(run: dict, right: int) -> dict:
        correct = [i < right for i in range(10)]
        mmlu = {"rows": 10, "test_rows": 14042, "rows_sha256": f"mmlu rows of seed {run['seed']}", "accuracy": right / 10,
                "correct": pack_bits(correct)}
        run["final_eval"]["extra"] = {"mmlu": mmlu}
        return run
    right = {"aflora:data.epsilon=0.2": 4, "aflora:data.epsilon=0.6": 5, "fedit:data.epsilon=0.2": 7, "fedit:data.epsilon=0.6": 5}
    runs = {label: [with_mmlu(run, right[label] + run["seed"] % 2) for run in seeds]
            for label, seeds in loss_runs().items() if label.split(":")[0] in ("aflora", "fedit")}
    _, across = expand_grid(parse_entries("aflora,fedit"), "data.epsilon", ["0.2", "0.6"], "--across")
    scored = benchmark_runs(runs, "mmlu")
    (fedit,) = gap_rows(across, scored, "aflora", "accuracy")
    assert [g.difference.estimate for g in fedit.gaps] == pytest.approx([0.3, 0.0])
    assert fedit.gaps[0].difference.low == pytest.approx(0.3)  # the same +0.3 in every seed: a zero-width t-interval
    assert fedit.changes[-1].difference.estimate == pytest.approx(-0.3) and direction(fedit.changes[-1].difference) == "lower"
    section = across_markdown(across, across_scores(across, runs, "aflora", "loss", ["mmlu"]), [0, 1, 2], "aflora")
    assert sum(line.startswith("Each entry's final mmlu accuracy") for line in section) == 2
    assert sum(line.startswith("Each entry's final loss") for line in section) == 2
    del runs["fedit:data.epsilon=0.6"][2]["final_eval"]["extra"]
    assert benchmark_runs(runs, "mmlu") is None
    scores = across_scores(across, runs, "aflora", "loss", ["mmlu"])
    assert [score.name for score in scores] == ["loss"]
    assert not any("mmlu" in line for line in across_markdown(across, scores, [0, 1, 2], "aflora"))


def test_the_section_ends_comparison_md_and_the_table_itself_compares_nothing(tmp_path):
    """Through run_comparison on runs already in --out (reused, so nothing trains): the table has no Δ column (the
    reference is compared with at each value, in the section), and the section holds the numbers checked above."""
    tiny = write_tiny_config_toml(tmp_path / "data")
    out = tmp_path / "out"
    args = dict(reference="aflora", across="data.epsilon=0.2,0.6")
    plan = plan_comparison(tiny, [], parse_entries("aflora,fedit,flexlora"), [0, 1, 2], out, **args)
    runs = loss_runs()
    for planned in plan.runs:
        planned.out_dir.mkdir(parents=True)
        run = runs[planned.entry.label][planned.seed] | {"config": planned.config.to_dict()}
        (planned.out_dir / "results.json").write_text(json.dumps(run))
    plan = plan_comparison(tiny, [], parse_entries("aflora,fedit,flexlora"), [0, 1, 2], out, **args)
    assert all(r.reuse for r in plan.runs)
    shown = run_comparison(plan, command="aflora compare --across data.epsilon=0.2,0.6")
    md = (out / "comparison.md").read_text()
    assert "## Across data.epsilon" in md and "Δ loss vs" not in md and shown[-1] == md.rstrip().splitlines()[-1]
    assert "| entry | 0.2 | 0.6 | 0.6 − 0.2 |" in md
    assert "| entry | − `aflora` at 0.2 | − `aflora` at 0.6 | gap at 0.6 − at 0.2 |" in md
    flexlora = next(line for line in md.splitlines() if line.startswith("| `flexlora` | -"))
    assert flexlora.endswith(" higher |") and flexlora.count("ahead") == 1 and flexlora.count("level") == 1
    with (out / "across.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["score"], r["entry"], r["value"]) for r in table] == [
        ("loss", entry, value) for entry in ("aflora", "fedit", "flexlora") for value in ("0.2", "0.6")]
    assert table[-1]["gap_minus_first_direction"] == "higher" and table[-1]["verdict"] == "level"


def test_across_csv_has_every_value_its_shift_its_gap_and_the_change_of_the_gap_from_the_first(tmp_path):
    """Three values: fedit's loss dips at ε = 0.4 and comes back at 0.6, so its gap to aflora changes from 0.2 to 0.4
    but not from 0.2 to 0.6. Every number is computed here from the per-seed losses."""
    losses = {"aflora:data.epsilon=0.2": [3.00, 2.96, 3.02], "aflora:data.epsilon=0.4": [3.05, 2.99, 3.04],
              "aflora:data.epsilon=0.6": [3.01, 2.96, 3.01], "fedit:data.epsilon=0.2": [2.90, 2.87, 2.91],
              "fedit:data.epsilon=0.4": [2.70, 2.75, 2.72], "fedit:data.epsilon=0.6": [2.90, 2.85, 2.92]}
    runs = {label: [fake_run(label.split(":")[0], seed, accuracy=None, loss=loss) for seed, loss in enumerate(values)]
            for label, values in losses.items()}
    _, across = expand_grid(parse_entries("aflora,fedit"), "data.epsilon", ["0.2", "0.4", "0.6"], "--across")
    scores = across_scores(across, runs, "aflora", "loss")
    with write_rows(ACROSS_CSV_COLUMNS, across_csv_rows(across, scores, "aflora"), tmp_path / "across.csv").open() as handle:
        table = {(r["entry"], r["value"]): r for r in csv.DictReader(handle)}

    def loss(entry: str, value: str) -> list[float]:
        return losses[f"{entry}:data.epsilon={value}"]

    def gap(value: str) -> list[float]:
        return [f - a for f, a in zip(loss("fedit", value), loss("aflora", value))]

    def numbers(row: dict, prefix: str) -> tuple[float, float, float]:
        return float(row[prefix]), float(row[f"{prefix}_low"]), float(row[f"{prefix}_high"])

    for value in ("0.4", "0.6"):
        row = table["fedit", value]
        assert float(row["mean"]) == pytest.approx(fmean(loss("fedit", value)))
        assert numbers(row, "minus_first") == pytest.approx(t95([b - a for a, b in zip(loss("fedit", "0.2"), loss("fedit", value))]))
        assert numbers(row, "minus_reference") == pytest.approx(t95(gap(value)))
        assert numbers(row, "gap_minus_first") == pytest.approx(t95([b - a for a, b in zip(gap("0.2"), gap(value))]))
        assert (row["reference"], row["verdict"], row["paired_on"]) == ("aflora", "ahead", "3 seeds, t")
    assert table["fedit", "0.4"]["gap_minus_first_direction"] == "lower"  # 0.1 further ahead in every seed
    assert table["fedit", "0.6"]["gap_minus_first_direction"] == "level"
    first = table["fedit", "0.2"]
    assert first["minus_first"] == first["gap_minus_first"] == "" and first["verdict"] == "ahead"
    assert all(table["aflora", v]["reference"] == table["aflora", v]["minus_reference"] == "" for v in ("0.2", "0.4", "0.6"))


def test_the_config_files_across_runs_unless_the_command_line_fixes_its_setting(tmp_path, monkeypatch):
    tiny = write_tiny_config_toml(tmp_path / "data")
    path = tmp_path / "across.toml"
    path.write_text(tiny.read_text() + '\n[compare]\nmethods = ["fedit"]\nacross = "data.epsilon=0.2,0.6"\n')
    assert compare_table(path).across == "data.epsilon=0.2,0.6"
    assert_compare_tables_refused(tiny, tmp_path, [('across = ["data.epsilon=0.2"]', "across must be a string"),
                                                   ('across = "train.lr=0.1,0.2"', "tuned with --grid"),
                                                   ('across = "data.epsilon=0.2,0.6"\ngrid = "train.lr=0.1,0.2"',
                                                    "sets both grid and across")])
    extras = [[], ["--set", "data.epsilon=0.4"], ["--grid", "train.lr=0.01,0.02"], ["--across", "federation.sample_fraction=0.5,1"]]
    assert planned_compare_runs(monkeypatch, path, tmp_path / "out", *extras) == [
        ["fedit:data.epsilon=0.2", "fedit:data.epsilon=0.6"],
        ["fedit"],  # a --set of its setting: one value of it, run alone
        ["fedit:train.lr=0.01", "fedit:train.lr=0.02"],
        ["fedit:federation.sample_fraction=0.5", "fedit:federation.sample_fraction=1"]]
