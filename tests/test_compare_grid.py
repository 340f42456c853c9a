"""`aflora compare --grid`: every entry once per value of one setting, and each entry's best value from those runs."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from aflora.compare import compare_table, expand_grid, parse_entries, parse_grid, plan_comparison
from aflora.compare_grid import GRID_CSV_COLUMNS, best_entries, grid_choices, grid_csv_rows, grid_markdown
from aflora.compare_table import summarize, write_markdown, write_rows
from aflora.config import ConfigError

from helpers import assert_compare_tables_refused, fake_run, planned_compare_runs, write_tiny_config_toml


def test_a_grid_is_one_numeric_setting_an_entry_may_change_sorted_by_value():
    assert parse_grid("train.lr=4e-3, 0.001,0.002") == ("train.lr", ["0.001", "0.002", "4e-3"])
    assert parse_grid("server.steps=8,2") == ("server.steps", ["2", "8"])
    for spec, message in [("train.lr=0.001", "at least two different values"),
                          ("train.lr=0.001,1e-3", "at least two different values"),
                          ("train.lr=0.001,fast", "'fast' is not a number"),
                          ("train.lr=0.001,true", "'true' is not a number"),
                          ("data.eval_size=10,20", "one train.* or server.* setting"),
                          ("lr=0.001,0.002", "one train.* or server.* setting"),
                          ("train.lr", "no values after '='")]:
        with pytest.raises(ConfigError, match=message):
            parse_grid(spec)


def test_every_entry_runs_once_per_value_as_its_own_entry():
    entries, grid = expand_grid(parse_entries("fedit,aflora:ddr=false"), "train.lr", ["0.001", "0.004"])
    assert [e.label for e in entries] == ["fedit:train.lr=0.001", "fedit:train.lr=0.004",
                                          "aflora:ddr=false+train.lr=0.001", "aflora:ddr=false+train.lr=0.004"]
    assert entries[3].options == {"ddr": False} and entries[3].settings == {"train.lr": 0.004}
    assert grid.entries == ["fedit", "aflora:ddr=false"]
    with pytest.raises(ConfigError, match=r"varies train.lr, which the entries \['fedit:train.lr=0.002'\] set"):
        expand_grid(parse_entries("aflora,fedit:train.lr=0.002"), "train.lr", ["0.001", "0.004"])


def test_a_planned_grid_differs_only_in_the_grids_setting(tmp_path):
    tiny = write_tiny_config_toml(tmp_path / "data")
    plan = plan_comparison(tiny, [], parse_entries("fedit"), [0], tmp_path / "out", grid="train.lr=0.002,0.0005")
    assert [(r.entry.label, r.config.train.lr) for r in plan.runs] == [("fedit:train.lr=0.0005", 0.0005),
                                                                       ("fedit:train.lr=0.002", 0.002)]
    first, second = (run.config.to_dict() for run in plan.runs)
    first["train"].pop("lr"), second["train"].pop("lr")
    assert first == second
    with pytest.raises(ConfigError, match="--set and --grid both set train.lr"):
        plan_comparison(tiny, ["train.lr=0.1"], parse_entries("fedit"), [0], tmp_path / "out", grid="train.lr=0.002,0.0005")
    with pytest.raises(ConfigError, match=r"--reference 'fedit' is not one of the entries \['fedit:train.lr=0.0005'"):
        plan_comparison(tiny, [], parse_entries("fedit"), [0], tmp_path / "out", grid="train.lr=0.002,0.0005", reference="fedit")
    assert not (tmp_path / "out").exists()


def outcomes(label: str, correct: np.ndarray, seed: int = 0) -> dict:
    return fake_run(label.split(":")[0], seed, accuracy=None, correct=list(map(bool, correct)), rows_id=f"rows of seed {seed}")


def test_each_entry_gets_the_value_it_does_best_with_and_the_values_level_with_it(tmp_path):
    """Known answers on one seed's 2,000 rows: fedit is best at the middle value, with the largest value scoring the
    very same rows (level) and the smallest far fewer; aflora is best at the largest value, the grid's edge."""
    rng = np.random.default_rng(0)
    good = rng.random(2000) < 0.80
    worse = good & (rng.random(2000) < 0.85)  # right on a subset of good's rows: behind by ~0.12
    slightly_worse = good.copy()
    slightly_worse[np.flatnonzero(good)[:3]] = False  # 3 rows of 2,000: within the interval
    entries, grid = expand_grid(parse_entries("fedit,aflora"), "train.lr", ["0.001", "0.002", "0.004"])
    correct = {"fedit:train.lr=0.001": worse, "fedit:train.lr=0.002": good, "fedit:train.lr=0.004": slightly_worse,
               "aflora:train.lr=0.001": worse & (rng.random(2000) < 0.9), "aflora:train.lr=0.002": worse,
               "aflora:train.lr=0.004": good}
    runs = {e.label: [outcomes(e.label, correct[e.label])] for e in entries}
    rows = summarize(runs)
    fedit, aflora = grid_choices(grid, rows, runs)

    assert (fedit.entry, fedit.best, fedit.at_edge, fedit.level) == ("fedit", "0.002", False, ["0.004"])
    assert fedit.means == pytest.approx([worse.mean(), good.mean(), slightly_worse.mean()])
    assert (aflora.entry, aflora.best, aflora.at_edge, aflora.level) == ("aflora", "0.004", True, [])
    assert fedit.paired_on == "2000 rows of seed 0, bootstrap"
    assert best_entries(grid, [fedit, aflora]) == "fedit:train.lr=0.002,aflora:train.lr=0.004"

    section = grid_markdown(grid, [fedit, aflora], [0], "accuracy")
    assert "| entry | 0.001 | 0.002 | 0.004 | best | level with the best |" in section
    assert f"| `fedit` | {worse.mean():.4f} | **{good.mean():.4f}** | {slightly_worse.mean():.4f} | 0.002 | 0.004 |" in section
    assert section[7].endswith("| 0.004 (at the grid's edge: extend it) | — |")
    assert "Each entry at its best: `--methods fedit:train.lr=0.002,aflora:train.lr=0.004`" in section
    md = write_markdown(rows, tmp_path / "comparison.md", header=[], sections=section).read_text()
    assert md.rstrip().endswith(section[-1]) and "## Grid: train.lr" in md

    with write_rows(GRID_CSV_COLUMNS, grid_csv_rows(grid, [fedit, aflora]), tmp_path / "grid.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["entry"], r["value"], r["verdict"]) for r in table] == [
        ("fedit", "0.001", "behind"), ("fedit", "0.002", "best"), ("fedit", "0.004", "level"),
        ("aflora", "0.001", "behind"), ("aflora", "0.002", "behind"), ("aflora", "0.004", "best")]
    three_rows_fewer = table[2]
    assert float(three_rows_fewer["minus_best"]) == pytest.approx(-3 / 2000)  # the same rows but 3
    assert float(three_rows_fewer["minus_best_low"]) < 0 <= float(three_rows_fewer["minus_best_high"])  # includes 0
    assert float(table[0]["mean"]) == pytest.approx(worse.mean()) and float(table[0]["minus_best_high"]) < 0
    assert table[1]["minus_best"] == "" and table[1]["paired_on"] == ""  # the best is not compared with itself
    assert [r["best_at_edge"] for r in table] == ["False"] * 3 + ["True"] * 3


def test_over_seeds_the_best_is_the_best_mean_and_a_loss_is_best_lowest():
    entries, grid = expand_grid(parse_entries("fedit"), "train.lr", ["0.001", "0.002"])
    finals = {"fedit:train.lr=0.001": [0.70, 0.74, 0.72], "fedit:train.lr=0.002": [0.80, 0.60, 0.70]}  # means 0.72, 0.70
    runs = {label: [fake_run("fedit", s, accuracy=a) for s, a in enumerate(values)] for label, values in finals.items()}
    (choice,) = grid_choices(grid, summarize(runs), runs)
    assert (choice.best, choice.level, choice.paired_on) == ("0.001", ["0.002"], "3 seeds, t")

    losses = {"fedit:train.lr=0.001": [1.2, 1.3], "fedit:train.lr=0.002": [0.9, 1.0]}
    runs = {label: [fake_run("fedit", s, accuracy=None, loss=v) for s, v in enumerate(values)] for label, values in losses.items()}
    (choice,) = grid_choices(grid, summarize(runs), runs)
    assert (choice.best, choice.means) == ("0.002", pytest.approx([1.25, 0.95]))
    assert choice.verdicts() == ["behind", "best"]  # a loss 0.3 higher on both seeds
    assert choice.to_best[0].estimate == pytest.approx(0.3)


def test_the_config_file_and_the_command_line_give_the_grid(tmp_path, monkeypatch):
    tiny = write_tiny_config_toml(tmp_path / "data")
    path = tmp_path / "grid.toml"
    # the file's reference names an entry as given; with a grid it is not applied (no entry is named "fedit" then)
    path.write_text(tiny.read_text() + '\n[compare]\nmethods = ["fedit"]\nreference = "fedit"\ngrid = "train.lr=0.001,0.002"\n')
    assert compare_table(path).grid == "train.lr=0.001,0.002"
    assert_compare_tables_refused(tiny, tmp_path, [('grid = ["train.lr=0.001"]', "grid must be a string"),
                                                   ('grid = "train.lr=0.001"', "at least two")])
    assert planned_compare_runs(monkeypatch, path, tmp_path / "out", [], ["--grid", "server.lr=0.01,0.02"]) == [
        ["fedit:train.lr=0.001", "fedit:train.lr=0.002"], ["fedit:server.lr=0.01", "fedit:server.lr=0.02"]]
